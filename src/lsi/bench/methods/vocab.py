"""Direct logit attribution as a locate method: the direct path of each residual-stream writer to the metric.

The task's metric is linearised in the logits: its gradient with respect to the logits of every cell, mapped
through ``W_U``, is the per-cell unembedding direction (for a logit-difference metric this is exactly the usual
DLA direction; under final logit soft-capping the direction is that of the capped logits). A component's score
is |Σ_cells DLA| (its direct path's first-order share of the metric), on the task's clean run of the test split.
Only direct effects count: a component that acts through later layers (a previous-token head feeding induction
heads, an MLP read by later attention) scores low whatever its total effect.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lsi.bench.registry import LocateMethod, Scores, register_locate_method
from lsi.bench.tasks import universe_sites
from lsi.core.runs import Run
from lsi.core.sites import Site
from lsi.evaluation.locate import LocateTask
from lsi.locate.vocab import direct_logit_attribution

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel

_WRITERS = ("embed", "attn.head_out", "attn.out", "mlp.out")


def _applies(task: LocateTask) -> str | None:
    sites = universe_sites(task)
    if sites is None or not {s.kind for s in sites} <= set(_WRITERS):
        return "the universe is not made of residual-stream writers (embed, heads, attn.out, mlp.out)"
    return None


def _run(lm: LanguageModel, task: LocateTask, seed: int) -> Scores:
    split = task.test
    run = split.clean or Run(split.inputs, split.setting)
    with run.setting():
        logits = lm.forward(run.inputs).float().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(split.metric(logits), logits)
        direction = grad @ lm.weights.W_U.float().T  # [batch, pos, d_model]: d metric / d (normed residual)
        heads = any(Site.parse(u).kind == "attn.head_out" for u in task.universe)
        scores = direct_logit_attribution(lm, run.inputs, direction, positions=None, heads=heads).as_dict()
    cells = float(lm.to_batch(run.inputs).attention_mask.sum())  # mean over real cells -> sum: metric units
    return {u: abs(scores[u]) * cells for u in task.universe}


register_locate_method(LocateMethod(
    "dla", "direct logit attribution of the metric's logit gradient (direct effects only), clean test run",
    _run, _applies))
