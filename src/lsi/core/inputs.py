"""Turning what users pass (text, token ids, tensors, HF encodings) into one padded batch.

Example:
    >>> b = to_batch([[5, 6, 7], [8]], tokenizer=None, padding_side="left", pad_id=0)
    >>> b.input_ids.tolist(), b.attention_mask.tolist()
    ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
    >>> b.position_ids.tolist()
    [[0, 1, 2], [0, 0, 0]]
    >>> [c.input_ids.tolist() for c in b.chunks(1)]  # all-padding columns of a chunk dropped
    [[[5, 6, 7]], [[8]]]
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lsi.errors import InputError

PaddingSide = Literal["left", "right"]
Inputs = str | Sequence[str] | torch.Tensor | Sequence[Sequence[int]] | Mapping[str, Any]


@dataclass(frozen=True)
class Batch:
    """Token ids ``[batch, pos]`` and the attention mask (1 = real token)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def position_ids(self) -> torch.Tensor:
        """Positions counted over real tokens, so padded and unpadded rows see the same positions."""
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    @property
    def has_padding(self) -> bool:
        return not bool(self.attention_mask.bool().all())

    @property
    def lengths(self) -> list[int]:
        return self.attention_mask.sum(-1).tolist()

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device))

    def repeat(self, k: int) -> Batch:
        """``k`` copies of the batch stacked along the batch axis (copy ``i`` is rows ``i*b .. (i+1)*b - 1``)."""
        return Batch(self.input_ids.repeat(k, 1), self.attention_mask.repeat(k, 1))

    def chunks(self, rows: int) -> Iterator[Batch]:
        """Consecutive batches of at most ``rows`` (>= 1) rows, each without the columns that are padding in all of its
        rows (positions count over real tokens, so nothing a row sees changes)."""
        for start in range(0, self.input_ids.shape[0], rows):
            mask = self.attention_mask[start:start + rows]
            cols = mask.bool().any(0).nonzero().flatten()
            keep = slice(int(cols[0]), int(cols[-1]) + 1) if len(cols) else slice(0, 0)
            yield Batch(self.input_ids[start:start + rows, keep], mask[:, keep])


def _pad(rows: list[list[int]], side: PaddingSide, pad_id: int) -> Batch:
    width = max(len(r) for r in rows)
    ids, mask = [], []
    for r in rows:
        fill = width - len(r)
        ids.append([pad_id] * fill + r if side == "left" else r + [pad_id] * fill)
        mask.append([0] * fill + [1] * len(r) if side == "left" else [1] * len(r) + [0] * fill)
    return Batch(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long))


def to_batch(inputs: Inputs | Batch, *, tokenizer: Any, padding_side: PaddingSide, pad_id: int) -> Batch:
    """Normalize inputs to a :class:`Batch` (text needs a tokenizer; ids are padded on ``padding_side``)."""
    if isinstance(inputs, Batch):
        batch = inputs
    elif isinstance(inputs, Mapping):
        if "input_ids" not in inputs:
            raise InputError("a mapping with 'input_ids'", f"keys {list(inputs)}", "pass a tokenizer's output")
        ids = torch.as_tensor(inputs["input_ids"])
        ids = ids.unsqueeze(0) if ids.dim() == 1 else ids
        mask = inputs.get("attention_mask")
        batch = Batch(ids, torch.ones_like(ids) if mask is None else torch.as_tensor(mask).view_as(ids))
    elif isinstance(inputs, torch.Tensor):
        if inputs.dtype.is_floating_point or inputs.dim() not in (1, 2):
            raise InputError("integer token ids shaped [pos] or [batch, pos]",
                             f"{inputs.dtype} tensor of shape {tuple(inputs.shape)}", "pass token ids")
        ids = inputs.unsqueeze(0) if inputs.dim() == 1 else inputs
        batch = Batch(ids.long(), torch.ones_like(ids, dtype=torch.long))
    else:
        try:
            texts_or_rows = [inputs] if isinstance(inputs, str) else list(inputs)
        except TypeError as err:
            raise InputError("a string, a list of strings, a list of token-id lists or a tensor",
                             f"{type(inputs).__name__} {inputs!r}"[:200], "pass text or token ids") from err
        if not texts_or_rows:
            raise InputError("at least one input", "an empty list", "pass a string, a list of strings or token ids")
        if all(isinstance(t, str) for t in texts_or_rows):
            if tokenizer is None:
                raise InputError("token ids (this model has no tokenizer)", "text",
                                 "pass token ids, or load the model with a tokenizer")
            rows = [tokenizer(t)["input_ids"] for t in texts_or_rows]
        elif all(isinstance(t, (list, tuple)) and all(isinstance(i, int) for i in t) for t in texts_or_rows):
            rows = [list(t) for t in texts_or_rows]
        elif all(isinstance(t, int) for t in texts_or_rows):
            rows = [list(texts_or_rows)]
        else:
            raise InputError("a string, a list of strings, a list of token-id lists or a tensor",
                             f"a list of {sorted({type(t).__name__ for t in texts_or_rows})}", "pass one kind")
        if any(len(r) == 0 for r in rows):
            raise InputError("at least one token per input", f"token counts {[len(r) for r in rows]}",
                             "drop empty strings or add text")
        batch = _pad(rows, padding_side, pad_id)
    if batch.input_ids.numel() == 0 or bool((batch.attention_mask.sum(-1) == 0).any()):
        raise InputError("at least one real token per row", f"shape {tuple(batch.input_ids.shape)}",
                         "drop empty rows")
    return batch
