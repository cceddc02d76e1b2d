"""Runs: inputs together with the setting they run in, and the clean / corrupted pairing contrastive methods need.

A setting is a factory of context managers wrapped around a run (e.g. noise added to the subject embeddings);
methods that compare a clean and a corrupted run accept plain inputs or :class:`Run` objects.

Example:
    >>> run = as_run([[1, 2, 3]])
    >>> run.inputs, run.setting is nullcontext
    ([[1, 2, 3]], True)
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from lsi.core.inputs import Batch
from lsi.errors import InputError, ShapeMismatchError

ContextFactory = Callable[[], AbstractContextManager[Any]]


@dataclass(frozen=True)
class Run:
    """Inputs and the setting they run in (e.g. noise on the subject embeddings)."""

    inputs: Any
    setting: ContextFactory = nullcontext


def as_run(run: Any, setting: ContextFactory | None = None) -> Run:
    """A :class:`Run` from plain inputs plus an optional setting, or from a Run-like object (``.inputs``,
    ``.setting``)."""
    if not (hasattr(run, "inputs") and hasattr(run, "setting")):
        return Run(run, setting or nullcontext)
    if setting is not None:
        raise InputError("one setting per run", "a Run with its own setting and a separate setting",
                         "put the setting in the Run, or pass plain inputs with the setting")
    return run if isinstance(run, Run) else Run(run.inputs, run.setting)


def check_aligned(clean: Batch, corrupted: Batch) -> None:
    """Refuse a clean / corrupted pair whose tokens do not line up position by position."""
    if clean.input_ids.shape == corrupted.input_ids.shape and torch.equal(clean.attention_mask.bool(),
                                                                          corrupted.attention_mask.bool()):
        return
    raise ShapeMismatchError(
        "clean and corrupted inputs with the same token length, row by row (values are compared position by "
        "position)",
        f"clean {tuple(clean.input_ids.shape)} with lengths {clean.lengths}, corrupted "
        f"{tuple(corrupted.input_ids.shape)} with lengths {corrupted.lengths}",
        "make the counterfactual replace tokens rather than insert or delete them; or pad / truncate both to the "
        "same length (lm.to_batch(..., padding_side=...) on equal-length rows); or keep only the aligned part of "
        "each prompt and patch those positions (positions=[...])")
