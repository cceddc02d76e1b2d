"""The one registration point for steer methods graded by the ground-truth benchmark.

A steer method turns a :class:`~lsi.bench.steer_tasks.SteerTask` into candidate steerings (e.g. one vector at a
grid of strengths, or one directional ablation), choosing everything else (site, layer, read position) on
``task.dev`` only. The benchmark measures every candidate on ``task.test`` (a success-vs-KL curve) and reports
the best target success at KL ≤ τ. A method that does not apply to a task says why; the benchmark skips it with
that reason. The baseline ``random`` (a random direction of equal norm, see
:mod:`lsi.bench.steer_methods.diff_in_means`) is always graded alongside.

Example:
    >>> [m.name for m in get_steer_methods([])]
    ['random']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lsi.bench.registry import select_methods

if TYPE_CHECKING:
    from lsi.bench.steer_tasks import SteerTask
    from lsi.core.model import LanguageModel
    from lsi.steer.base import Steering


@dataclass(frozen=True)
class Candidate:
    """One steering to measure, and the settings that produced it (JSON-ready, e.g. site, position, alpha)."""

    steering: Steering
    settings: dict[str, Any]


def _always(task: SteerTask) -> str | None:
    return None


@dataclass(frozen=True)
class SteerMethod:
    name: str
    summary: str
    run: Callable[[LanguageModel, SteerTask, int], list[Candidate]]  # (model, task, seed) -> candidates
    applies: Callable[[SteerTask], str | None] = _always  # None, or why the method does not apply
    draws: int = 1  # > 1: graded as the mean over this many seeds (random baselines)


STEER_METHODS: dict[str, SteerMethod] = {}
STEER_BASELINES = ("random",)


def register_steer_method(method: SteerMethod) -> SteerMethod:
    if method.name in STEER_METHODS:
        raise ValueError(f"a steer method named {method.name!r} is already registered")
    STEER_METHODS[method.name] = method
    return method


def load_steer_methods() -> dict[str, SteerMethod]:
    """Every registered steer method (importing :mod:`lsi.bench.steer_methods` registers them)."""
    from lsi.bench.steer_methods import load_all

    load_all()
    return STEER_METHODS


def get_steer_methods(names: list[str] | None) -> list[SteerMethod]:
    """The methods to grade: the baselines first, then ``names`` (all registered ones when ``None``)."""
    return select_methods(load_steer_methods(), names, STEER_BASELINES, "steer")
