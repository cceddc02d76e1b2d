"""Small random models from the real config classes: 2 layers, width 32, GQA where the family has it."""

from __future__ import annotations

from typing import Any

import torch

_COMMON = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=48, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_GQA = dict(_COMMON, num_key_value_heads=2)

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "gpt2": dict(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_inner=48, n_positions=64, bos_token_id=1,
                 eos_token_id=2, pad_token_id=0),
    "gpt_neox": dict(_COMMON, use_parallel_residual=True),
    "llama": dict(_GQA),
    "mistral": dict(_GQA, sliding_window=None),
    "qwen2": dict(_GQA),
    "qwen3": dict(_GQA, head_dim=8),
    "gemma2": dict(_GQA, head_dim=8, query_pre_attn_scalar=8),
    "phi3": dict(_GQA),
    "olmo2": dict(_GQA),
}


def tiny_config(model_type: str, **overrides: Any) -> Any:
    """The config of a tiny model of ``model_type`` (dropout off so train/eval agree)."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(model_type, **{**TINY_CONFIGS[model_type], **overrides})
    for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(cfg, name):
            setattr(cfg, name, 0.0)
    return cfg


def tiny_model(model_type: str, *, seed: int = 0, **overrides: Any) -> Any:
    """A randomly initialized ``*ForCausalLM`` in eval mode (deterministic for a seed)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)).eval()
