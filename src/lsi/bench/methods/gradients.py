"""Gradient methods as locate methods: attribution patching, gradient × input and integrated gradients.

A component's score is |estimated ΔF| of the task metric on the test split (larger = more important):

- ``attribution_patching``: the denoising estimate (o_clean − o_corrupt) · ∇F|corrupt, each object at every
  position, normalized by F_clean − F_corrupt, on tasks with clean and corrupted runs. Denoising, as activation
  patching's method: at the clean run the behaviour is near its ceiling (copy log-prob ≈ −0.45, object
  probability ≈ 0.99), the gradient saturates, and the noising estimate misses most of the effect (on
  fact_world it ranks the planted MLP last).
- ``gradient_x_input``: the removal estimate ∇F · (o − õ) on the clean run (the split's inputs when it has
  none), with õ = 0 for sites (zero ablation) and õ = the layer's input for layers ``blocks.{i}`` (skipping it).
- ``integrated_gradients``: that path integrated (8 midpoint steps) per site, from the corrupted run's values
  into the clean run where the task has both runs, else from the removal baseline.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from lsi.bench.registry import LocateMethod, Scores, register_locate_method
from lsi.bench.tasks import needs_contrast_sites, needs_sites, task_metric
from lsi.core.runs import Run
from lsi.core.sites import Site
from lsi.evaluation.locate import LocateTask
from lsi.locate.gradients import attribution_patching, gradient_x_input, integrated_gradients

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel

IG_STEPS = 8
_LAYER = re.compile(r"^blocks\.(\d+)$")


def _layers(task: LocateTask) -> list[int] | None:
    """The layer indices of a ``blocks.{i}`` universe, else ``None``."""
    found = [_LAYER.match(u) for u in task.universe]
    return [int(m.group(1)) for m in found if m] if all(found) else None


def _sites_or_layers(task: LocateTask) -> str | None:
    return None if _layers(task) is not None else needs_sites(task)


def _objects(task: LocateTask) -> tuple[list[str], dict[str, str]]:
    """The sites to score and the universe label of each result label (layers map to their output)."""
    layers = _layers(task)
    if layers is None:
        return list(task.universe), {u: u for u in task.universe}
    return [f"blocks.{i}.resid_post" for i in layers], {f"blocks.{i}.resid_post": f"blocks.{i}" for i in layers}


def _removal_baseline(lm: LanguageModel, task: LocateTask, run: Run) -> Any:
    """Zeros for sites; for layers, each layer's input as the baseline of its output (a skipped layer)."""
    layers = _layers(task)
    if layers is None:
        return "zeros"
    with run.setting():
        cache = lm.run_with_cache(run.inputs, [f"blocks.{i}.resid_pre" for i in layers])
    return {f"blocks.{i}.resid_post": cache[f"blocks.{i}.resid_pre"] for i in layers}


def _abs_scores(scores: dict[str, float], labels: dict[str, str]) -> Scores:
    return {labels[k]: abs(v) for k, v in scores.items() if k in labels}


def _run_attribution_patching(lm: LanguageModel, task: LocateTask, seed: int) -> Scores:
    split = task.test
    assert split.clean is not None and split.corrupted is not None
    result = attribution_patching(lm, split.clean, split.corrupted, task_metric(split), list(task.universe),
                                  direction="denoise")
    return _abs_scores(result.as_dict(), {u: u for u in task.universe})


def _run_gradient_x_input(lm: LanguageModel, task: LocateTask, seed: int) -> Scores:
    split = task.test
    run = split.clean or Run(split.inputs, split.setting)
    sites, labels = _objects(task)
    baseline = _removal_baseline(lm, task, run)
    with run.setting():
        result = gradient_x_input(lm, run.inputs, task_metric(split), sites, baseline=baseline)
    return _abs_scores(result.as_dict(), labels)


def _run_integrated_gradients(lm: LanguageModel, task: LocateTask, seed: int) -> Scores:
    split = task.test
    sites, labels = _objects(task)
    groups = list(dict.fromkeys(str(Site.parse(s).without_index()) for s in sites))
    run = split.clean or Run(split.inputs, split.setting)
    if split.clean is not None and split.corrupted is not None:
        with split.corrupted.setting():
            baseline: Any = lm.run_with_cache(split.corrupted.inputs, groups)
    else:
        baseline = _removal_baseline(lm, task, run)
    scores: dict[str, float] = {}
    with run.setting():
        for site in groups:
            scores |= integrated_gradients(lm, run.inputs, task_metric(split), site, baseline=baseline, steps=IG_STEPS,
                                           steps_per_batch=4).as_dict()
    return _abs_scores(scores, labels)


register_locate_method(LocateMethod(
    "attribution_patching", "first-order denoising estimate (o_clean - o_corrupt) . grad F|corrupt, all positions",
    _run_attribution_patching, needs_contrast_sites))
register_locate_method(LocateMethod(
    "gradient_x_input", "first-order removal estimate grad F . (o - baseline): zeros for sites, the input for layers",
    _run_gradient_x_input, _sites_or_layers))
register_locate_method(LocateMethod(
    "integrated_gradients", f"integrated gradients ({IG_STEPS} midpoint steps) from the corrupted run or the removal "
    "baseline", _run_integrated_gradients, _sites_or_layers))
