"""Edit methods graded by the knowledge-editing side of the ground-truth benchmark, one module per family.

An edit method turns one :class:`~lsi.bench.edit_tasks.EditCase` of a task into one or more graded rows, each an
:class:`EditOutput` (row name, the steering, JSON-ready settings such as the layer); e.g. one row per layer for a
comparison of layers. Every module here registers its methods with :func:`register_edit_method` when imported, and
:func:`load_edit_methods` imports them all, so a new module appears in the benchmark without touching the runner.

Example:
    >>> sorted(load_edit_methods())
    ['finetune_full', 'finetune_masked', 'rome', 'rome_by_layer']
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lsi.bench.registry import select_methods

if TYPE_CHECKING:
    from lsi.bench.edit_tasks import EditCase, EditTask
    from lsi.core.model import LanguageModel
    from lsi.steer.base import Steering


@dataclass(frozen=True)
class EditOutput:
    """One graded row of one case: its name, the steering, and the settings that produced it."""

    row: str
    steering: Steering
    settings: dict[str, Any]


def _always(task: EditTask) -> str | None:
    return None


@dataclass(frozen=True)
class EditMethod:
    name: str
    summary: str
    run: Callable[[LanguageModel, EditTask, EditCase], list[EditOutput]]  # (model, task, case) -> rows
    applies: Callable[[EditTask], str | None] = _always  # None, or why the method does not apply


EDIT_METHODS: dict[str, EditMethod] = {}


def register_edit_method(method: EditMethod) -> EditMethod:
    if method.name in EDIT_METHODS:
        raise ValueError(f"an edit method named {method.name!r} is already registered")
    EDIT_METHODS[method.name] = method
    return method


def load_edit_methods() -> dict[str, EditMethod]:
    """Every registered edit method (importing the modules of this package registers them)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return EDIT_METHODS


def get_edit_methods(names: list[str] | None) -> list[EditMethod]:
    """The methods to grade: ``names`` (all registered ones when ``None``); the unedited model is always graded."""
    return select_methods(load_edit_methods(), names, (), "edit")
