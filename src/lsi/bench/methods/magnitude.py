"""Magnitude-analysis methods on the benchmark: LAPE and activation-frequency contrast (language neurons), Block
Influence and angular distance (redundant layers), attention-pattern scores (copying heads).

All of them are training-free and have no hyperparameter tuned on the benchmark: LAPE uses Tang et al.'s
quantiles (0.95), the contrast compares activation frequencies, the layer scores compare adjacent layers over
every real token, and a head's score is the larger of its previous-token and induction (prefix-matching) scores.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from lsi.bench.registry import LocateMethod, Scores, register_locate_method
from lsi.evaluation.locate import LocateTask
from lsi.locate.heads import induction_scores, previous_token_scores
from lsi.locate.layers import angular_distance, block_influence
from lsi.locate.magnitude import activation_contrast, activation_probability, lape_scores
from lsi.locate.result import LocateResult

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel

_LAYER = re.compile(r"^blocks\.\d+$")
_HEAD = re.compile(r"^blocks\.(\d+)\.attn\.(?:head_out|z|q)\[(\d+)\]$")
_NEURON = re.compile(r"^blocks\.\d+\.mlp\.post\[\d+\]$")


def _on_universe(task: LocateTask, result: LocateResult) -> Scores:
    scores = result.as_dict()
    return {u: scores[u] for u in task.universe}


def _needs(pattern: re.Pattern[str], what: str, datasets: bool = False) -> Callable[[LocateTask], str | None]:
    def applies(task: LocateTask) -> str | None:
        if not all(pattern.match(u) for u in task.universe):
            return f"needs a universe of {what}"
        if datasets and not {"target", "other"} <= set(task.test.datasets or {}):
            return "needs 'target' and 'other' datasets on the split"
        return None
    return applies


def _lape(lm: LanguageModel, task: LocateTask, seed: int) -> Scores:
    data = task.test.datasets or {}
    probs = activation_probability(lm, {"target": data["target"], "other": data["other"]})
    return _on_universe(task, lape_scores(probs, language="target"))


def _frequency_contrast(lm: LanguageModel, task: LocateTask, seed: int) -> Scores:
    data = task.test.datasets or {}
    return _on_universe(task, activation_contrast(lm, data["target"], data["other"], "blocks.*.mlp.post",
                                                  stat="frequency"))


def _block_influence(lm: LanguageModel, task: LocateTask, seed: int) -> Scores:
    with task.test.setting():
        return _on_universe(task, block_influence(lm, task.test.inputs))


def _angular_distance(lm: LanguageModel, task: LocateTask, seed: int) -> Scores:
    with task.test.setting():
        return _on_universe(task, angular_distance(lm, task.test.inputs, n=1))


def _head_scores(lm: LanguageModel, task: LocateTask, seed: int) -> Scores:
    with task.test.setting():
        prev, ind = previous_token_scores(lm, task.test.inputs), induction_scores(lm, task.test.inputs)
    best = prev.scores.maximum(ind.scores)
    return {u: float(best[int(m[1]), int(m[2])]) for u in task.universe if (m := _HEAD.match(u))}


for _method in (
    LocateMethod("lape", "LAPE (Tang et al.): low-entropy neurons active on the target language, −LAPE",
                 _lape, _needs(_NEURON, "MLP neurons", datasets=True)),
    LocateMethod("activation_contrast", "activation frequency on the target minus the other dataset, per neuron",
                 _frequency_contrast, _needs(_NEURON, "MLP neurons", datasets=True)),
    LocateMethod("block_influence", "Block Influence 1 − cos(x^l, x^{l+1}) over real tokens (ShortGPT)",
                 _block_influence, _needs(_LAYER, "layers 'blocks.{l}'")),
    LocateMethod("angular_distance", "angular distance arccos(cos(x^l, x^{l+1})) / π over real tokens",
                 _angular_distance, _needs(_LAYER, "layers 'blocks.{l}'")),
    LocateMethod("attention_head_scores", "max of previous-token and induction (prefix-matching) attention scores",
                 _head_scores, _needs(_HEAD, "attention heads")),
):
    register_locate_method(_method)
