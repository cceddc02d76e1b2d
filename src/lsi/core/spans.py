"""Strings as users write them, found in token ids: a subject ("France") as the span of tokens that spell it in
each prompt, a target (" Paris") as one token id.

A span is found in the prompt's decoded text (special tokens kept, so chat-templated prompts work), so it does not
depend on how the string would be tokenized on its own: "France" is found inside the token " France". Every token
that overlaps the string's characters belongs to the span.

Example:
    >>> class Chars:  # a tokenizer with one token per character
    ...     def decode(self, ids, **kwargs): return "".join(chr(i) for i in ids)
    ...     def __call__(self, text, **kwargs): return {"input_ids": [ord(c) for c in text]}
    >>> ids = [ord(c) for c in "The capital of France is"]
    >>> token_span(Chars(), ids, "France")
    (15, 21)
    >>> token_id(Chars(), "P"), token_id(Chars(), 80)
    (80, 80)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lsi.errors import InputError

_SPAN_FIX = "pass the text exactly as it appears in the prompt (case, spacing), or a (start, stop) token span"


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    return str(tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False))


def token_span(tokenizer: Any, ids: Sequence[int], text: str) -> tuple[int, int]:
    """``(start, stop)``: the tokens of ``ids`` that spell ``text``, which must occur exactly once in their decoding.

    Raises :class:`InputError` when ``text`` is absent or occurs more than once.
    """
    if tokenizer is None:
        raise InputError("a tokenizer to find a string in token ids", "a model without one",
                         "load the model with its tokenizer, or pass (start, stop) token spans")
    if not text:
        raise InputError("a non-empty string to find", repr(text), "pass the subject as it appears in the prompt")
    whole = _decode(tokenizer, ids)
    first = whole.find(text)
    if first < 0:
        raise InputError(f"{text!r} in the prompt", f"not in {whole!r}", _SPAN_FIX)
    if whole.find(text, first + 1) >= 0:
        raise InputError(f"{text!r} once in the prompt", f"{whole.count(text)} times in {whole!r}",
                         "pass a longer string that occurs once, or a (start, stop) token span")
    last = first + len(text)
    # ends[i]: characters spelled by the first i + 1 tokens (a token that ends inside a multi-byte character spells
    # nothing until the character is complete)
    ends = [len(_common_prefix(_decode(tokenizer, ids[: i + 1]), whole)) for i in range(len(ids))]
    starts = [0, *ends[:-1]]
    inside = [i for i in range(len(ids)) if starts[i] < last and ends[i] > first]
    return inside[0], inside[-1] + 1


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def token_spans(tokenizer: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                texts: str | Sequence[str]) -> list[tuple[int, int]]:
    """One ``(start, stop)`` real-token span per row of a padded batch: ``texts`` is one string for every row or
    one per row."""
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids.cpu(), attention_mask.cpu(), strict=True)]
    per_row = [texts] * len(rows) if isinstance(texts, str) else list(texts)
    if len(per_row) != len(rows):
        raise InputError(f"one string for every prompt, or one per prompt ({len(rows)})", f"{len(per_row)} strings",
                         "pass a single string or a list as long as the prompts")
    spans = []
    for row, (ids, text) in enumerate(zip(rows, per_row, strict=True)):
        try:
            spans.append(token_span(tokenizer, ids, text))
        except InputError as err:
            raise InputError(err.expected, f"prompt {row}: {err.found}", err.fix) from None
    return spans


def token_id(tokenizer: Any, target: str | int) -> int:
    """The id of a one-token string (mind a leading space, e.g. ``" Paris"``), or ``target`` if it is an id."""
    if isinstance(target, int):
        return target
    if tokenizer is None:
        raise InputError("a tokenizer to encode a target string", "a model without one", "pass the token id")
    ids = list(tokenizer(target, add_special_tokens=False)["input_ids"])
    if len(ids) != 1:
        raise InputError("a target text that is one token", f"{target!r} -> {len(ids)} tokens {ids}",
                         "pass the token id, or a one-token word (with its leading space where the tokenizer has one)")
    return int(ids[0])
