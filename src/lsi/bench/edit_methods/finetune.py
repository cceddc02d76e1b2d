"""Fine-tuning baselines of the edit tasks (:func:`lsi.steer.finetune.masked_finetune`), at equal steps and
learning rate: the target loss is the NLL of the new object after the request's prompts, plus ``KL_WEIGHT`` times
the KL to the original model on :data:`PRESERVE_ROWS` rows of the task's method corpus.

- ``finetune_masked``: only the MLP of the layer causal tracing picks (the ``rome`` row's layer) gets gradients;
- ``finetune_full``: every parameter.

The settings record the layer and how many parameter entries moved.
"""

from __future__ import annotations

import functools
import random
from typing import TYPE_CHECKING, Any

import torch

from lsi.bench.edit_methods import EditMethod, EditOutput, register_edit_method
from lsi.bench.edit_methods.rome import traced_layer
from lsi.evaluation.functional import last_token_logits
from lsi.steer.finetune import masked_finetune, parameter_mask

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel
    from lsi.evaluation.edit import EditCase, EditTask

STEPS, LR, KL_WEIGHT, PRESERVE_ROWS = 20, 1e-3, 1.0, 16


@functools.lru_cache(maxsize=8)
def preserve_rows(task: EditTask) -> list[Any]:
    """A seeded sample of the task's method corpus for the KL term."""
    rows = list(task.corpus)
    return random.Random(0).sample(rows, min(PRESERVE_ROWS, len(rows)))


def _finetune(lm: LanguageModel, task: EditTask, case: EditCase, masked: bool) -> list[EditOutput]:
    batch = lm.to_batch([list(p) for p in case.request.prompts], padding_side="right")

    def loss(model: LanguageModel) -> torch.Tensor:
        last = last_token_logits(model.logits_with_grad(batch), batch.attention_mask)
        return -last.log_softmax(-1)[:, case.new_id].mean()

    layer = traced_layer(lm, case)
    mask = parameter_mask(lm, [f"blocks.{layer}.mlp"]) if masked else None
    result = masked_finetune(lm, loss, mask, steps=STEPS, lr=LR, preserve=preserve_rows(task), kl_weight=KL_WEIGHT)
    settings: dict[str, Any] = {"layer": layer} if masked else {}
    return [EditOutput("finetune_masked" if masked else "finetune_full", result.edit,
                       {**settings, "moved": result.moved})]


register_edit_method(EditMethod(
    "finetune_masked", f"fine-tune only the traced layer's MLP ({STEPS} Adam steps, lr {LR:g}, KL to the original "
    "model on the method corpus)", lambda lm, task, case: _finetune(lm, task, case, masked=True)))
register_edit_method(EditMethod(
    "finetune_full", f"fine-tune every parameter ({STEPS} Adam steps, lr {LR:g}, KL to the original model on the "
    "method corpus)", lambda lm, task, case: _finetune(lm, task, case, masked=False)))
