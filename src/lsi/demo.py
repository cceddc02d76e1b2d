"""The built-in demo: a small Llama-architecture model that lsi trains itself, then inspects.

Task: arithmetic sequences ``a, a+k, a+2k, ...`` (mod ``N_NUMBERS``) with a random start and step per sequence,
so predicting the next number needs the step, which only earlier tokens reveal. The logit lens then shows at
which layer the right answer becomes readable from the residual stream.

Example:
    >>> ids = counting_batch(2, seed=0)
    >>> tuple(ids.shape)
    (2, 13)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

N_NUMBERS = 32
SEQ_LEN = 12
MAX_STEP = 4


def counting_batch(batch: int, *, seed: int) -> torch.Tensor:
    """``[batch, SEQ_LEN + 1]`` ids: BOS then an arithmetic sequence mod ``N_NUMBERS`` (numbers start at id 4)."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, N_NUMBERS, (batch, 1), generator=gen)
    step = torch.randint(1, MAX_STEP + 1, (batch, 1), generator=gen)
    numbers = (start + step * torch.arange(SEQ_LEN)) % N_NUMBERS
    bos = torch.full((batch, 1), 1)
    return torch.cat([bos, numbers + 4], dim=1)


def train_demo_model(out_dir: str | Path, *, seed: int = 0, steps: int = 150) -> dict[str, Any]:
    """Train the demo model on CPU (well under a minute on 2 idle cores) and save it as a standard HF directory."""
    from lsi.organisms.training import build_word_tokenizer, new_model, seed_everything, train_lm

    seed_everything(seed, threads=torch.get_num_threads())
    tokenizer = build_word_tokenizer([f"n{i}" for i in range(N_NUMBERS)])
    model = new_model("llama", tokenizer, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    mask = torch.ones(1, SEQ_LEN + 1, dtype=torch.bool)
    mask[:, :3] = False  # the first two numbers cannot be predicted: they only set start and step
    figures = train_lm(model, lambda step: (counting_batch(32, seed=seed * 100_000 + step), mask.expand(32, -1)),
                       steps, 3e-3, warmup=30)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return figures
