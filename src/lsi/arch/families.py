"""One short spec per supported family. This file is the only place that knows family layouts."""

from __future__ import annotations

from lsi.arch.spec import ArchSpec

GPT2 = ArchSpec(
    family="gpt2",
    model_types=("gpt2",),
    layers="transformer.h",
    embed="transformer.wte",
    pos_embed="transformer.wpe",
    final_norm="transformer.ln_f",
    pre_attn_norm="ln_1",
    attn="attn",
    attn_out="attn",
    q_proj=None,
    k_proj=None,
    v_proj=None,
    qkv_proj="attn.c_attn",
    o_proj="attn.c_proj",
    pre_mlp_norm="ln_2",
    mlp_act="mlp.act",
    mlp_in="mlp.c_fc",
    mlp_gate=None,
    mlp_down="mlp.c_proj",
    conv1d=True,
)

GPT_NEOX = ArchSpec(
    family="gpt_neox",
    model_types=("gpt_neox",),
    layers="gpt_neox.layers",
    embed="gpt_neox.embed_in",
    final_norm="gpt_neox.final_layer_norm",
    attn="attention",
    attn_out="post_attention_dropout",
    q_proj=None,
    k_proj=None,
    v_proj=None,
    qkv_proj="attention.query_key_value",
    qkv_layout="per_head",
    o_proj="attention.dense",
    mlp_act="mlp.act",
    mlp_in="mlp.dense_h_to_4h",
    mlp_gate=None,
    mlp_down="mlp.dense_4h_to_h",
    mlp_out="post_mlp_dropout",
    parallel_attn="use_parallel_residual",
)

LLAMA = ArchSpec(family="llama", model_types=("llama",))
MISTRAL = ArchSpec(family="mistral", model_types=("mistral",))
QWEN2 = ArchSpec(family="qwen2", model_types=("qwen2",))
QWEN3 = ArchSpec(family="qwen3", model_types=("qwen3",))

GEMMA2 = ArchSpec(
    family="gemma2",
    model_types=("gemma2",),
    attn_out="post_attention_layernorm",
    pre_mlp_norm="pre_feedforward_layernorm",
    mlp_out="post_feedforward_layernorm",
    final_logit_softcap="final_logit_softcapping",
)

PHI3 = ArchSpec(
    family="phi3",
    model_types=("phi3",),
    attn_out="resid_attn_dropout",
    q_proj=None,
    k_proj=None,
    v_proj=None,
    qkv_proj="self_attn.qkv_proj",
    mlp_act="mlp.activation_fn",
    mlp_in="mlp.gate_up_proj",
    mlp_gate=None,
    mlp_gate_up="mlp.gate_up_proj",
    mlp_out="resid_mlp_dropout",
)

OLMO2 = ArchSpec(
    family="olmo2",
    model_types=("olmo2",),
    pre_attn_norm=None,
    attn_out="post_attention_layernorm",
    pre_mlp_norm=None,
    mlp_out="post_feedforward_layernorm",
)

FAMILIES: tuple[ArchSpec, ...] = (GPT2, GPT_NEOX, LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA2, PHI3, OLMO2)
