"""Metrics: scalar functions of the logits that locate methods explain.

A metric is any callable ``metric(logits, batch) -> scalar tensor`` (differentiable, so gradient methods can use
it). The ready-made ones read the last real token of each row (padding-aware) unless said otherwise, average over
the batch, and carry a ``name`` that results record.

Example:
    >>> import torch
    >>> from lsi.core.inputs import Batch
    >>> batch = Batch(torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long))
    >>> logits = torch.zeros(1, 3, 5); logits[0, 2, 4] = 2.0
    >>> logit_diff(4, 0)(logits, batch).item()
    2.0
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lsi.core.inputs import Batch
from lsi.core.spans import token_id
from lsi.errors import InputError
from lsi.evaluation.functional import kl_divergence, last_positions, last_token_logits, masked_mean, next_token_logprob

Tokens = int | Sequence[int] | torch.Tensor  # one id for every row, or one per row
TokensOrText = Tokens | str | Sequence[str]  # text: one-token strings, with a tokenizer
TokenSets = Sequence[int] | Sequence[Sequence[int]]


@dataclass(frozen=True)
class Metric:
    """A named scalar function of ``(logits, batch)``."""

    name: str
    fn: Callable[[torch.Tensor, Batch], torch.Tensor]

    def __call__(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        return self.fn(logits, batch)


def metric_name(metric: object) -> str:
    return str(getattr(metric, "name", getattr(metric, "__name__", type(metric).__name__)))


def per_row_ids(tokens: Tokens, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """One token id per row ``[n]``: a single id repeated, or ``n`` ids checked."""
    ids = torch.as_tensor(tokens, dtype=torch.long, device=device).flatten()
    if ids.numel() == 1:
        return ids.expand(n)
    if ids.numel() != n:
        raise InputError(f"one target id, or one per row ({n} rows)", f"{ids.numel()} ids",
                         "pass an int or a list with one id per prompt")
    return ids


def as_token_ids(tokens: TokensOrText, tokenizer: Any) -> Tokens:
    """Token ids as they are, or the ids of one-token strings (``" Paris"``)."""
    if isinstance(tokens, str):
        return token_id(tokenizer, tokens)
    if isinstance(tokens, Sequence) and any(isinstance(t, str) for t in tokens):
        return [token_id(tokenizer, t) for t in tokens]
    return tokens  # type: ignore[return-value]


def logit(target: TokensOrText, *, tokenizer: Any = None) -> Metric:
    """Mean logit of ``target`` at the last real token (strings need ``tokenizer``, e.g. ``lm.tokenizer``)."""
    target = as_token_ids(target, tokenizer)

    def fn(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        last = last_token_logits(logits, batch.attention_mask)
        return last.gather(-1, per_row_ids(target, len(last), last.device)[:, None]).mean()
    return Metric(f"logit[{describe_tokens(target)}]", fn)


def logit_diff(correct: TokensOrText, incorrect: TokensOrText, *, tokenizer: Any = None) -> Metric:
    """Mean ``logit(correct) - logit(incorrect)`` at the last real token (strings need ``tokenizer``).

    Example:
        >>> logit_diff(" Paris", " Rome", tokenizer=lm.tokenizer)  # doctest: +SKIP
    """
    correct, incorrect = as_token_ids(correct, tokenizer), as_token_ids(incorrect, tokenizer)

    def fn(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        last = last_token_logits(logits, batch.attention_mask)
        n, dev = len(last), last.device
        return (last.gather(-1, per_row_ids(correct, n, dev)[:, None])
                - last.gather(-1, per_row_ids(incorrect, n, dev)[:, None])).mean()
    return Metric(f"logit_diff[{describe_tokens(correct)} - {describe_tokens(incorrect)}]", fn)


def prob_diff(tokens_a: TokenSets, tokens_b: TokenSets) -> Metric:
    """Mean ``P(any of tokens_a) - P(any of tokens_b)`` at the last real token (token sets shared by all rows)."""
    a, b = _id_set(tokens_a), _id_set(tokens_b)

    def fn(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        probs = last_token_logits(logits, batch.attention_mask).float().softmax(-1)
        return (probs[:, a].sum(-1) - probs[:, b].sum(-1)).mean()
    return Metric(f"prob_diff[{len(a)} vs {len(b)} tokens]", fn)


def target_logprob(target_lengths: int | Sequence[int]) -> Metric:
    """Mean log-probability of the (multi-token) target that ends each row: the last ``target_lengths`` real
    tokens, teacher-forced. Build such inputs with :func:`append_targets`."""
    def fn(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        logp = next_token_logprob(logits, batch.input_ids)
        n = logits.shape[0]
        lengths = per_row_ids(target_lengths, n, logits.device)
        ends = last_positions(batch.attention_mask).to(logits.device)  # index of each row's last token
        pos = torch.arange(logits.shape[1] - 1, device=logits.device)[None]  # predicts token pos + 1
        in_target = (pos + 1 > ends[:, None] - lengths[:, None]) & (pos + 1 <= ends[:, None])
        return (logp * in_target).sum(-1).mean()
    return Metric("target_logprob", fn)


def append_targets(prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> tuple[list[list[int]],
                                                                                                     Metric]:
    """Rows ``prompt + target`` and the :func:`target_logprob` metric that scores each target."""
    if len(prompts) != len(targets):
        raise InputError("one target per prompt", f"{len(prompts)} prompts, {len(targets)} targets",
                         "pass lists of equal length")
    if any(len(t) == 0 for t in targets):
        raise InputError("targets of at least one token", "an empty target", "drop it or give its tokens")
    rows = [[*p, *t] for p, t in zip(prompts, targets, strict=True)]
    return rows, target_logprob([len(t) for t in targets])


def loss() -> Metric:
    """Mean next-token cross-entropy over real tokens (larger = worse)."""
    def fn(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        real = (batch.attention_mask[:, 1:] * batch.attention_mask[:, :-1]).to(logits.device)
        return masked_mean(-next_token_logprob(logits, batch.input_ids), real)
    return Metric("loss", fn)


def kl_to(reference_logits: torch.Tensor, *, positions: str = "last") -> Metric:
    """Mean KL(reference ‖ current) at the last real token (``positions="all"``: every real token)."""
    if positions not in ("last", "all"):
        raise InputError("positions 'last' or 'all'", repr(positions), "pick one")

    def fn(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        ref = reference_logits.to(logits.device)
        if positions == "last":
            p, q = last_token_logits(ref, batch.attention_mask), last_token_logits(logits, batch.attention_mask)
            weights = torch.ones(len(p), device=logits.device)
        else:
            p, q = ref.flatten(0, 1), logits.flatten(0, 1)
            weights = batch.attention_mask.flatten().to(logits.device).float()
        kl = kl_divergence(p.float().log_softmax(-1), q.float().log_softmax(-1))
        return (kl * weights).sum() / weights.sum()
    return Metric(f"kl_to_reference[{positions}]", fn)


def _id_set(tokens: TokenSets) -> list[int]:
    flat = [int(t) for item in tokens for t in (item if isinstance(item, Sequence) else [item])]
    if not flat:
        raise InputError("a non-empty token set", "no ids", "pass at least one token id")
    return sorted(set(flat))


def describe_tokens(tokens: Tokens) -> str:
    """A short name for token ids in metric names: the id itself, or how many there are."""
    ids = torch.as_tensor(tokens).flatten().tolist()
    return str(ids[0]) if len(ids) == 1 else f"{len(ids)} ids"
