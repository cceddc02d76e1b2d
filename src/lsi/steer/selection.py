"""Selection under a side-effect budget: choose a steering's layer, strength and subset on a dev split.

Every candidate steering is measured once: its target ``success`` (any score of the model under the steering,
higher is better) and its side effects on unrelated text, ``KL(base ‖ steered)`` and ``Δ cross-entropy`` (nats,
averaged over the corpus's scored next-token positions). The chosen candidate is the one of highest success with
``KL <= tau`` (ties: lower KL, then the earlier candidate); :meth:`Selection.report` measures it on a test split.

* :func:`grid` builds candidates over named axes (layer, strength, subset size, ...): ``make(**settings)``;
* :func:`select` measures them and keeps the whole success-vs-KL curve (``stop_along="alpha"`` skips, within each
  group of candidates that differ only in ``alpha``, every one at least as strong as one that left the budget);
* recipes on a :class:`~lsi.evaluation.steer.SteerTask`'s dev split: :func:`contrast_directions` (``μ⁺ − μ⁻`` at
  every layer input and read position), :func:`choose_on_dev` (the site / read position whose candidates do best
  within the KL budget), :func:`addition_grid` and :func:`additions` (the strength grid :data:`ADDITION_ALPHAS`);
  the refusal-direction protocol is :func:`lsi.steer.refusal.select_refusal_direction`;
* the pieces, for callers with their own loop (``reference``, ``divergence``, ``measured``, ``best_at_kl``,
  ``CurvePoint``), live in :mod:`lsi.evaluation.steer`.

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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from lsi.core.bundle import bundle_files, write_json_atomic
from lsi.core.interventions import Add
from lsi.core.positions import PositionSpec
from lsi.core.steering import Steering
from lsi.errors import InputError
from lsi.evaluation.steer import (
    DEFAULT_TAU,
    CurvePoint,
    Reference,
    SteerScores,
    SteerTask,
    best_at_kl,
    check_tau,
    measured,
    reference,
    split_reference,
)
from lsi.locate.result import jsonable
from lsi.steer.directions import diff_in_means_by_site

if TYPE_CHECKING:
    from lsi.core.inputs import Batch, Inputs
    from lsi.core.model import LanguageModel

FORMAT = 1


# -- the selection ----------------------------------------------------------------------------------------------------
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
        return CurvePoint(dict(best.settings), SteerScores(value), kl, dloss)

    def save(self, path: str | Path) -> Path:
        """Write the chosen steering as :meth:`Steering.save` does (``path.json`` + ``path.safetensors``, so
        :meth:`Steering.load` reads it too), with the curve under ``"selection"`` in the JSON. Without a point
        within the budget, the lowest-KL one's steering is saved. Returns the JSON path."""
        point = self.best or self.lowest_kl
        target = self.steering_of(point).save(path)
        meta = json.loads(target.read_text())
        meta["selection"] = {"format": FORMAT, "tau": self.tau, "saved": self._index(point),
                             "curve": [jsonable(p.to_json()) for p in self.curve],
                             "skipped": jsonable(list(self.skipped))}
        return write_json_atomic(target, meta)

    @classmethod
    def load(cls, path: str | Path, lm: LanguageModel) -> Selection:
        """Read a selection written by :meth:`save` (its steering checked against ``lm``)."""
        steering = Steering.load(path, lm)
        record = json.loads(bundle_files(path)[0].read_text()).get("selection")
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise InputError(f"a selection written by Selection.save (format {FORMAT})",
                             "a steering without a selection record" if record is None else
                             f"format {record.get('format')!r}", "load it with Steering.load, or save the "
                             "selection with sel.save(path)")
        curve = tuple(CurvePoint.from_json(p) for p in record["curve"])
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
    check_tau(tau)
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
        curve.append(CurvePoint(dict(settings), SteerScores(value), kl, dloss))
        steerings.append(steering)
        if axis is not None and kl > tau:
            beyond[group] = min(beyond.get(group, math.inf), strength)
    if not curve:
        raise InputError("at least one candidate (settings, steering)", "none", "pass candidates, e.g. "
                         "grid(make, layer=[...], alpha=[...])")
    return Selection(tuple(curve), tuple(steerings), tau, tuple(skipped))


# -- recipes: choices made on a task's dev split --------------------------------------------------------------------
ADDITION_ALPHAS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # multiples of a direction: the strength grid of an addition
Steerings = Callable[[str, torch.Tensor], Iterable[tuple[dict[str, Any], Steering]]]  # (site, v) -> candidates


class DevChoice(NamedTuple):
    """Where to steer, chosen on dev: the site, the read position the direction was read at, and the vector."""

    site: str
    position: PositionSpec
    vector: torch.Tensor


def contrast_directions(lm: LanguageModel, task: SteerTask) -> tuple[DevChoice, ...]:
    """``μ⁺ − μ⁻`` of the task's dev contrast sets at every layer input ``blocks.{l}.resid_pre`` and each of the
    task's read positions (non-zero vectors only), from one pass over each dev set per read position.

    Example:
        >>> choices = contrast_directions(lm, task)  # doctest: +SKIP
        >>> choices[0].site, choices[0].position  # doctest: +SKIP
        ('blocks.0.resid_pre', 'last')
    """
    sites = [f"blocks.{layer}.resid_pre" for layer in range(lm.dims.n_layers)]
    by_position = [diff_in_means_by_site(lm, task.dev.positive, task.dev.negative, sites, positions=position)
                   for position in task.positions]
    out = [DevChoice(site, position, by_site[site]) for site in sites
           for position, by_site in zip(task.positions, by_position, strict=True) if float(by_site[site].norm()) > 1e-6]
    if not out:
        raise InputError("dev contrast sets whose means differ at some layer input and read position",
                         f"identical means at every blocks.*.resid_pre and positions {list(task.positions)}",
                         "give the task positive and negative inputs that differ (or other read positions)")
    return tuple(out)


def addition_grid(task: SteerTask) -> Steerings:
    """``(site, v) ->`` the additions ``Add(site, v, ±alpha)`` over :data:`ADDITION_ALPHAS` (``+`` to induce,
    ``−`` to remove), settings ``{"alpha": alpha}``, for :func:`choose_on_dev`."""
    return lambda site, v: grid(lambda alpha: Add(site, v, task.sign * alpha), alpha=ADDITION_ALPHAS)


def additions(lm: LanguageModel, task: SteerTask, site: str, vector: torch.Tensor) -> list[tuple[dict[str, Any],
                                                                                                 Steering]]:
    """The addition curve of a chosen direction: ``({"site", "alpha"}, Add(site, vector, alpha))`` for
    ``alpha = ±a``, ``a`` in :data:`ADDITION_ALPHAS` (``+`` to induce)."""
    return [({"site": site, "alpha": task.sign * a}, Add(site, vector, task.sign * a, model=lm))
            for a in ADDITION_ALPHAS]


def choose_on_dev(lm: LanguageModel, task: SteerTask, steerings: Steerings,
                  choices: Sequence[DevChoice] | None = None) -> DevChoice:
    """The choice (default: :func:`contrast_directions`) whose candidates ``steerings(site, v)`` reach the highest
    dev success within the task's KL budget, ties → lower KL; without any candidate within it, the one of lowest
    KL. A strength grid (settings with ``"alpha"``, e.g. :func:`addition_grid`) is walked up only until it leaves
    the budget (:func:`select` with ``stop_along="alpha"`` over every choice's candidates).

    Example:
        >>> site, position, v = choose_on_dev(lm, task, addition_grid(task))  # doctest: +SKIP
        >>> ablate = choose_on_dev(lm, task, lambda site, v: [({}, DirectionalAblation(v))])  # doctest: +SKIP
    """
    options = contrast_directions(lm, task) if choices is None else tuple(choices)
    candidates = (({"choice": i, **settings}, steering) for i, (site, _, v) in enumerate(options)
                  for settings, steering in steerings(site, v))
    sel = select(lm, candidates, success=lambda model: task.dev.measure(model).success,
                 corpus=split_reference(lm, task.dev), tau=task.tau, stop_along="alpha")
    return options[(sel.best or sel.lowest_kl).settings["choice"]]
