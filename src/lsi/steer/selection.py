"""Selection under a side-effect budget: choose a steering's layer, strength and subset on a dev split.

Every candidate steering is measured once: its target ``success`` (any score of the model under the steering,
higher is better) and its side effects on unrelated text, ``KL(base ‖ steered)`` and ``Δ cross-entropy`` (nats,
averaged over the corpus's scored next-token positions). The chosen candidate is the one of highest success with
``KL <= tau`` (ties: lower KL, then the earlier candidate); :meth:`Selection.report` measures it on a test split.

* :func:`grid` builds candidates over named axes (layer, strength, subset size, ...): ``make(**settings)``;
* :func:`select` measures them and keeps the whole success-vs-KL curve (``stop_along="alpha"`` skips, within each
  group of candidates that differ only in ``alpha``, every one at least as strong as one that left the budget);
* :func:`divergence` / :func:`reference` / :func:`best_at_kl` are the pieces, for callers with their own loop.

Run :func:`select` outside any steering: the corpus's reference distribution is the model as it is then.

Example:
    >>> import lsi, torch
    >>> from lsi.testing import tiny_model
    >>> lm = lsi.LanguageModel(tiny_model("llama"))
    >>> v = torch.randn(32, generator=torch.Generator().manual_seed(0))
    >>> candidates = grid(lambda layer, alpha: lsi.Add(f"blocks.{layer}.resid_pre", v, alpha, model=lm),
    ...                   layer=[0, 1], alpha=[0.5, 1.0, 2.0])
    >>> p_token_7 = lambda m: float(m.forward([[5, 6, 7]])[0, -1].softmax(-1)[7])
    >>> sel = select(lm, candidates, success=p_token_7, corpus=[[3, 4, 5, 6, 7, 8]], tau=0.01)
    >>> len(sel.curve), sel.best is None or sel.best.kl <= 0.01
    (6, True)
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import torch

from lsi.core.bundle import write_json_atomic
from lsi.core.inputs import Batch
from lsi.core.steering import Steering
from lsi.errors import InputError
from lsi.locate.result import jsonable

if TYPE_CHECKING:
    from lsi.core.inputs import Inputs
    from lsi.core.model import LanguageModel

DEFAULT_TAU = 0.1  # nats: the KL budget of "best target success at KL <= tau"
FORMAT = 1
T = TypeVar("T")


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


def _logprobs(logits: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    return logits[:, :-1].double().log_softmax(-1)[scored]


def reference(lm: LanguageModel, corpus: Inputs | Batch, scored_from: Sequence[int] | None = None) -> Reference:
    """Run the corpus once without steering (call it outside any steering). ``scored_from[row]``: the index of the
    row's first token whose prediction counts (e.g. a reply after a prompt); ``None`` scores every next token."""
    batch = lm.to_batch(corpus)
    scored = scored_positions(batch, scored_from)
    if not bool(scored.any()):
        raise InputError("a corpus with at least one scored next token", "none (rows of one token, or scored_from "
                         "past every row's end)", "pass longer texts")
    return Reference(batch, scored, _logprobs(lm.forward(batch), scored), batch.input_ids[:, 1:][scored])


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


def measured(lm: LanguageModel, steering: Steering | None, measure: Callable[[LanguageModel], T],
             ref: Reference) -> tuple[T, float, float]:
    """``(measure(lm), KL, Δloss)`` under ``steering`` (``None``: unsteered), the divergence on ``ref``'s corpus."""
    with steering.apply(lm) if steering is not None else nullcontext():
        value = measure(lm)
        kl, dloss = divergence(lm.forward(ref.batch), ref)
    return value, kl, dloss


# -- the curve and its best point -----------------------------------------------------------------------------------
class Scored(Protocol):
    """Anything with a target success and a KL (curve points of the library and of the benchmark)."""

    @property
    def success(self) -> float: ...

    @property
    def kl(self) -> float: ...


P = TypeVar("P", bound=Scored)


def best_at_kl(points: Sequence[P], tau: float) -> P | None:
    """The point of highest success among those with ``KL <= tau`` (ties: lower KL, then the earlier point);
    ``None`` when no point is within the budget.

    Example:
        >>> pts = [CurvePoint({"alpha": 1}, 0.4, 0.02, 0.0), CurvePoint({"alpha": 2}, 0.9, 0.3, 0.1)]
        >>> best_at_kl(pts, 0.1).settings, best_at_kl(pts, 0.01)
        ({'alpha': 1}, None)
    """
    within = [p for p in points if p.kl <= tau]
    return max(within, key=lambda p: (p.success, -p.kl), default=None)


@dataclass(frozen=True)
class CurvePoint:
    """One candidate measured: its settings, target success, KL(base ‖ steered) and Δ cross-entropy (nats)."""

    settings: dict[str, Any]
    success: float
    kl: float
    dloss: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_tau(tau: float) -> None:
    if not tau > 0:
        raise InputError("a KL budget tau > 0 (nats)", repr(tau), "use e.g. tau=0.1")


def _as_reference(lm: LanguageModel, corpus: Inputs | Batch | Reference,
                  scored_from: Sequence[int] | None) -> Reference:
    return corpus if isinstance(corpus, Reference) else reference(lm, corpus, scored_from)


def _success(fn: Callable[[LanguageModel], float]) -> Callable[[LanguageModel], float]:
    def checked(lm: LanguageModel) -> float:
        value = float(fn(lm))
        if not math.isfinite(value):
            raise InputError("a finite success score", repr(value), "make success(lm) return a finite float")
        return value

    return checked


@dataclass(frozen=True)
class Selection:
    """The success-vs-KL curve of every measured candidate and the best one within ``tau``.

    ``steerings[i]`` made ``curve[i]`` (a loaded selection keeps only the saved one, the others are ``None``);
    ``skipped`` lists the settings of candidates left out by early stopping.
    """

    curve: tuple[CurvePoint, ...]
    steerings: tuple[Steering | None, ...]
    tau: float
    skipped: tuple[dict[str, Any], ...] = ()

    @property
    def best(self) -> CurvePoint | None:
        """The most successful point with ``KL <= tau`` (ties: lower KL); ``None`` when none is within it."""
        return best_at_kl(self.curve, self.tau)

    @property
    def lowest_kl(self) -> CurvePoint:
        """The point of lowest KL (what to look at when :attr:`best` is ``None``)."""
        return min(self.curve, key=lambda p: p.kl)

    @property
    def steering(self) -> Steering | None:
        """The steering of :attr:`best` (``None`` when no candidate is within the budget)."""
        best = self.best
        return None if best is None else self.steering_of(best)

    def steering_of(self, point: CurvePoint) -> Steering:
        """The steering that made ``point`` (one of :attr:`curve`)."""
        steering = self.steerings[self._index(point)]
        if steering is None:
            raise InputError(f"the steering of {point.settings}", "none kept (a loaded selection keeps only the one "
                             "it saved)", "run select again to get every candidate's steering")
        return steering

    def _index(self, point: CurvePoint) -> int:
        index = next((i for i, p in enumerate(self.curve) if p is point), None)
        if index is None:
            raise InputError("a point of this selection's curve", repr(point), "pass one of sel.curve")
        return index

    def _chosen(self) -> tuple[CurvePoint, Steering]:
        best = self.best
        if best is None:
            low = self.lowest_kl
            raise InputError(f"a candidate within the KL budget tau={self.tau:g}",
                             f"none of {len(self.curve)} (lowest KL {low.kl:.4g} at {low.settings})",
                             "raise tau, or add weaker candidates (lower strengths, earlier layers)")
        return best, self.steering_of(best)

    def report(self, lm: LanguageModel, *, success: Callable[[LanguageModel], float],
               corpus: Inputs | Batch | Reference, scored_from: Sequence[int] | None = None) -> CurvePoint:
        """The chosen steering measured on a test split (its ``success`` and KL / Δloss on ``corpus``)."""
        best, steering = self._chosen()
        ref = _as_reference(lm, corpus, scored_from)
        value, kl, dloss = measured(lm, steering, _success(success), ref)
        return CurvePoint(dict(best.settings), value, kl, dloss)

    def save(self, path: str | Path) -> Path:
        """Write the chosen steering as :meth:`Steering.save` does (``path.json`` + ``path.safetensors``, so
        :meth:`Steering.load` reads it too), with the curve under ``"selection"`` in the JSON. Without a point
        within the budget, the lowest-KL one's steering is saved. Returns the JSON path."""
        point = self.best or self.lowest_kl
        target = self.steering_of(point).save(path)
        meta = json.loads(target.read_text())
        meta["selection"] = {"format": FORMAT, "tau": self.tau, "saved": self._index(point),
                             "curve": [jsonable(p.as_dict()) for p in self.curve],
                             "skipped": jsonable(list(self.skipped))}
        return write_json_atomic(target, meta)

    @classmethod
    def load(cls, path: str | Path, lm: LanguageModel) -> Selection:
        """Read a selection written by :meth:`save` (its steering checked against ``lm``)."""
        steering = Steering.load(path, lm)
        record = json.loads(Path(path).with_suffix(".json").read_text()).get("selection")
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise InputError(f"a selection written by Selection.save (format {FORMAT})",
                             "a steering without a selection record" if record is None else
                             f"format {record.get('format')!r}", "load it with Steering.load, or save the "
                             "selection with sel.save(path)")
        curve = tuple(CurvePoint(**p) for p in record["curve"])
        steerings = tuple(steering if i == record["saved"] else None for i in range(len(curve)))
        return cls(curve, steerings, float(record["tau"]), tuple(record["skipped"]))

    def __str__(self) -> str:
        best = self.best
        if best is None:
            low = self.lowest_kl
            return (f"Selection: no candidate of {len(self.curve)} within KL <= {self.tau:g}; lowest KL "
                    f"{low.kl:.4g} (success {low.success:.4g}) at {low.settings}")
        return (f"Selection: success {best.success:.4g} at KL {best.kl:.4g} <= {self.tau:g} (dloss "
                f"{best.dloss:+.4g}) at {best.settings}, best of {len(self.curve)} measured")


# -- building and measuring candidates ------------------------------------------------------------------------------
def grid(make: Callable[..., Steering], **axes: Iterable[Any]) -> Iterator[tuple[dict[str, Any], Steering]]:
    """Candidates ``(settings, make(**settings))`` over the product of the named axes, the last axis varying
    fastest (put the strength last, in increasing order, for ``select(..., stop_along=...)``). Steerings are
    made as the candidates are consumed.

    Example:
        >>> [s for s, _ in grid(lambda layer, alpha: None, layer=[0, 1], alpha=[1, 2])]
        [{'layer': 0, 'alpha': 1}, {'layer': 0, 'alpha': 2}, {'layer': 1, 'alpha': 1}, {'layer': 1, 'alpha': 2}]
    """
    values = {name: list(v) for name, v in axes.items()}
    empty = [name for name, v in values.items() if not v]
    if not values or empty:
        raise InputError("at least one axis, each with at least one value", f"empty axes {empty}" if empty else
                         "no axes", "e.g. grid(make, layer=[2, 3], alpha=[1.0, 2.0])")
    combos = (dict(zip(values, combo, strict=True)) for combo in itertools.product(*values.values()))
    return ((settings, make(**settings)) for settings in combos)


def _group(settings: Mapping[str, Any], axis: str) -> str:
    return repr(sorted((k, repr(v)) for k, v in settings.items() if k != axis))


def _strength(settings: Mapping[str, Any], axis: str) -> float:
    value = settings[axis]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"a number for the early-stopping axis {axis!r}", repr(value),
                         "stop along a numeric strength axis, or pass stop_along=None")
    return abs(float(value))


def select(lm: LanguageModel, candidates: Iterable[tuple[Mapping[str, Any], Steering]], *,
           success: Callable[[LanguageModel], float], corpus: Inputs | Batch | Reference, tau: float = DEFAULT_TAU,
           scored_from: Sequence[int] | None = None, stop_along: str | None = None) -> Selection:
    """Measure every candidate ``(settings, steering)``: ``success(lm)`` under the steering (higher is better)
    and KL / Δloss on ``corpus`` (text or ids, or a :func:`reference`; ``scored_from`` as in :func:`reference`).

    ``stop_along`` (e.g. ``"alpha"``): once a candidate leaves the budget, later candidates that differ from it
    only in that axis and are at least as strong (``|value|``) are skipped (listed in ``Selection.skipped``).
    Candidates without the axis are always measured.
    """
    _check_tau(tau)
    ref = _as_reference(lm, corpus, scored_from)
    score = _success(success)
    curve: list[CurvePoint] = []
    steerings: list[Steering | None] = []
    skipped: list[dict[str, Any]] = []
    beyond: dict[str, float] = {}  # group -> weakest |strength| found beyond the budget
    for settings, steering in candidates:
        axis = stop_along if stop_along is not None and stop_along in settings else None
        if axis is not None:
            group, strength = _group(settings, axis), _strength(settings, axis)
            if strength >= beyond.get(group, math.inf):
                skipped.append(dict(settings))
                continue
        value, kl, dloss = measured(lm, steering, score, ref)
        curve.append(CurvePoint(dict(settings), value, kl, dloss))
        steerings.append(steering)
        if axis is not None and kl > tau:
            beyond[group] = min(beyond.get(group, math.inf), strength)
    if not curve:
        raise InputError("at least one candidate (settings, steering)", "none", "pass candidates, e.g. "
                         "grid(make, layer=[...], alpha=[...])")
    return Selection(tuple(curve), tuple(steerings), tau, tuple(skipped))
