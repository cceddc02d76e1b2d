"""Functional helpers every measurement shares: next-token log-probabilities and NLL over padded batches,
KL(p ‖ q) from log-probabilities, masked means and the index of each row's last real token.

Precision is the caller's choice (``dtype``): the log-softmax runs in it, so float32 and float64 callers get
the same numbers they computed by hand.

Example:
    >>> import torch
    >>> logits = torch.zeros(1, 3, 4)  # uniform next-token distributions
    >>> next_token_nll(logits, torch.tensor([[0, 1, 2]]))
    tensor([[1.3863, 1.3863]])
    >>> logp = torch.tensor([0.5, 0.5]).log()
    >>> float(kl_divergence(logp, logp))
    0.0
    >>> last_positions(torch.tensor([[1, 1, 0], [0, 1, 1]])).tolist()
    [1, 2]
"""

from __future__ import annotations

import torch


def next_token_logprobs(logits: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[batch, pos - 1, vocab]``: log-probabilities (computed in ``dtype``) of the token after each position but
    the last."""
    return logits[:, :-1].to(dtype).log_softmax(-1)


def next_token_logprob(logits: torch.Tensor, ids: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[batch, pos - 1]``: the log-probability of each actual next token ``ids[:, 1:]`` under ``logits[:, :-1]``
    (padding positions included; mask them with :func:`masked_mean` or a selection)."""
    logp = next_token_logprobs(logits, dtype=dtype)
    return logp.gather(-1, ids[:, 1:, None].to(logp.device)).squeeze(-1)


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[batch, pos - 1]``: the negative log-likelihood of each next token (see :func:`next_token_logprob`)."""
    return -next_token_logprob(logits, ids, dtype=dtype)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is set (0 when nothing is): ``Σ values·mask / max(Σ mask, 1)``."""
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``KL(p ‖ q) = Σ_v p(v) (log p(v) − log q(v))`` over the last axis, from log-probabilities (in their dtype)."""
    return (logp.exp() * (logp - logq)).sum(-1)


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """``[batch]``: the index of each row's last real token (left or right padding)."""
    width = attention_mask.shape[1]
    return width - 1 - attention_mask.flip(1).long().argmax(1)


def last_token_logits(logits: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[batch, vocab]``: the logits at each row's last real token."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, last_positions(attention_mask).to(logits.device)]
