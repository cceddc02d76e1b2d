"""Circuit discovery graded by its node scores: EAP, EAP-IG and ACDC over the residual DAG.

Each method scores every edge between the task's clean and corrupted test runs with the task's metric, then each
node by the summed ``|score|`` of its incident edges (incoming and outgoing: on the dev splits "both" matched or
beat either direction alone on every task). They apply to tasks with clean and corrupted runs whose universe is
circuit nodes (heads, MLP outputs). ACDC needs one forward per edge, so it runs only on head universes (the
induction graph has 110 edges; the fact-world graph's 479 take about a minute single-threaded).

Settings (fixed, chosen on the dev splits): EAP-IG with 5 steps; ACDC with ``threshold = 0.01 ×
|m(clean) − m(corrupt)|``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from lsi.bench.registry import LocateMethod, MethodOutput, register_locate_method
from lsi.bench.tasks import needs_contrast, task_metric
from lsi.locate.circuits import acdc, eap, eap_ig, faithfulness_curve, node_scores

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel
    from lsi.evaluation.locate import LocateTask, Split
    from lsi.locate.result import LocateResult

IG_STEPS = 5
ACDC_THRESHOLD = 0.01  # fraction of |m(clean) - m(corrupt)|
_HEAD = re.compile(r"^blocks\.\d+\.attn\.head_out\[\d+\]$")
_NODE = re.compile(r"^(embed|blocks\.\d+\.attn\.head_out\[\d+\]|blocks\.\d+\.mlp\.out)$")


def _needs_nodes(task: LocateTask) -> str | None:
    if reason := needs_contrast(task):
        return reason
    if not all(_NODE.match(u) for u in task.universe):
        return "the universe is not circuit nodes (embed, attention heads, MLP outputs)"
    return None


def _needs_heads(task: LocateTask) -> str | None:
    reason = _needs_nodes(task)
    if reason is None and not all(_HEAD.match(u) for u in task.universe):
        return "ACDC runs on head universes only (one forward per edge is too slow for larger graphs)"
    return reason


def _method(edges: Callable[[LanguageModel, Split], LocateResult]) -> Callable[[LanguageModel, LocateTask, int],
                                                                                   MethodOutput]:
    """Node scores for grading, and the faithfulness curve of the top edges (signed ranking) on the test split."""
    def run(lm: LanguageModel, task: LocateTask, seed: int) -> MethodOutput:
        split = task.test
        found = edges(lm, split)
        nodes = node_scores(found).as_dict()
        curve = faithfulness_curve(lm, split.clean, split.corrupted, task_metric(split), found)
        extras = {"faithfulness": {"percent_of_edges": [100 * f for f in curve.fractions], "sizes": list(curve.sizes),
                                   "values": list(curve.values), "area": curve.area}}
        return MethodOutput({u: nodes[u] for u in task.universe}, extras)
    return run


def _eap(lm: LanguageModel, split: Split) -> LocateResult:
    return eap(lm, split.clean, split.corrupted, task_metric(split))


def _eap_ig(lm: LanguageModel, split: Split) -> LocateResult:
    return eap_ig(lm, split.clean, split.corrupted, task_metric(split), steps=IG_STEPS)


def _acdc(lm: LanguageModel, split: Split) -> LocateResult:
    return acdc(lm, split.clean, split.corrupted, task_metric(split), threshold=ACDC_THRESHOLD, relative=True)


register_locate_method(LocateMethod("eap", "edge attribution patching, node = summed |edge score|", _method(_eap),
                                    applies=_needs_nodes))
register_locate_method(LocateMethod("eap_ig", f"EAP with integrated gradients on the embeddings ({IG_STEPS} steps)",
                                    _method(_eap_ig), applies=_needs_nodes))
register_locate_method(LocateMethod("acdc", f"ACDC-style edge pruning (threshold {ACDC_THRESHOLD} of the clean-"
                                    "corrupt gap), node = summed |edge effect|", _method(_acdc), applies=_needs_heads))
