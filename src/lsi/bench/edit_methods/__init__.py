"""Edit methods graded by the knowledge-editing side of the ground-truth benchmark, one module per family.

An edit method turns one :class:`~lsi.evaluation.edit.EditCase` of a task into one or more graded rows, each an
:class:`EditOutput` (row name, the steering, JSON-ready settings such as the layer); e.g. one row per layer for a
comparison of layers. Every module here registers its methods with :func:`register_edit_method` when imported, and
:meth:`EDIT.load <lsi.bench.registry.Registry.load>` imports them all, so a new module appears in the benchmark
without touching the runner.

Example:
    >>> sorted(EDIT.load())
    ['finetune_full', 'finetune_masked', 'rome', 'rome_by_layer']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lsi.bench.registry import Registry, always

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel
    from lsi.core.steering import Steering
    from lsi.evaluation.edit import EditCase, EditTask


@dataclass(frozen=True)
class EditOutput:
    """One graded row of one case: its name, the steering, and the settings that produced it."""

    row: str
    steering: Steering
    settings: dict[str, Any]


@dataclass(frozen=True)
class EditMethod:
    name: str
    summary: str
    run: Callable[[LanguageModel, EditTask, EditCase], list[EditOutput]]  # (model, task, case) -> rows
    applies: Callable[[EditTask], str | None] = always  # None, or why the method does not apply


EDIT = Registry[EditMethod]("edit", __name__)  # no baseline method: the unedited model is always graded
EDIT_METHODS = EDIT.methods
register_edit_method = EDIT.register
get_edit_methods = EDIT.select
