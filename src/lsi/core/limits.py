"""What a model can read: token ids inside its vocabulary, sequences inside its context.

Past the context, families with *learned* position embeddings (GPT-2) have no vectors for the extra positions:
such inputs are refused with :class:`~lsi.errors.IndexOutOfRangeError`. Families with computed positions
(rotary, ALiBi) run past ``max_position_embeddings``, but on positions the model never saw in training: a
warning says so, once per model. Text that the tokenizer turns into nothing but unknown tokens warns once too.

Example:
    >>> from lsi.core.inputs import to_batch
    >>> limits = InputLimits(vocab=10, learned_positions=4, max_positions=4)
    >>> limits.check(to_batch([[1, 2, 3]], tokenizer=None, padding_side="right", pad_id=0))
    >>> limits.check(to_batch([[1, 2, 12]], tokenizer=None, padding_side="right", pad_id=0))
    Traceback (most recent call last):
    lsi.errors.IndexOutOfRangeError: expected token ids in [0, 9] (the vocabulary); found 12 in row 0. Fix: ...
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from lsi.arch.dims import get_module
from lsi.arch.spec import ArchSpec
from lsi.core.inputs import Batch
from lsi.errors import IndexOutOfRangeError


@dataclass
class InputLimits:
    """The vocabulary size, the learned position count (``None``: positions are computed) and the trained
    context (``None``: unknown) of a model, and the warnings already given for it."""

    vocab: int
    learned_positions: int | None
    max_positions: int | None
    warned: set[str] = field(default_factory=set)

    @classmethod
    def read(cls, model: Any, spec: ArchSpec) -> InputLimits:
        learned = None if spec.pos_embed is None else int(get_module(model, spec.pos_embed).weight.shape[0])
        configured = getattr(model.config, "max_position_embeddings", None)
        return cls(int(get_module(model, spec.embed).weight.shape[0]), learned,
                   learned if learned is not None else configured)

    def check(self, batch: Batch, *, new_tokens: int = 0) -> None:
        """Refuse ids outside the vocabulary and, with learned positions, rows (plus ``new_tokens`` to generate)
        longer than the context; warn once when rows run past a computed-position model's trained context."""
        ids = batch.input_ids
        low, high = (int(v) for v in torch.aminmax(ids))
        if low < 0 or high >= self.vocab:  # padding too: every id goes through the embedding
            row, col = (int(v) for v in ((ids < 0) | (ids >= self.vocab)).nonzero()[0])
            raise IndexOutOfRangeError(f"token ids in [0, {self.vocab - 1}] (the vocabulary)",
                                       f"{int(ids[row, col])} in row {row}",
                                       "encode text with this model's tokenizer (lm.encode), or map the ids")
        longest = max(batch.lengths) + new_tokens
        if self.max_positions is None or longest <= self.max_positions:
            return
        what = f"{max(batch.lengths)} tokens" + (f" + {new_tokens} to generate" if new_tokens else "")
        if self.learned_positions is not None:
            raise IndexOutOfRangeError(f"at most {self.learned_positions} positions per row (this model's learned "
                                       "position embeddings)", what,
                                       f"truncate or split the inputs, e.g. tokenizer(text, truncation=True, "
                                       f"max_length={self.learned_positions - new_tokens})")
        self.warn_once("context", f"inputs of {what} run past the {self.max_positions} positions this model was "
                                  "trained on (max_position_embeddings): results there are extrapolation")

    def check_text(self, batch: Batch, tokenizer: Any) -> None:
        """Warn once when a row of text became only unknown tokens (besides special tokens such as BOS)."""
        unk = getattr(tokenizer, "unk_token_id", None)
        if unk is None:
            return
        special = set(getattr(tokenizer, "all_special_ids", ())) - {unk}
        rows = []
        for i, (ids, real) in enumerate(zip(batch.input_ids.tolist(), batch.attention_mask.tolist(), strict=True)):
            tokens = [t for t, r in zip(ids, real, strict=True) if r and t not in special]
            if tokens and all(t == unk for t in tokens):
                rows.append(i)
        if rows:
            self.warn_once("unk", f"text of rows {rows} became only unknown tokens ({tokenizer.unk_token!r}): the "
                                  "tokenizer cannot read it (another script or encoding?)")

    def warn_once(self, key: str, message: str) -> None:
        """Warn with ``message`` the first time ``key`` comes up, pointing at the first caller outside lsi."""
        if key in self.warned:
            return
        self.warned.add(key)
        frame, level = sys._getframe(), 1
        while frame.f_back is not None and frame.f_globals.get("__name__", "").startswith("lsi."):
            frame, level = frame.f_back, level + 1
        warnings.warn(message, stacklevel=level)
