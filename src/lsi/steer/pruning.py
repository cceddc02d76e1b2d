"""Structural steering that folds into smaller weights: deleted layers.

* :class:`DeleteLayers` skips whole decoder layers: their attention and MLP writes are zeroed, so the residual
  stream passes through unchanged (with hooks; the layer still runs). :func:`delete_layers` removes them from a
  copy of the model, renumbering the rest, and is what :func:`lsi.steer.export.fold` does with this steering: the
  exported checkpoint has fewer layers and loads in plain ``transformers``.

Pruned heads and neurons are :class:`~lsi.core.interventions.Zero` / :class:`~lsi.core.interventions.Scale` of
``attn.z[h]``, ``attn.head_out[h]`` or ``mlp.post[j]``; at every position they fold exactly into the columns of the
attention output projection or of the MLP down projection (:func:`lsi.core.folding.scale_units`), also in families
with post-norms: the change happens before the projection.

Example:
    >>> import lsi, torch
    >>> from lsi.testing import tiny_model
    >>> lm = lsi.LanguageModel(tiny_model("llama", num_hidden_layers=3))
    >>> with DeleteLayers([1]).apply(lm):
    ...     hooked = lm.forward([[5, 6, 7]])
    >>> smaller = delete_layers(lm, [1])
    >>> smaller.dims.n_layers, torch.allclose(smaller.forward([[5, 6, 7]]), hooked, atol=1e-5)
    (2, True)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lsi.arch.dims import get_module
from lsi.core.folding import Folding
from lsi.core.identity import ModelIdentity, as_identity
from lsi.core.interventions import Intervention, Zero
from lsi.core.model_copy import copy_model
from lsi.core.steering import Steering
from lsi.errors import InputError

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel

@dataclass(frozen=True, eq=False, repr=False)
class DeleteLayers(Steering):
    """Skip decoder ``layers``: ``blocks.l.attn.out`` and ``blocks.l.mlp.out`` are zeroed at every position, so
    ``resid_post = resid_pre`` there (the layer's output equals its input, as if it were removed)."""

    layers: tuple[int, ...]
    model: ModelIdentity | None = None

    def __init__(self, layers: Iterable[int], *, model: LanguageModel | ModelIdentity | None = None) -> None:
        chosen = tuple(sorted({int(layer) for layer in layers}))
        if not chosen:
            raise InputError("at least one layer to delete", "none", "e.g. DeleteLayers([2, 4])")
        object.__setattr__(self, "layers", chosen)
        object.__setattr__(self, "model", as_identity(model))

    def _ops(self, lm: LanguageModel) -> list[Intervention]:
        _check_layers(lm, self.layers)
        return [Zero(f"blocks.{layer}.{kind}") for layer in self.layers for kind in ("attn.out", "mlp.out")]

    def folding(self, lm: LanguageModel) -> Folding:
        """The layers removed from the folded copy (:func:`delete_layers`, last)."""
        _check_layers(lm, self.layers)
        return Folding(deletes=frozenset(self.layers))

    def _record(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"layers": list(self.layers)}, {}

    @classmethod
    def _restore(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], model: ModelIdentity) -> DeleteLayers:
        return cls(meta["layers"], model=model)

    def __repr__(self) -> str:
        return f"DeleteLayers({list(self.layers)})"


def _check_layers(lm: LanguageModel, layers: Iterable[int]) -> None:
    n = lm.dims.n_layers
    bad = [layer for layer in layers if not 0 <= layer < n]
    if bad:
        raise InputError(f"layer indices in 0..{n - 1}", str(bad), "count layers from 0 (negative ones are not "
                                                                   "accepted here)")
    if len(set(layers)) >= n:
        raise InputError("at least one layer kept", f"all {n} layers deleted", "delete fewer layers")


def delete_layers(lm: LanguageModel, layers: Iterable[int]) -> LanguageModel:
    """A new :class:`LanguageModel` over a copy of ``lm`` without decoder ``layers``: the layer list, the config's
    layer count (and per-layer ``layer_types`` where the config has them) and every module's ``layer_idx`` (the
    key-value cache slot) are renumbered, so ``save_pretrained`` gives a checkpoint plain ``transformers`` loads."""
    from lsi.core.model import LanguageModel

    dropped = sorted({int(layer) for layer in layers})
    _check_layers(lm, dropped)
    target = copy_model(lm).model
    path = lm.spec.layers
    blocks = get_module(target, path)
    kept = [block for i, block in enumerate(blocks) if i not in dropped]
    parent, _, name = path.rpartition(".")
    setattr(get_module(target, parent) if parent else target, name, nn.ModuleList(kept))
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config = target.config
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and len(types) == lm.dims.n_layers:
        config.layer_types = [t for i, t in enumerate(types) if i not in dropped]
    config.num_hidden_layers = len(kept)
    return LanguageModel(target, lm.tokenizer, spec=lm.spec, verify=False)
