"""The one registration point for steer methods graded by the ground-truth benchmark.

A steer method turns a :class:`~lsi.evaluation.steer.SteerTask` into candidate steerings (e.g. one vector at a
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

from lsi.bench.registry import Registry, always

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel
    from lsi.core.steering import Steering
    from lsi.evaluation.steer import SteerTask


@dataclass(frozen=True)
class Candidate:
    """One steering to measure, and the settings that produced it (JSON-ready, e.g. site, position, alpha)."""

    steering: Steering
    settings: dict[str, Any]


@dataclass(frozen=True)
class SteerMethod:
    name: str
    summary: str
    run: Callable[[LanguageModel, SteerTask, int], list[Candidate]]  # (model, task, seed) -> candidates
    applies: Callable[[SteerTask], str | None] = always  # None, or why the method does not apply
    draws: int = 1  # > 1: graded as the mean over this many seeds (random baselines)


STEER = Registry[SteerMethod]("steer", "lsi.bench.steer_methods", baselines=("random",))
STEER_METHODS = STEER.methods
register_steer_method = STEER.register
get_steer_methods = STEER.select
