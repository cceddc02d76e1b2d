"""Shared helpers for organism training scripts: seeding, a word-level tokenizer, a small CPU loop, saving.

Every organism trains with the same loop so that runs are seeded, single-threaded (several organisms may train
side by side on a small machine) and report the same figures.

Example:
    >>> tok = build_word_tokenizer(["a", "b"])
    >>> tok.convert_ids_to_tokens(tok("<bos> a b")["input_ids"])
    ['<bos>', 'a', 'b']
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

SPECIALS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
GROUND_TRUTH_FILE = "ground_truth.json"
_log = logging.getLogger(__name__)

# A batch is input ids [batch, pos] and a loss mask [batch, pos] (True where the token at that position is a
# prediction target, i.e. it is predicted from the position before it), None for every token, or whatever a
# custom ``loss_fn`` takes instead.
Batch = tuple["torch.Tensor", Any]


def seed_everything(seed: int, *, threads: int = 1) -> torch.Generator:
    """Seed python, numpy and torch, limit torch to ``threads`` CPU threads; return a seeded torch generator."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    return torch.Generator().manual_seed(seed)


def build_word_tokenizer(words: Sequence[str], specials: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer: special tokens first (ids 0..), then ``words`` in the order given.

    ``specials`` maps HF special-token roles (``pad_token``, ``bos_token``, ``eos_token``, ``unk_token``) to
    strings; it defaults to :data:`SPECIALS`. Special-token strings in the text are kept as single tokens. No
    BOS is added automatically: write it in the text (or prepend its id) where a sequence needs one.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = dict(SPECIALS if specials is None else specials)
    vocab: dict[str, int] = {}
    for tok in [*specials.values(), *words]:
        if tok in vocab:
            raise ValueError(f"duplicate token {tok!r} in the tokenizer vocabulary")
        vocab[tok] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=specials.get("unk_token", "<unk>")))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, **specials)


def new_model(model_type: str, tokenizer: PreTrainedTokenizerFast, **config: Any) -> Any:
    """A randomly initialized causal LM of ``model_type`` sized to ``tokenizer`` and using its special tokens.

    ``config`` holds the remaining config fields (width, depth, heads, ``tie_word_embeddings``, ...).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **config)
    return AutoModelForCausalLM.from_config(cfg)


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over targets ``input_ids[:, 1:]`` where ``loss_mask[:, 1:]`` is True."""
    from lsi.evaluation.functional import masked_mean, next_token_nll

    nll = next_token_nll(logits, input_ids)
    return nll.mean() if loss_mask is None else masked_mean(nll, loss_mask[:, 1:])


def train_lm(
    model: PreTrainedModel,
    batches_fn: Callable[[int], Batch],
    steps: int,
    lr: float,
    *,
    params: Iterable[torch.nn.Parameter] | None = None,
    weight_decay: float = 0.0,
    warmup: int = 0,
    grad_clip: float = 1.0,
    loss_fn: Callable[[Any, torch.Tensor, Any], torch.Tensor] | None = None,
    log_every: int = 0,
) -> dict[str, Any]:
    """Train ``model`` with AdamW on ``batches_fn(step)`` for ``steps`` steps; return training figures.

    Only ``params`` are optimized (default: all parameters). The learning rate warms up linearly over
    ``warmup`` steps, then decays with a cosine to 10% of ``lr``. ``loss_fn(model, ids, mask)`` replaces the
    default next-token loss. Returns ``{"steps", "seconds", "final_loss", "loss_curve"}``; ``final_loss`` is the
    mean over the last ~5% of steps and ``loss_curve`` holds the mean loss every ``max(1, steps // 20)`` steps.
    """
    import torch

    trainable = list(model.parameters() if params is None else params)
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        ids, mask = batches_fn(step)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = loss_fn(model, ids, mask) if loss_fn else lm_loss(model(input_ids=ids).logits, ids, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
        opt.step()
        losses.append(loss.item())
        if log_every and (step + 1) % log_every == 0:
            _log.info("step %d loss %.4f", step + 1, sum(losses[-log_every:]) / log_every)
    model.eval()
    every = max(1, steps // 20)
    chunks = [losses[i : i + every] for i in range(0, steps, every)]
    return {
        "steps": steps,
        "seconds": round(time.perf_counter() - start, 2),
        "final_loss": round(sum(chunks[-1]) / len(chunks[-1]), 5),
        "loss_curve": [round(sum(c) / len(c), 4) for c in chunks],
    }


def save_organism(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    ground_truth: dict[str, Any],
    out_dir: str | Path,
) -> Path:
    """Write a standard HF model directory (float32 safetensors + tokenizer) and ``ground_truth.json``."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.float().eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / GROUND_TRUTH_FILE).write_text(json.dumps(ground_truth, indent=1, sort_keys=True) + "\n")
    return out


def load_ground_truth(model_dir: str | Path) -> dict[str, Any]:
    """Read ``ground_truth.json`` from an organism directory."""
    return json.loads((Path(model_dir) / GROUND_TRUTH_FILE).read_text())


class HeadGate:
    """Training-time head ablation on a Llama-layout model: each head's slice of the ``o_proj`` input is scaled by
    its gate (1 = on, 0 = ablated). Used to plant a mechanism in chosen heads through the training objective.

    Example:
        >>> from lsi.testing import tiny_model
        >>> gate = HeadGate(tiny_model("llama"), n_heads=4)
        >>> gate.ablate([(0, 1)]); [g.tolist() for g in gate.gates][0]
        [1.0, 0.0, 1.0, 1.0]
        >>> gate.only({0: (2,), 1: ()}); [g.tolist() for g in gate.gates]
        [[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
        >>> gate.remove()
    """

    def __init__(self, model: Any, n_heads: int) -> None:
        import torch

        self.gates = [torch.ones(n_heads) for _ in model.model.layers]
        self.d_head = model.config.hidden_size // n_heads
        self.handles = [layer.self_attn.o_proj.register_forward_pre_hook(self._hook(i))
                        for i, layer in enumerate(model.model.layers)]

    def _hook(self, i: int) -> Any:
        return lambda _mod, args: (args[0] * self.gates[i].repeat_interleave(self.d_head),)

    def ablate(self, off: Iterable[tuple[int, int]]) -> None:
        """Every head on except the ``(layer, head)`` pairs in ``off``."""
        for gate in self.gates:
            gate.fill_(1.0)
        for layer, head in off:
            self.gates[layer][head] = 0.0

    def only(self, keep: dict[int, tuple[int, ...]] | None) -> None:
        """Keep only the listed heads per layer (None: keep all)."""
        for i, gate in enumerate(self.gates):
            gate.fill_(1.0 if keep is None else 0.0)
            if keep is not None:
                gate[list(keep[i])] = 1.0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

