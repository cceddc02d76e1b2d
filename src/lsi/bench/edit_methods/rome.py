"""ROME on the edit tasks (:func:`lsi.steer.rome.rome_edit`), with the key statistics ``C`` of each layer computed
once per task on the task's method corpus and no prefixes (the organisms' prompts start at their BOS token).

- ``rome``: locate, then steer: causal tracing (:func:`lsi.locate.tracing.causal_tracing`, MLP outputs restored
  at the last subject token, the true object as target, :data:`TRACE_SAMPLES` noise draws) on the request's
  prompts picks the layer, and ROME edits it; the settings record the traced layer per request.
- ``rome_by_layer``: one row ``rome@L`` per layer L (the comparison of layers; the edit at the traced layer is
  ``rome``'s, computed once).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from lsi.bench.edit_methods import EditMethod, EditOutput, register_edit_method
from lsi.errors import InputError
from lsi.locate.tracing import causal_tracing
from lsi.steer.rome import EditRequest, KeyStatistics, key_statistics, rome_edit

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel
    from lsi.core.weight_edit import WeightEdit
    from lsi.evaluation.edit import EditCase, EditTask

TRACE_SAMPLES = 10


@functools.lru_cache(maxsize=64)  # shared with the fine-tuning rows (cases hash by identity)
def traced_layer(lm: LanguageModel, case: EditCase) -> int:
    """The layer whose MLP output, restored at the last subject token, recovers the true object best."""
    prompts = [list(p) for p in case.request.prompts]
    result = causal_tracing(lm, prompts, list(case.subject_spans), case.true_id, kind="mlp",
                            positions="subject_last", noise_samples=TRACE_SAMPLES)
    return int(result.scores[:, 0].argmax())


@functools.lru_cache(maxsize=16)
def layer_statistics(lm: LanguageModel, task: EditTask, layer: int) -> KeyStatistics:
    """``C = E[k kᵀ]`` of the layer's down-projection inputs over the task's method corpus."""
    return key_statistics(lm, layer, task.corpus)


@functools.lru_cache(maxsize=256)  # rome and rome@L share the edit at the traced layer
def edit_at(lm: LanguageModel, task: EditTask, case: EditCase, layer: int) -> WeightEdit:
    """ROME's edit of the case's request at ``layer``."""
    if not isinstance(case.request, EditRequest):
        raise InputError("an EditRequest (ROME needs the subject positions)", type(case.request).__name__,
                         "build the task's cases with lsi.steer.rome.EditRequest")
    return rome_edit(lm, case.request, layer, stats=layer_statistics(lm, task, layer), prefixes=())


def _rome(lm: LanguageModel, task: EditTask, case: EditCase) -> list[EditOutput]:
    layer = traced_layer(lm, case)
    return [EditOutput("rome", edit_at(lm, task, case, layer), {"layer": layer})]


def _by_layer(lm: LanguageModel, task: EditTask, case: EditCase) -> list[EditOutput]:
    return [EditOutput(f"rome@{layer}", edit_at(lm, task, case, layer), {"layer": layer})
            for layer in range(lm.dims.n_layers)]


register_edit_method(EditMethod(
    "rome", "rank-one edit of the MLP down projection at the layer causal tracing picks for the request", _rome))
register_edit_method(EditMethod(
    "rome_by_layer", "rank-one edit at every layer, one row rome@L per layer", _by_layer))
