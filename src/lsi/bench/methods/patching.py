"""Causal attribution in the ground-truth benchmark: activation patching and mean / resample ablation.

- ``activation_patching``: denoising (each object's clean value patched into the corrupted run, every position at
  once); importance = |normalized score| = |F_patched − F_corrupt| / |F_clean − F_corrupt|, since a patch that
  moves the metric either way shows the object matters (on induction, the clean previous-token head alone makes
  the induction heads attend to the corrupted first copy and lowers F). Tasks with clean and corrupted runs.
- ``activation_patching_noising``: the noising direction (corrupted value into the clean run); importance =
  |1 − normalized score| = |F_patched − F_clean| / |F_clean − F_corrupt|.
- ``mean_ablation`` / ``resample_ablation``: |ΔF| on the test inputs when one head or neuron takes its mean over
  the dev inputs / the values of a random dev input at the same positions; tasks whose universe is heads or
  neurons. Reference statistics come from the dev split, effects are measured on the test split.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lsi.bench.registry import LocateMethod, Scores, register_locate_method
from lsi.bench.tasks import needs_contrast_sites, needs_sites, task_metric, universe_sites
from lsi.core.runs import Run
from lsi.evaluation.locate import LocateTask
from lsi.locate.patching import AblationKind, Direction, ablation, activation_patching

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel


def _units(task: LocateTask) -> str | None:
    sites = universe_sites(task)
    if sites is None:
        return needs_sites(task)
    return "universe is not heads or neurons" if any(s.index is None for s in sites) else None


def _patching(direction: Direction) -> Any:
    def run(lm: LanguageModel, task: LocateTask, seed: int) -> Scores:
        split = task.test
        result = activation_patching(lm, split.clean, split.corrupted, task_metric(split), list(task.universe),
                                     direction=direction)
        unchanged = 0.0 if direction == "denoise" else 1.0  # the normalized score of an object without effect
        return {u: abs(s - unchanged) for u, s in result.as_dict().items()}

    return run


def _ablation(kind: AblationKind) -> Any:
    def run(lm: LanguageModel, task: LocateTask, seed: int) -> Scores:
        split = task.test
        result = ablation(lm, Run(split.inputs, split.setting), task_metric(split), list(task.universe), kind=kind,
                          reference=task.dev.inputs, seed=seed)
        return {u: abs(s) for u, s in result.as_dict().items()}

    return run


register_locate_method(LocateMethod(
    "activation_patching", "denoising activation patching (clean object into the corrupted run), |normalized|",
    _patching("denoise"), applies=needs_contrast_sites))
register_locate_method(LocateMethod(
    "activation_patching_noising", "noising activation patching (corrupted object into the clean run), "
    "|1 - normalized|", _patching("noise"), applies=needs_contrast_sites))
register_locate_method(LocateMethod(
    "mean_ablation", "|ΔF| when one head / neuron takes its mean over the dev inputs", _ablation("mean"),
    applies=_units))
register_locate_method(LocateMethod(
    "resample_ablation", "|ΔF| when one head / neuron takes a random dev input's values", _ablation("resample"),
    applies=_units))
