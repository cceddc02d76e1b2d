"""Structural probe for unregistered architectures.

It looks for the decoder-layer list, embeddings, final norm and the usual norm and projection names, and builds a
candidate :class:`ArchSpec`. The candidate is only a guess: :class:`lsi.LanguageModel` runs the self-check on
it and refuses the model unless the check passes.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from lsi.arch.spec import ArchSpec
from lsi.errors import UnknownArchitectureError

_ATTN = ("self_attn", "attn", "attention", "self_attention")
_MLP = ("mlp", "feed_forward", "ffn")
_O = ("o_proj", "out_proj", "dense", "c_proj", "wo")
_Q, _K, _V = ("q_proj", "query", "wq"), ("k_proj", "key", "wk"), ("v_proj", "value", "wv")
_QKV = ("qkv_proj", "c_attn", "Wqkv", "query_key_value")
_DOWN = ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "fc_out", "w2")
_UP = ("up_proj", "fc1", "c_fc", "dense_h_to_4h", "fc_in", "w1")
_GATE = ("gate_proj", "w3")
_ACT = ("act_fn", "act", "activation_fn", "activation")
_ATTN_NORM = ("input_layernorm", "ln_1", "attention_norm", "ln_attn")
_MLP_NORM = ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2", "ffn_norm", "ln_mlp")


def _path_of(root: nn.Module, target: nn.Module) -> str | None:
    return next((name for name, m in root.named_modules() if m is target), None)


def _child(parent: nn.Module, names: tuple[str, ...]) -> str | None:
    children = dict(parent.named_children())
    return next((n for n in names if n in children), None)


def _fail(model: Any, what: str, layer: nn.Module | None) -> UnknownArchitectureError:
    found = ", ".join(n for n, _ in (layer or model).named_modules() if n)[:2000]
    template = ArchSpec(family=str(model.config.model_type), model_types=(str(model.config.model_type),)).template()
    return UnknownArchitectureError(
        f"a decoder-only layout lsi can map ({what})", f"modules: {found}",
        "write an ArchSpec and pass spec= to lsi.load (or lsi.register_architecture it). "
        "Template (Llama layout):\n" + template)


def probe_specs(model: Any) -> list[ArchSpec]:
    """Candidate specs from module names (sequential, then parallel attention); raises
    :class:`UnknownArchitectureError` if parts are missing."""
    n_layers = getattr(model.config, "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if not lists:
        raise _fail(model, f"a ModuleList of {n_layers} decoder layers", None)
    layers_path, layers = lists[0]
    layer = layers[0]
    embed = _path_of(model, model.get_input_embeddings())
    unembed = _path_of(model, model.get_output_embeddings())
    parent = model.get_submodule(layers_path.rsplit(".", 1)[0]) if "." in layers_path else model
    norms = [n for n, _ in parent.named_children() if "norm" in n or n.startswith("ln")]
    attn, mlp = _child(layer, _ATTN), _child(layer, _MLP)
    if None in (embed, unembed, attn, mlp) or not norms:
        raise _fail(model, "embeddings, unembedding, final norm, attention and MLP modules", layer)
    assert attn is not None and mlp is not None
    attn_mod, mlp_mod = layer.get_submodule(attn), layer.get_submodule(mlp)
    o, down, act = _child(attn_mod, _O), _child(mlp_mod, _DOWN), _child(mlp_mod, _ACT)
    q, k, v, qkv = (_child(attn_mod, names) for names in (_Q, _K, _V, _QKV))
    up, gate = _child(mlp_mod, _UP), _child(mlp_mod, _GATE)
    if None in (o, down, act, up) or (qkv is None and None in (q, k, v)):
        raise _fail(model, "q/k/v (or fused qkv), output, up, down projections and an activation module", layer)
    prefix = layers_path.rsplit(".", 1)[0] + "." if "." in layers_path else ""
    post_ffn = _child(layer, ("post_feedforward_layernorm",))
    attn_norm = _child(layer, _ATTN_NORM)
    mlp_norm = _child(layer, _MLP_NORM[:1] if post_ffn else _MLP_NORM)  # post-norm: it is attn_out
    sequential = ArchSpec(
        family=f"probed:{model.config.model_type}",
        model_types=(str(model.config.model_type),),
        layers=layers_path, embed=str(embed), final_norm=prefix + norms[-1], unembed=str(unembed),
        pre_attn_norm=attn_norm, pre_mlp_norm=mlp_norm,
        attn=attn, attn_out="post_attention_layernorm" if post_ffn else attn,
        q_proj=None if qkv else f"{attn}.{q}", k_proj=None if qkv else f"{attn}.{k}",
        v_proj=None if qkv else f"{attn}.{v}", qkv_proj=f"{attn}.{qkv}" if qkv else None,
        o_proj=f"{attn}.{o}", mlp_act=f"{mlp}.{act}", mlp_in=f"{mlp}.{up}",
        mlp_gate=f"{mlp}.{gate}" if gate else None, mlp_down=f"{mlp}.{down}",
        mlp_out=f"{mlp}" if not post_ffn else "post_feedforward_layernorm",
        conv1d=type(attn_mod.get_submodule(o)).__name__ == "Conv1D",  # type: ignore[arg-type]
    )
    # a parallel block with one norm (GPT-J) feeds it to the MLP too
    return [sequential, replace(sequential, parallel_attn=True, pre_mlp_norm=mlp_norm or attn_norm)]
