"""Steer methods built on the difference in means ``v = μ⁺ − μ⁻`` of a task's dev contrast sets
(:func:`lsi.steer.directions.diff_in_means_by_site`), read at every layer's input ``blocks.{l}.resid_pre`` and at
each of the task's read positions (vectors that are zero, e.g. the embedding of a template token, are left out).

- ``diff_in_means_addition`` (contrastive activation addition): ``Add(site, v, ±alpha)`` at every position
  of the chosen layer's input, for alpha in :data:`lsi.steer.selection.ADDITION_ALPHAS` (``+`` to induce the
  behaviour, ``−`` to remove it). The (layer, read position) is chosen on dev by
  :func:`lsi.steer.selection.choose_on_dev`: the highest dev success within the task's KL budget over the same
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
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from lsi.bench.steer_registry import Candidate, SteerMethod, register_steer_method
from lsi.steer.directional import DirectionalAblation
from lsi.steer.selection import DevChoice, addition_grid, additions, choose_on_dev, contrast_directions

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel
    from lsi.evaluation.steer import SteerTask

directions = functools.lru_cache(maxsize=8)(contrast_directions)  # shared by every method of a task (by identity)


@functools.lru_cache(maxsize=8)  # shared with the random baseline (tasks hash by identity)
def addition_choice(lm: LanguageModel, task: SteerTask) -> DevChoice:
    """diff_in_means_addition's (site, read position, v), chosen on dev over the strength grid."""
    return choose_on_dev(lm, task, addition_grid(task), directions(lm, task))


def addition_candidates(lm: LanguageModel, task: SteerTask, site: str, vector: torch.Tensor,
              settings: Mapping[str, object]) -> list[Candidate]:
    """The candidates graded on test (:func:`lsi.steer.selection.additions`), with ``settings`` first."""
    return [Candidate(steering, {**settings, **at}) for at, steering in additions(lm, task, site, vector)]


def _addition(lm: LanguageModel, task: SteerTask, seed: int) -> list[Candidate]:
    site, position, v = addition_choice(lm, task)
    return addition_candidates(lm, task, site, v, {"position": position, "norm": round(float(v.norm()), 4)})


def _random(lm: LanguageModel, task: SteerTask, seed: int) -> list[Candidate]:
    site, _, v = addition_choice(lm, task)
    gen = torch.Generator().manual_seed(random.Random(f"{task.organism}/{task.name}/{seed}").getrandbits(63))
    r = torch.randn(v.numel(), generator=gen)
    return addition_candidates(lm, task, site, r * (v.norm() / r.norm()), {"norm": round(float(v.norm()), 4)})


def _ablation(lm: LanguageModel, task: SteerTask, seed: int) -> list[Candidate]:
    site, position, v = choose_on_dev(lm, task, lambda site, v: [({}, DirectionalAblation(v))], directions(lm, task))
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
