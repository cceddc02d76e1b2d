"""Steer tasks: what an organism asks a steering to do, and how one steering is measured on it.

A task's ``goal`` is to ``"induce"`` a behaviour (move inputs towards the ``positive`` contrast set) or to
``"remove"`` it (take away what the positive set shows). Each split holds the contrast sets that methods derive
directions from (``positive`` inputs show the behaviour, ``negative`` ones do not), an exact ``measure`` of the
behaviour under whatever steering is active, and a held-out ``corpus`` for KL(base ‖ steered) and Δ cross-entropy.
Methods choose everything (site, layer, read position) on ``dev``; the benchmark reports on ``test``.

``measure`` returns :class:`SteerScores`: target success (an exact rate, higher = more of the goal),
generalization (the same on held-out prompt kinds), specificity (neighbours that must not change) and fluency
(exact grammar validity); the last three are ``None`` where the organism has no such check. ``metrics`` says what
each one is for the task.

Example:
    >>> best_at_kl([Point({"alpha": 1}, SteerScores(0.4), 0.02, 0.0), Point({"alpha": 2}, SteerScores(0.9), 0.3, 0.1)],
    ...            tau=0.1).settings
    {'alpha': 1}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch

from lsi.core.inputs import Batch
from lsi.core.positions import PositionSpec
from lsi.errors import InputError

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel
    from lsi.steer.base import Steering

Goal = Literal["induce", "remove"]
DEFAULT_TAU = 0.1  # nats: the KL budget of "best target success at KL <= tau"


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

    def as_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, **asdict(self.scores), "kl": self.kl, "dloss": self.dloss}


@dataclass(frozen=True)
class Reference:
    """The unsteered model on a corpus: log-probs ``[n, vocab]`` (float64) at every scored position (one whose
    next token is real and scored), those next tokens ``[n]``, and the ``[batch, pos - 1]`` mask selecting them."""

    batch: Batch
    scored: torch.Tensor
    logprobs: torch.Tensor
    targets: torch.Tensor


def scored_positions(batch: Batch, scored_from: Sequence[int] | None = None) -> torch.Tensor:
    """``[batch, pos - 1]``: True where position t predicts a real token t + 1 whose index among the row's real
    tokens is at least ``scored_from[row]`` (padding-side independent)."""
    mask = batch.attention_mask.bool()
    keep = mask[:, :-1] & mask[:, 1:]
    if scored_from is None:
        return keep
    first = torch.as_tensor(list(scored_from), dtype=torch.long, device=keep.device)
    if first.shape != (keep.shape[0],) or bool((first < 1).any()):
        raise InputError("one first scored token index >= 1 per corpus row", f"{first.tolist()[:10]} for "
                         f"{keep.shape[0]} rows", "give the index of each row's first scored token (e.g. the reply)")
    return keep & (batch.position_ids[:, 1:] >= first[:, None])


def _logprobs(logits: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    return logits[:, :-1].double().log_softmax(-1)[scored]


def reference(lm: LanguageModel, corpus: Any, scored_from: Sequence[int] | None = None) -> Reference:
    """Run the corpus once without steering (call it outside any steering)."""
    batch = lm.to_batch(corpus)
    scored = scored_positions(batch, scored_from)
    return Reference(batch, scored, _logprobs(lm.forward(batch), scored), batch.input_ids[:, 1:][scored])


def split_reference(lm: LanguageModel, split: SteerSplit) -> Reference:
    """:func:`reference` of a split's corpus."""
    return reference(lm, split.corpus, split.corpus_scored_from)


def divergence(logits: torch.Tensor, ref: Reference) -> tuple[float, float]:
    """``(KL(base ‖ steered), Δ cross-entropy)`` in nats, averaged over the scored corpus positions:
    ``KL = mean_t Σ_v p(v) (log p(v) − log q(v))`` and ``Δ = mean_t (−log q(x_t+1)) − mean_t (−log p(x_t+1))``
    with ``p`` the base model, ``q`` the steered one (``logits`` on ``ref.batch``)."""
    logq = _logprobs(logits, ref.scored)
    logp = ref.logprobs
    kl = (logp.exp() * (logp - logq)).sum(-1).mean()
    targets = ref.targets[:, None]
    dloss = logp.gather(-1, targets).mean() - logq.gather(-1, targets).mean()
    return float(kl), float(dloss)


def measure(lm: LanguageModel, split: SteerSplit, ref: Reference, steering: Steering | None,
            settings: dict[str, Any] | None = None) -> Point:
    """Scores, KL and Δloss of ``lm`` under ``steering`` (``None``: unsteered) on a split."""
    with steering.apply(lm) if steering is not None else nullcontext():
        scores = split.measure(lm)
        kl, dloss = divergence(lm.forward(ref.batch), ref)
    return Point(dict(settings or {}), scores, kl, dloss)


def best_at_kl(points: Sequence[Point], tau: float) -> Point | None:
    """The point of highest success among those with ``KL <= tau`` (ties: lower KL, then the earlier point);
    ``None`` when no point is within the budget."""
    within = [p for p in points if p.kl <= tau]
    return max(within, key=lambda p: (p.scores.success, -p.kl), default=None)
