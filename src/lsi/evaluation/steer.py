"""Steer tasks and how a steering is measured: exact scores on a split, side effects on unrelated text, and the
success-vs-KL curve point both :mod:`lsi.steer.selection` and the benchmark rank.

A task's ``goal`` is to ``"induce"`` a behaviour (move inputs towards the ``positive`` contrast set) or to
``"remove"`` it (take away what the positive set shows). Each split holds the contrast sets that methods derive
directions from (``positive`` inputs show the behaviour, ``negative`` ones do not), an exact ``measure`` of the
behaviour under whatever steering is active, and a held-out ``corpus`` for the side effects. Methods choose
everything (site, layer, read position) on ``dev``; the benchmark reports on ``test``.

``measure`` returns :class:`SteerScores`: target success (an exact rate, higher = more of the goal),
generalization (the same on held-out prompt kinds), specificity (neighbours that must not change) and fluency
(exact grammar validity); the last three are ``None`` where the organism has no such check. ``metrics`` says what
each one is for the task.

Side effects: ``KL(base ‖ steered)`` and ``Δ cross-entropy`` (nats, averaged over the corpus's scored next-token
positions) against a :func:`reference` run of the unsteered model (:func:`divergence`, :func:`measured`).

Example:
    >>> pts = [CurvePoint({"alpha": 1}, SteerScores(0.4), 0.02, 0.0),
    ...        CurvePoint({"alpha": 2}, SteerScores(0.9), 0.3, 0.1)]
    >>> best_at_kl(pts, tau=0.1).settings, best_at_kl(pts, tau=0.01)
    ({'alpha': 1}, None)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, get_args

import torch

from lsi.core.inputs import Batch
from lsi.core.positions import PositionSpec
from lsi.errors import InputError
from lsi.evaluation.functional import kl_divergence, next_token_logprobs

if TYPE_CHECKING:
    from lsi.core.inputs import Inputs
    from lsi.core.model import LanguageModel

DEFAULT_TAU = 0.1  # nats: the KL budget of "best target success at KL <= tau"
Goal = Literal["induce", "remove"]
T = TypeVar("T")


class Applicable(Protocol):
    """Anything applied to a model for the length of a ``with`` block (a steering)."""

    def apply(self, lm: LanguageModel) -> AbstractContextManager[Any]: ...


# -- scores and curve points ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SteerScores:
    """Exact rates measured under a steering (``None``: no such check)."""

    success: float
    generalization: float | None = None
    specificity: float | None = None
    fluency: float | None = None


@dataclass(frozen=True)
class CurvePoint:
    """One steering measured: its settings, scores, KL(base ‖ steered) and Δ cross-entropy (nats)."""

    settings: dict[str, Any]
    scores: SteerScores
    kl: float
    dloss: float

    @property
    def success(self) -> float:
        """The target success (what :func:`best_at_kl` ranks by)."""
        return self.scores.success

    def to_json(self) -> dict[str, Any]:
        """``{"settings", "success", "generalization", "specificity", "fluency", "kl", "dloss"}``."""
        return {"settings": self.settings, **asdict(self.scores), "kl": self.kl, "dloss": self.dloss}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CurvePoint:
        """The point of :meth:`to_json` (scores missing from ``data`` are ``None``)."""
        scores = SteerScores(data["success"], *(data.get(k) for k in ("generalization", "specificity", "fluency")))
        return cls(dict(data["settings"]), scores, data["kl"], data["dloss"])


def best_at_kl(points: Sequence[CurvePoint], tau: float) -> CurvePoint | None:
    """The point of highest success among those with ``KL <= tau`` (ties: lower KL, then the earlier point);
    ``None`` when no point is within the budget."""
    within = [p for p in points if p.kl <= tau]
    return max(within, key=lambda p: (p.success, -p.kl), default=None)


def check_tau(tau: float) -> None:
    """Refuse a KL budget that is not > 0."""
    if not tau > 0:
        raise InputError("a KL budget tau > 0 (nats)", repr(tau), "use e.g. tau=0.1")


# -- tasks ----------------------------------------------------------------------------------------------------------
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
        check_tau(self.tau)

    @property
    def sign(self) -> float:
        """+1 to induce the behaviour, −1 to remove it (the sign of an added direction)."""
        return 1.0 if self.goal == "induce" else -1.0


# -- side effects on unrelated text ---------------------------------------------------------------------------------
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


def reference(lm: LanguageModel, corpus: Inputs | Batch, scored_from: Sequence[int] | None = None) -> Reference:
    """Run the corpus once without steering (call it outside any steering). ``scored_from[row]``: the index of the
    row's first token whose prediction counts (e.g. a reply after a prompt); ``None`` scores every next token."""
    batch = lm.to_batch(corpus)
    scored = scored_positions(batch, scored_from)
    if not bool(scored.any()):
        raise InputError("a corpus with at least one scored next token", "none (rows of one token, or scored_from "
                         "past every row's end)", "pass longer texts")
    logprobs = next_token_logprobs(lm.forward(batch), dtype=torch.float64)[scored]
    return Reference(batch, scored, logprobs, batch.input_ids[:, 1:][scored])


def divergences(logits: torch.Tensor, ref: Reference) -> tuple[torch.Tensor, torch.Tensor]:
    """Per scored corpus position ``t``: ``KL_t = Σ_v p(v) (log p(v) − log q(v))`` and the cross-entropy change
    ``Δ_t = −log q(x_t+1) + log p(x_t+1)`` (nats, float64 ``[n]``), with ``p`` the base model and ``q`` the
    steered one (``logits`` on ``ref.batch``)."""
    logq = next_token_logprobs(logits, dtype=torch.float64)[ref.scored]
    logp = ref.logprobs
    targets = ref.targets[:, None]
    return kl_divergence(logp, logq), (logp.gather(-1, targets) - logq.gather(-1, targets))[:, 0]


def divergence(logits: torch.Tensor, ref: Reference) -> tuple[float, float]:
    """``(KL(base ‖ steered), Δ cross-entropy)`` in nats: the means of :func:`divergences` over the scored corpus
    positions."""
    kl, dloss = divergences(logits, ref)
    return float(kl.mean()), float(dloss.mean())


def measured(lm: LanguageModel, steering: Applicable | None, measure: Callable[[LanguageModel], T],
             ref: Reference) -> tuple[T, float, float]:
    """``(measure(lm), KL, Δloss)`` under ``steering`` (``None``: unsteered), the divergence on ``ref``'s corpus."""
    with steering.apply(lm) if steering is not None else nullcontext():
        value = measure(lm)
        kl, dloss = divergence(lm.forward(ref.batch), ref)
    return value, kl, dloss


def split_reference(lm: LanguageModel, split: SteerSplit) -> Reference:
    """:func:`reference` of a split's corpus (call it outside any steering)."""
    return reference(lm, split.corpus, split.corpus_scored_from)


def measure(lm: LanguageModel, split: SteerSplit, ref: Reference, steering: Applicable | None,
            settings: dict[str, Any] | None = None) -> CurvePoint:
    """Scores, KL and Δloss of ``lm`` under ``steering`` (``None``: unsteered) on a split."""
    scores, kl, dloss = measured(lm, steering, split.measure, ref)
    return CurvePoint(dict(settings or {}), scores, kl, dloss)
