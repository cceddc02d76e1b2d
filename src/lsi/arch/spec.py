"""The architecture spec: everything lsi knows about a model family, as data.

Paths are dotted module names. Global paths are relative to the ``*ForCausalLM`` root; per-layer paths are
relative to one decoder layer. A site is read where its value exists in the HF module tree:

* ``resid_pre`` / ``resid_post``: input / output of the decoder layer;
* ``attn.out``: output of ``attn_out`` (the attention module, its dropout, or a post-attention norm);
* ``resid_mid``: ``resid_pre + attn.out`` (sequential families only);
* ``attn.z`` / ``attn.head_out``: input of ``o_proj``, and its per-head products with ``W_O``;
* ``attn.pattern``: second output of ``attn`` (eager attention only);
* ``attn.q/k/v``: outputs of ``q_proj``/``k_proj``/``v_proj`` or slices of the fused ``qkv_proj``;
* ``mlp.pre`` / ``mlp.post``: input of the activation module / input of ``mlp_down``;
* ``mlp.out``: output of ``mlp_out``.

``pre_attn_norm`` / ``pre_mlp_norm`` are the norms whose outputs feed the q/k/v projections / the MLP (the same
norm where one feeds both, as in GPT-J); ``None`` where the block reads the residual stream itself (OLMo-2).

Example:
    >>> LLAMA = ArchSpec(family="llama", model_types=("llama",))
    >>> LLAMA.layer_path(3, LLAMA.o_proj)
    'model.layers.3.self_attn.o_proj'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

QkvLayout = Literal["concat", "per_head"]


@dataclass(frozen=True)
class ArchSpec:
    """Declarative description of one model family (defaults are the Llama layout)."""

    family: str
    model_types: tuple[str, ...]
    # global modules
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    pos_embed: str | None = None
    final_norm: str = "model.norm"
    unembed: str = "lm_head"
    # per-layer modules
    pre_attn_norm: str | None = "input_layernorm"
    attn: str = "self_attn"
    attn_out: str = "self_attn"
    q_proj: str | None = "self_attn.q_proj"
    k_proj: str | None = "self_attn.k_proj"
    v_proj: str | None = "self_attn.v_proj"
    qkv_proj: str | None = None
    qkv_layout: QkvLayout = "concat"
    o_proj: str = "self_attn.o_proj"
    pre_mlp_norm: str | None = "post_attention_layernorm"
    mlp_act: str = "mlp.act_fn"
    mlp_in: str = "mlp.up_proj"  # neuron key weights (rows of W_in)
    mlp_gate: str | None = "mlp.gate_proj"
    mlp_gate_up: str | None = None  # fused [gate; up] projection (gate first)
    mlp_down: str = "mlp.down_proj"
    mlp_out: str = "mlp"
    # flags
    parallel_attn: bool | str = False  # True, False, or the name of a boolean config attribute
    conv1d: bool = False  # weights stored as [in, out] (GPT-2's Conv1D)
    final_logit_softcap: str | None = None  # config attribute applied to logits after the unembedding

    def layer_path(self, layer: int, path: str = "") -> str:
        """Dotted path of decoder layer ``layer`` or of a module inside it."""
        return f"{self.layers}.{layer}" + (f".{path}" if path else "")

    def is_parallel(self, config: Any) -> bool:
        if isinstance(self.parallel_attn, str):
            return bool(getattr(config, self.parallel_attn))
        return self.parallel_attn

    @property
    def gated(self) -> bool:
        return self.mlp_gate is not None or self.mlp_gate_up is not None

    def template(self) -> str:
        """Python source of this spec, to copy and edit when registering a new family."""
        fields = ",\n    ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"ArchSpec(\n    {fields},\n)"
