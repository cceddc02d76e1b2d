"""Helpers shared by the core tests (not a test module)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Where scripts/get-smollm2 puts SmolLM2-135M-Instruct (same variable, same default).
SMOLLM2_FILE = (Path(os.environ.get("LSI_SMOLLM2", Path.home() / ".cache" / "lsi" / "smollm2"))
                / "SmolLM2-135M-Instruct.Q4_1.gguf")

FAMILIES = ["gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "olmo2"]
GATED = {"llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "olmo2"}
PARALLEL = {"gpt_neox"}  # the tiny gpt_neox uses use_parallel_residual=True

IDS = torch.tensor([[5, 17, 42, 8, 63, 21, 9]])  # one row, 7 tokens, no pad (0) / bos (1) / eos (2)


def _ours(hook) -> bool:
    """transformers installs permanent output-capturing hooks itself (on the first ``output_hidden_states``
    call); those are not lsi's and are expected to stay."""
    return not getattr(hook, "__module__", "").startswith("transformers.")


def assert_no_hooks(model: torch.nn.Module) -> None:
    """No forward hooks or pre-hooks (other than transformers' own) on any module of ``model``."""
    left = [(name or "<root>", kind, getattr(h, "__qualname__", repr(h))) for name, m in model.named_modules()
            for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
            for h in getattr(m, kind).values() if _ours(h)]
    assert not left, f"hooks left behind: {left}"


def hf_logits(lm, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    """Logits of the plain HF model (no lsi involved)."""
    with torch.no_grad():
        return lm.model(ids, **kwargs).logits


class PrintableTokenizer:
    """One token per printable ASCII character (id = ord(c) - 29, so 3..97 fits the tiny vocab), with ``decode``."""

    pad_token_id = 0
    padding_side = "right"

    def __call__(self, text: str, **kwargs) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) - 29 for c in text]}

    def decode(self, ids, **kwargs) -> str:
        return "".join(chr(int(i) + 29) for i in ids)
