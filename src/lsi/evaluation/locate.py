"""Locate tasks: what an organism asks a locate method to find, the data to find it on, and the oracle.

A task names a universe of components (sites such as ``blocks.1.attn.head_out[2]``, or layers such as
``blocks.4``), the planted subset, and dev / test splits. A split holds inputs, a scalar behaviour metric of the
logits (a differentiable 0-d tensor), the oracle's intervention on one component (ablation, or restoration from
a clean run) and a ``setting`` wrapped around every run (e.g. the corruption that restoration undoes).

What methods beyond ablation need is optional, and a method whose needs are missing does not apply:
``clean`` and ``corrupted`` runs of equal shape where the behaviour is present / absent (patching, attribution
patching, circuit discovery), and labelled ``datasets`` (e.g. one per language, for activation statistics).

Example:
    >>> from contextlib import nullcontext
    >>> split = Split(inputs=[[1, 2]], metric=lambda logits: logits.sum(), intervene=lambda u: nullcontext())
    >>> LocateTask("toy", "two components", ("a", "b"), frozenset({"a"}), dev=split, test=split).universe
    ('a', 'b')
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lsi.core.runs import ContextFactory, Run

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel


@dataclass(frozen=True)
class Split:
    """Inputs (anything ``lm.forward`` takes), a metric of the logits (larger = more of the behaviour), the
    oracle's intervention on one component, and the setting every run of this split happens in."""

    inputs: Any
    metric: Callable[[torch.Tensor], torch.Tensor]
    intervene: Callable[[str], AbstractContextManager[Any]]
    setting: ContextFactory = nullcontext
    clean: Run | None = None
    corrupted: Run | None = None
    datasets: dict[str, Any] | None = None


@dataclass(frozen=True)
class LocateTask:
    organism: str
    name: str
    universe: tuple[str, ...]
    planted: frozenset[str]
    dev: Split
    test: Split
    planted_are_least_important: bool = False  # e.g. redundant layers: the truth is what matters least
    description: str = ""


def measure(lm: LanguageModel, split: Split, component: str | None = None) -> float:
    """The split's metric in its setting, with the oracle's intervention on ``component`` if given."""
    with torch.no_grad(), split.setting(), split.intervene(component) if component else nullcontext():
        return float(split.metric(lm.forward(split.inputs)))


def oracle_scores(lm: LanguageModel, task: LocateTask, split: Split) -> dict[str, float]:
    """Exhaustive per-component effect |metric(intervened) - metric(setting alone)| on a split."""
    base = measure(lm, split)
    return {u: abs(measure(lm, split, u) - base) for u in task.universe}
