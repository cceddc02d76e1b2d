"""Steer methods that add another vector than the difference in means, at the same sites, read positions and
strengths as ``diff_in_means_addition`` (:mod:`lsi.bench.steer_methods.diff_in_means`), each scaled to the norm of
the difference in means ``v = μ⁺ − μ⁻`` at its (layer, read position), so the strength grid means the same:

- ``pca_addition``: the first principal direction of the paired differences ``a_i − b_i`` of the dev contrast
  sets (:func:`lsi.steer.directions.pca_of_differences`; pair i = the i-th positive and the i-th negative input),
  its sign aligned with ``v``. Pairing needs as many positive as negative inputs; other tasks are skipped.
- ``probe_addition``: the weight vector of a logistic probe separating the dev contrast sets
  (:func:`lsi.steer.directions.probe_direction`, pointing towards the positive set).

The (layer, read position) is chosen on dev like diff_in_means_addition's (:func:`lsi.steer.selection.choose_on_dev`:
the highest dev success within the KL budget over the strength grid).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from lsi.bench.steer_methods.diff_in_means import addition_candidates, directions
from lsi.bench.steer_registry import Candidate, SteerMethod, register_steer_method
from lsi.steer.directions import pca_of_differences, probe_direction, site_features
from lsi.steer.selection import DevChoice, addition_grid, choose_on_dev

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel
    from lsi.core.positions import PositionSpec
    from lsi.evaluation.steer import SteerTask

Derive = Callable[["LanguageModel", "SteerTask", str, "PositionSpec", torch.Tensor], torch.Tensor]  # -> unit vector


def _pca(lm: LanguageModel, task: SteerTask, site: str, position: PositionSpec, v: torch.Tensor) -> torch.Tensor:
    pc = pca_of_differences(lm, task.dev.positive, task.dev.negative, site, positions=position)[0]
    return pc if float(pc @ v) >= 0 else -pc


def _probe(lm: LanguageModel, task: SteerTask, site: str, position: PositionSpec, v: torch.Tensor) -> torch.Tensor:
    positive = site_features(lm, task.dev.positive, site, positions=position)
    negative = site_features(lm, task.dev.negative, site, positions=position)
    labels = [1] * len(positive) + [0] * len(negative)
    return probe_direction(torch.cat([positive, negative]), labels, positive=1)


def scaled_choices(lm: LanguageModel, task: SteerTask, derive: Derive) -> list[DevChoice]:
    """Per diff-in-means choice ``(site, position, v)``: ``(site, position, |v| · derive(...))``."""
    return [DevChoice(site, position, derive(lm, task, site, position, v) * v.norm()) for site, position, v in
            directions(lm, task)]


def _method(derive: Derive) -> Callable[[LanguageModel, SteerTask, int], list[Candidate]]:
    def run(lm: LanguageModel, task: SteerTask, seed: int) -> list[Candidate]:
        site, position, vector = choose_on_dev(lm, task, addition_grid(task), scaled_choices(lm, task, derive))
        settings = {"position": position, "norm": round(float(vector.norm()), 4)}
        return addition_candidates(lm, task, site, vector, settings)

    return run


def _paired(task: SteerTask) -> str | None:
    n_pos, n_neg = len(task.dev.positive), len(task.dev.negative)
    if n_pos == n_neg:
        return None
    return (f"pairing is undefined: the dev contrast has {n_pos} positive and {n_neg} negative inputs (pairs need "
            "as many of each)")


register_steer_method(SteerMethod(
    "pca_addition", "add ±alpha × the first PC of paired dev differences (sign and norm of μ⁺ − μ⁻) at one layer's "
    "input; layer and read position chosen on dev", _method(_pca), applies=_paired))
register_steer_method(SteerMethod(
    "probe_addition", "add ±alpha × a logistic probe's weight vector (norm of μ⁺ − μ⁻) at one layer's input; layer "
    "and read position chosen on dev", _method(_probe)))
