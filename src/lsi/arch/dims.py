"""Model dimensions, read off the module tree (not guessed from config names where a module can tell)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from lsi.arch.spec import ArchSpec


def get_module(root: nn.Module, path: str) -> Any:
    """``root.get_submodule(path)`` with the empty path meaning the root itself (typed ``Any``: HF modules carry
    attributes such as ``weight`` and ``config`` that static types cannot see)."""
    return root if not path else root.get_submodule(path)


def linear_weight(module: nn.Module, conv1d: bool) -> torch.Tensor:
    """Weight in ``[out, in]`` layout whatever the storage (GPT-2's Conv1D stores ``[in, out]``)."""
    w = module.weight
    assert isinstance(w, torch.Tensor)
    return w.T if conv1d else w


def out_in(tensor: torch.Tensor, owner: nn.Module) -> torch.Tensor:
    """A 2-d tensor shaped like ``owner``'s weight (the weight, its gradient, a mask) in ``[out, in]`` layout: a
    transposed view for GPT-2's Conv1D, which stores ``[in, out]``; anything else as is."""
    return tensor.T if type(owner).__name__ == "Conv1D" and tensor.dim() == 2 else tensor


@dataclass(frozen=True)
class ModelDims:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    vocab: int

    def size(self, name: str) -> int | None:
        """Size of a named shape dimension (``d_model``, ``n_heads``, ...); ``None`` for batch/positions."""
        return asdict(self).get(name)

    @classmethod
    def read(cls, model: Any, spec: ArchSpec) -> ModelDims:
        layers = get_module(model, spec.layers)
        assert isinstance(layers, nn.ModuleList)
        layer0 = layers[0]
        n_heads = int(model.config.num_attention_heads)
        o_w = linear_weight(get_module(layer0, spec.o_proj), spec.conv1d)
        d_head = o_w.shape[1] // n_heads
        if spec.k_proj is not None:
            n_kv = linear_weight(get_module(layer0, spec.k_proj), spec.conv1d).shape[0] // d_head
        else:
            n_kv = int(getattr(model.config, "num_key_value_heads", None) or n_heads)
        embed_w = get_module(model, spec.embed).weight
        unembed_w = get_module(model, spec.unembed).weight
        assert isinstance(embed_w, torch.Tensor) and isinstance(unembed_w, torch.Tensor)
        return cls(
            n_layers=len(layers),
            d_model=embed_w.shape[1],
            n_heads=n_heads,
            n_kv_heads=n_kv,
            d_head=d_head,
            d_mlp=linear_weight(get_module(layer0, spec.mlp_down), spec.conv1d).shape[1],
            vocab=unembed_w.shape[0],
        )
