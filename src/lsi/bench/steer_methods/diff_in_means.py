"""Steer methods built on the difference in means ``v = μ⁺ − μ⁻`` of a task's dev contrast sets
(:func:`lsi.steer.directions.diff_in_means_by_site`), read at every layer's input ``blocks.{l}.resid_pre`` and at
each of the task's read positions (vectors that are zero, e.g. the embedding of a template token, are left out).

- ``diff_in_means_addition`` (contrastive activation addition): ``Add(site, v, ±alpha)`` at every position
  of the chosen layer's input, for alpha in :data:`ALPHAS` (``+`` to induce the behaviour, ``−`` to remove it).
  The (layer, read position) is chosen on dev: the highest dev success within the task's KL budget over the same
  grid (each grid walked up only until it leaves the budget), ties → lower KL.
- ``directional_ablation`` (Arditi et al. 2024): :class:`~lsi.steer.directional.DirectionalAblation` of ``v̂`` at
  every layer's input and every attention and MLP output; the (layer, read position) whose ablation has the highest
  dev success within the KL budget (the lowest KL if none is within it). Removal tasks only.
- ``random`` (baseline): a Gaussian direction scaled to the norm of diff_in_means_addition's chosen ``v``, added at
  its site and strengths; graded as the mean over 3 draws.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from lsi.bench.steer_registry import Candidate, SteerMethod, register_steer_method
from lsi.bench.steer_tasks import SteerTask, split_reference
from lsi.core.interventions import Add
from lsi.core.steering import Steering
from lsi.errors import InputError
from lsi.steer.directional import DirectionalAblation
from lsi.steer.directions import diff_in_means_by_site
from lsi.steer.selection import grid, select

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel
    from lsi.core.positions import PositionSpec

ALPHAS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # multiples of v: the strength grid of every addition curve
Choice = tuple[str, "PositionSpec", torch.Tensor]  # (site, read position, v)
Steerings = Callable[[str, torch.Tensor], Iterable[tuple[dict[str, Any], Steering]]]  # (site, v) -> (settings, s)


@functools.lru_cache(maxsize=8)  # shared by every method of a task (tasks hash by identity)
def directions(lm: LanguageModel, task: SteerTask) -> tuple[Choice, ...]:
    """``μ⁺ − μ⁻`` of the dev contrast at every layer input and read position (non-zero vectors only), from one
    pass over each dev set per read position."""
    sites = [f"blocks.{layer}.resid_pre" for layer in range(lm.dims.n_layers)]
    by_position = [diff_in_means_by_site(lm, task.dev.positive, task.dev.negative, sites, positions=position)
                   for position in task.positions]
    out = [(site, position, by_site[site]) for site in sites
           for position, by_site in zip(task.positions, by_position, strict=True) if float(by_site[site].norm()) > 1e-6]
    if not out:
        raise InputError("dev contrast sets whose means differ at some layer input and read position",
                         f"identical means at every blocks.*.resid_pre and positions {list(task.positions)}",
                         "give the task positive and negative inputs that differ (or other read positions)")
    return tuple(out)


def choose_on_dev(lm: LanguageModel, task: SteerTask, steerings: Steerings,
                  choices: Sequence[Choice] | None = None) -> Choice:
    """The choice (default: :func:`directions`) whose candidates ``steerings(site, v)`` (one, or a strength grid
    ``({"alpha": a}, steering)`` walked up only until it leaves the KL budget) reach the highest dev success within
    the task's KL budget, ties → lower KL; without any candidate within it, the one of lowest KL
    (:func:`lsi.steer.selection.select` over every choice's candidates)."""
    options = directions(lm, task) if choices is None else tuple(choices)
    candidates = (({"choice": i, **settings}, steering) for i, (site, _, v) in enumerate(options)
                  for settings, steering in steerings(site, v))
    sel = select(lm, candidates, success=lambda model: task.dev.measure(model).success,
                 corpus=split_reference(lm, task.dev), tau=task.tau, stop_along="alpha")
    return options[(sel.best or sel.lowest_kl).settings["choice"]]


def _sign(task: SteerTask) -> float:
    return 1.0 if task.goal == "induce" else -1.0


def addition_grid(task: SteerTask) -> Steerings:
    """``(site, v) ->`` the additions ``Add(site, v, ±alpha)`` over :data:`ALPHAS` (``+`` to induce)."""
    sign = _sign(task)
    return lambda site, v: grid(lambda alpha: Add(site, v, sign * alpha), alpha=ALPHAS)


@functools.lru_cache(maxsize=8)  # shared with the random baseline (tasks hash by identity)
def addition_choice(lm: LanguageModel, task: SteerTask) -> Choice:
    """diff_in_means_addition's (site, read position, v), chosen on dev over the strength grid."""
    return choose_on_dev(lm, task, addition_grid(task))


def additions(lm: LanguageModel, task: SteerTask, site: str, vector: torch.Tensor,
              settings: dict[str, object]) -> list[Candidate]:
    """The candidates graded on test: ``Add(site, vector, ±alpha)`` for alpha in :data:`ALPHAS`."""
    sign = _sign(task)
    return [Candidate(Add(site, vector, sign * a, model=lm), {**settings, "site": site, "alpha": sign * a})
            for a in ALPHAS]


def _addition(lm: LanguageModel, task: SteerTask, seed: int) -> list[Candidate]:
    site, position, v = addition_choice(lm, task)
    return additions(lm, task, site, v, {"position": position, "norm": round(float(v.norm()), 4)})


def _random(lm: LanguageModel, task: SteerTask, seed: int) -> list[Candidate]:
    site, _, v = addition_choice(lm, task)
    gen = torch.Generator().manual_seed(random.Random(f"{task.organism}/{task.name}/{seed}").getrandbits(63))
    r = torch.randn(v.numel(), generator=gen)
    return additions(lm, task, site, r * (v.norm() / r.norm()), {"norm": round(float(v.norm()), 4)})


def _ablation(lm: LanguageModel, task: SteerTask, seed: int) -> list[Candidate]:
    site, position, v = choose_on_dev(lm, task, lambda site, v: [({}, DirectionalAblation(v))])
    return [Candidate(DirectionalAblation(v, model=lm), {"direction_site": site, "position": position})]


def _removal_only(task: SteerTask) -> str | None:
    return None if task.goal == "remove" else "ablation removes a direction; it cannot induce a behaviour"


register_steer_method(SteerMethod(
    "random", "a random direction with the norm of diff_in_means_addition's vector, at its site and strengths "
    "(mean over 3 draws)", _random, draws=3))
register_steer_method(SteerMethod(
    "diff_in_means_addition", "add ±alpha (μ⁺ − μ⁻) at one layer's input, all positions; layer and read position "
    "chosen on dev", _addition))
register_steer_method(SteerMethod(
    "directional_ablation", "project the diff-in-means direction out of every layer input and attention / MLP "
    "output; direction chosen on dev", _ablation, applies=_removal_only))
