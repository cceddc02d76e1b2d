"""Steer tasks: what an organism asks a steering to do, and how one steering is measured on it.

A task's ``goal`` is to ``"induce"`` a behaviour (move inputs towards the ``positive`` contrast set) or to
``"remove"`` it (take away what the positive set shows). Each split holds the contrast sets that methods derive
directions from (``positive`` inputs show the behaviour, ``negative`` ones do not), an exact ``measure`` of the
behaviour under whatever steering is active, and a held-out ``corpus`` for KL(base ‖ steered) and Δ cross-entropy
(computed by :mod:`lsi.steer.selection`, which also picks the best point within the KL budget). Methods choose
everything (site, layer, read position) on ``dev``; the benchmark reports on ``test``.

``measure`` returns :class:`SteerScores`: target success (an exact rate, higher = more of the goal),
generalization (the same on held-out prompt kinds), specificity (neighbours that must not change) and fluency
(exact grammar validity); the last three are ``None`` where the organism has no such check. ``metrics`` says what
each one is for the task.

Example:
    >>> from lsi.steer.selection import best_at_kl
    >>> best_at_kl([Point({"alpha": 1}, SteerScores(0.4), 0.02, 0.0), Point({"alpha": 2}, SteerScores(0.9), 0.3, 0.1)],
    ...            tau=0.1).settings
    {'alpha': 1}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

from lsi.core.positions import PositionSpec
from lsi.errors import InputError
from lsi.steer.selection import DEFAULT_TAU, Reference, measured, reference

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel
    from lsi.core.steering import Steering

Goal = Literal["induce", "remove"]


@dataclass(frozen=True)
class SteerScores:
    """Exact rates measured under a steering (``None``: the organism has no such check)."""

    success: float
    generalization: float | None = None
    specificity: float | None = None
    fluency: float | None = None


@dataclass(frozen=True)
class SteerSplit:
    """Contrast sets (inputs ``lm.forward`` takes), the exact measure, and the held-out corpus for KL / Δloss.

    ``corpus_scored_from`` gives, per corpus row, the index of its first token whose prediction is scored (e.g. the
    first reply token after a prompt; the tokens before it are context only); ``None`` scores every next token.
    """

    positive: Any
    negative: Any
    measure: Callable[[LanguageModel], SteerScores]
    corpus: Any
    corpus_scored_from: Sequence[int] | None = None


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: methods may memoize per task
class SteerTask:
    organism: str
    name: str
    goal: Goal
    dev: SteerSplit
    test: SteerSplit
    positions: tuple[PositionSpec, ...] = ("last",)  # where the contrast sets show the behaviour (candidates)
    metrics: Mapping[str, str] = field(default_factory=dict)  # success / generalization / ... / corpus: meaning
    oracle: SteerScores | None = None  # the best possible, where the organism defines one
    oracle_note: str = ""  # what the oracle is, or why there is none
    tau: float = DEFAULT_TAU
    description: str = ""

    def __post_init__(self) -> None:
        if self.goal not in get_args(Goal):
            raise InputError(f"a goal in {get_args(Goal)}", repr(self.goal), "use 'induce' or 'remove'")
        if not self.tau > 0:
            raise InputError("a KL budget tau > 0 (nats)", repr(self.tau), "use e.g. tau=0.1")


@dataclass(frozen=True)
class Point:
    """One steering measured on a split: its settings, exact scores, KL(base ‖ steered) and Δ cross-entropy."""

    settings: dict[str, Any]
    scores: SteerScores
    kl: float
    dloss: float

    @property
    def success(self) -> float:
        """The target success (what :func:`best_at_kl` ranks by)."""
        return self.scores.success

    def as_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, **asdict(self.scores), "kl": self.kl, "dloss": self.dloss}


def split_reference(lm: LanguageModel, split: SteerSplit) -> Reference:
    """:func:`lsi.steer.selection.reference` of a split's corpus (call it outside any steering)."""
    return reference(lm, split.corpus, split.corpus_scored_from)


def measure(lm: LanguageModel, split: SteerSplit, ref: Reference, steering: Steering | None,
            settings: dict[str, Any] | None = None) -> Point:
    """Scores, KL and Δloss of ``lm`` under ``steering`` (``None``: unsteered) on a split."""
    scores, kl, dloss = measured(lm, steering, split.measure, ref)
    return Point(dict(settings or {}), scores, kl, dloss)
