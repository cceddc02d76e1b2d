"""The registries of methods graded by the ground-truth benchmark, and the one for locate methods.

A :class:`Registry` holds one side's methods by name: each registers once, importing every module of the side's
package registers them all (so a new module appears in the benchmark without touching the runner), and a
selection puts the side's baselines first.

A locate method turns a :class:`LocateTask` into importance scores over the task's universe (larger = more
important), computed on ``task.test`` (a method with hyperparameters tunes them on ``task.dev`` only). Methods that
do not apply to a task say why; the benchmark skips them with that reason. The oracle (exhaustive ablation) and a
random ranking are always graded alongside.

Example:
    >>> [m.name for m in get_locate_methods([])]  # the baselines alone
    ['oracle', 'random']
    >>> "dla" in LOCATE.load()  # every module of lsi.bench.methods registers its methods
    True
"""

from __future__ import annotations

import importlib
import pkgutil
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from lsi.errors import InputError
from lsi.evaluation.locate import LocateTask, oracle_scores

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel

Scores = dict[str, float]


class Named(Protocol):
    @property
    def name(self) -> str: ...


M = TypeVar("M", bound=Named)


def always(task: object) -> str | None:
    """The default ``applies`` of a method: it applies to every task."""
    return None


class Registry(Generic[M]):
    """One side's methods by name; ``package``'s modules register them when imported (:meth:`load`)."""

    def __init__(self, side: str, package: str, baselines: tuple[str, ...] = ()) -> None:
        self.side, self.package, self.baselines = side, package, baselines
        self.methods: dict[str, M] = {}

    def register(self, method: M) -> M:
        if method.name in self.methods:
            raise ValueError(f"a {self.side} method named {method.name!r} is already registered")
        self.methods[method.name] = method
        return method

    def load(self) -> dict[str, M]:
        """Every registered method (importing each module of the package registers its methods)."""
        for module in pkgutil.iter_modules(importlib.import_module(self.package).__path__):
            importlib.import_module(f"{self.package}.{module.name}")
        return self.methods

    def select(self, names: list[str] | None) -> list[M]:
        """The methods to grade: the baselines first, then ``names`` (every registered one when ``None``); unknown
        names are refused."""
        registered = self.load()
        wanted = list(registered) if names is None else names
        unknown = [n for n in wanted if n not in registered]
        if unknown:
            included = f" ({', '.join(self.baselines)} always included)" if self.baselines else ""
            raise InputError(f"{self.side} method names from {sorted(registered)}", str(unknown),
                             f"pass --methods with registered names{included}")
        return [registered[n] for n in dict.fromkeys([*self.baselines, *wanted])]


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
    applies: Callable[[LocateTask], str | None] = always  # None, or why the method does not apply
    draws: int = 1  # > 1: graded as the mean over this many seeds (random baselines)


LOCATE = Registry[LocateMethod]("locate", "lsi.bench.methods", baselines=("oracle", "random"))
LOCATE_METHODS = LOCATE.methods
register_locate_method = LOCATE.register
get_locate_methods = LOCATE.select


def _oracle(lm: LanguageModel, task: LocateTask, seed: int) -> Scores:
    return oracle_scores(lm, task, task.test)


def _random_ranking(lm: LanguageModel, task: LocateTask, seed: int) -> Scores:
    rng = random.Random(f"{task.organism}/{task.name}/{seed}")
    return {u: rng.random() for u in task.universe}


register_locate_method(LocateMethod("oracle", "exhaustive single-component ablation on the test split", _oracle))
register_locate_method(LocateMethod("random", "a random ranking (mean over 200 draws)", _random_ranking, draws=200))
