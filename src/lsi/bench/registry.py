"""The one registration point for locate methods graded by the ground-truth benchmark.

A method turns a :class:`LocateTask` into importance scores over the task's universe (larger = more important),
computed on ``task.test`` (a method with hyperparameters tunes them on ``task.dev`` only). Methods that do not
apply to a task say why; the benchmark skips them with that reason. The oracle (exhaustive ablation) and a
random ranking are always graded alongside.

Example:
    >>> sorted(LOCATE_METHODS)[:2]
    ['oracle', 'random']
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from lsi.bench.tasks import LocateTask, oracle_scores
from lsi.errors import InputError

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel

Scores = dict[str, float]
M = TypeVar("M")


def _always(task: LocateTask) -> str | None:
    return None


@dataclass(frozen=True)
class MethodOutput:
    """Scores plus figures the benchmark reports beside the grades (e.g. a circuit's faithfulness curve)."""

    scores: Scores
    extras: dict[str, Any]


@dataclass(frozen=True)
class LocateMethod:
    name: str
    summary: str
    run: Callable[[LanguageModel, LocateTask, int], Scores | MethodOutput]  # (model, task, seed) -> scores
    applies: Callable[[LocateTask], str | None] = _always  # None, or why the method does not apply
    draws: int = 1  # > 1: graded as the mean over this many seeds (random baselines)


LOCATE_METHODS: dict[str, LocateMethod] = {}
BASELINES = ("oracle", "random")


def register_locate_method(method: LocateMethod) -> LocateMethod:
    if method.name in LOCATE_METHODS:
        raise ValueError(f"a locate method named {method.name!r} is already registered")
    LOCATE_METHODS[method.name] = method
    return method


def select_methods(registry: dict[str, M], names: list[str] | None, baselines: tuple[str, ...], side: str) -> list[M]:
    """Baselines first, then ``names`` (every registered method when ``None``); unknown names are refused."""
    wanted = list(registry) if names is None else names
    unknown = [n for n in wanted if n not in registry]
    if unknown:
        always = f" ({', '.join(baselines)} always included)" if baselines else ""
        raise InputError(f"{side} method names from {sorted(registry)}", str(unknown),
                         f"pass --methods with registered names{always}")
    return [registry[n] for n in dict.fromkeys([*baselines, *wanted])]


def get_locate_methods(names: list[str] | None) -> list[LocateMethod]:
    """The methods to grade: the baselines first, then ``names`` (all registered ones when ``None``)."""
    from lsi.bench.methods import load_all

    load_all()
    return select_methods(LOCATE_METHODS, names, BASELINES, "locate")


def _oracle(lm: LanguageModel, task: LocateTask, seed: int) -> Scores:
    return oracle_scores(lm, task, task.test)


def _random_ranking(lm: LanguageModel, task: LocateTask, seed: int) -> Scores:
    rng = random.Random(f"{task.organism}/{task.name}/{seed}")
    return {u: rng.random() for u in task.universe}


register_locate_method(LocateMethod("oracle", "exhaustive single-component ablation on the test split", _oracle))
register_locate_method(LocateMethod("random", "a random ranking (mean over 200 draws)", _random_ranking, draws=200))
