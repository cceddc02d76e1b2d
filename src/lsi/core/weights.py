"""Weight objects: embeddings, per-head Q/K/V/O (GQA explicit), QK and OV circuits, neuron key/value weights.

Conventions (TransformerLens's): a residual vector ``x`` (a row) maps to a head's query by ``x @ W_Q[h]``;
``W_O[h]`` maps a head's value-space vector to the residual stream. These are the raw HF weights: norm scales
are not folded in and rotary embeddings are not applied.

Example:
    >>> import lsi
    >>> from lsi.testing import tiny_model
    >>> w = Weights(lsi.LanguageModel(tiny_model("llama")))
    >>> tuple(w.W_Q(0).shape), tuple(w.W_K(0).shape), tuple(w.W_K(0, expand=True).shape)
    ((4, 32, 8), (2, 32, 8), (4, 32, 8))
    >>> tuple(w.OV(0, head=3).shape)
    (32, 32)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from lsi.arch.dims import get_module, linear_weight
from lsi.core.bindings import head_out_weight
from lsi.errors import IndexOutOfRangeError

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel


class Weights:
    """Read-only views of a model's weights as interpretable objects (detached tensors)."""

    def __init__(self, lm: LanguageModel) -> None:
        self.lm = lm
        self.spec, self.dims = lm.spec, lm.dims

    def _module(self, layer: int, path: str) -> torch.nn.Module:
        n = self.dims.n_layers
        if not -n <= layer < n:
            raise IndexOutOfRangeError(f"a layer in [-{n}, {n - 1}]", str(layer), f"this model has {n} layers")
        return get_module(self.lm.model, self.spec.layer_path(layer % n, path))

    def _linear(self, layer: int, path: str) -> torch.Tensor:
        return linear_weight(self._module(layer, path), self.spec.conv1d).detach()

    def _check_head(self, head: int) -> None:
        if not 0 <= head < self.dims.n_heads:
            raise IndexOutOfRangeError(f"a head in [0, {self.dims.n_heads - 1}]", str(head),
                                       f"this model has {self.dims.n_heads} query heads")

    def _check_unit(self, unit: int) -> None:
        if not 0 <= unit < self.dims.d_mlp:
            raise IndexOutOfRangeError(f"a neuron in [0, {self.dims.d_mlp - 1}]", str(unit),
                                       f"this model has d_mlp={self.dims.d_mlp}")

    # -- embeddings ---------------------------------------------------------------------------------------------
    @property
    def W_E(self) -> torch.Tensor:
        """Token embedding ``[vocab, d_model]`` (families that scale embeddings do so at run time)."""
        return get_module(self.lm.model, self.spec.embed).weight.detach()

    @property
    def W_pos(self) -> torch.Tensor | None:
        """Learned positional embedding ``[n_ctx, d_model]``, or ``None`` (rotary families)."""
        if self.spec.pos_embed is None:
            return None
        return get_module(self.lm.model, self.spec.pos_embed).weight.detach()

    @property
    def W_U(self) -> torch.Tensor:
        """Unembedding ``[d_model, vocab]``."""
        return get_module(self.lm.model, self.spec.unembed).weight.detach().T

    # -- attention ------------------------------------------------------------------------------------------------
    def kv_head(self, head: int) -> int:
        """The key/value head a query head reads under grouped-query attention."""
        self._check_head(head)
        return head // (self.dims.n_heads // self.dims.n_kv_heads)

    def _qkv(self, layer: int, which: int) -> torch.Tensor:
        """``[heads, d_model, d_head]`` for q (which=0), k (1) or v (2), unexpanded."""
        d, dh = self.dims.d_model, self.dims.d_head
        n = self.dims.n_heads if which == 0 else self.dims.n_kv_heads
        own = (self.spec.q_proj, self.spec.k_proj, self.spec.v_proj)[which]
        if own is not None:
            w = self._linear(layer, own)
        else:
            assert self.spec.qkv_proj is not None
            fused = self._linear(layer, self.spec.qkv_proj)
            if self.spec.qkv_layout == "per_head":
                w = fused.view(self.dims.n_heads, 3, dh, d)[:, which].reshape(n * dh, d)
            else:
                sizes = [self.dims.n_heads * dh, self.dims.n_kv_heads * dh, self.dims.n_kv_heads * dh]
                w = fused.split(sizes, dim=0)[which]
        return w.view(n, dh, d).transpose(1, 2)

    def _expand(self, w: torch.Tensor) -> torch.Tensor:
        return w.repeat_interleave(self.dims.n_heads // self.dims.n_kv_heads, dim=0)

    def W_Q(self, layer: int) -> torch.Tensor:
        """Query weights ``[n_heads, d_model, d_head]``."""
        return self._qkv(layer, 0)

    def W_K(self, layer: int, *, expand: bool = False) -> torch.Tensor:
        """Key weights ``[n_kv_heads, d_model, d_head]`` (``expand=True``: one per query head)."""
        w = self._qkv(layer, 1)
        return self._expand(w) if expand else w

    def W_V(self, layer: int, *, expand: bool = False) -> torch.Tensor:
        """Value weights ``[n_kv_heads, d_model, d_head]`` (``expand=True``: one per query head)."""
        w = self._qkv(layer, 2)
        return self._expand(w) if expand else w

    def W_O(self, layer: int) -> torch.Tensor:
        """Output weights ``[n_heads, d_head, d_model]``."""
        return head_out_weight(self._module(layer, self.spec.o_proj), self.spec, self.dims).detach()

    def QK(self, layer: int, head: int) -> torch.Tensor:
        """QK circuit ``W_Q[h] @ W_K[kv(h)]^T``: ``[d_model, d_model]`` (bilinear form on residual vectors)."""
        return self.W_Q(layer)[head] @ self.W_K(layer)[self.kv_head(head)].T

    def OV(self, layer: int, head: int) -> torch.Tensor:
        """OV circuit ``W_V[kv(h)] @ W_O[h]``: ``[d_model, d_model]``."""
        return self.W_V(layer)[self.kv_head(head)] @ self.W_O(layer)[head]

    # -- MLP neurons ----------------------------------------------------------------------------------------------
    def W_in(self, layer: int) -> torch.Tensor:
        """Input (up) projection ``[d_mlp, d_model]``; for gated MLPs the branch multiplied by the gate."""
        if self.spec.mlp_gate_up is not None:
            return self._linear(layer, self.spec.mlp_gate_up).chunk(2, dim=0)[1]
        return self._linear(layer, self.spec.mlp_in)

    def W_gate(self, layer: int) -> torch.Tensor | None:
        """Gate projection ``[d_mlp, d_model]`` of gated MLPs (whose output is ``mlp.pre``), else ``None``."""
        if self.spec.mlp_gate_up is not None:
            return self._linear(layer, self.spec.mlp_gate_up).chunk(2, dim=0)[0]
        return None if self.spec.mlp_gate is None else self._linear(layer, self.spec.mlp_gate)

    def W_out(self, layer: int) -> torch.Tensor:
        """Output (down) projection ``[d_model, d_mlp]``."""
        return self._linear(layer, self.spec.mlp_down)

    def neuron_key(self, layer: int, unit: int) -> torch.Tensor:
        """Key weight of a neuron: row ``unit`` of ``W_in`` ``[d_model]``."""
        self._check_unit(unit)
        return self.W_in(layer)[unit]

    def neuron_value(self, layer: int, unit: int) -> torch.Tensor:
        """Value weight of a neuron: column ``unit`` of ``W_out`` ``[d_model]``."""
        self._check_unit(unit)
        return self.W_out(layer)[:, unit]
