"""Attention-based head scores from cached attention patterns: previous-token, induction (prefix matching),
attention mass on chosen tokens, and the attention sink.

Every score is a mean over (row, query position) of the attention probability that a query puts on its target
keys; queries and keys are real tokens only, so left- and right-padded batches give the same scores. Results
are layer × head grids. Attention patterns need eager attention (the model is switched, with a warning).

Example:
    >>> import lsi
    >>> from lsi.testing import tiny_model
    >>> lm = lsi.LanguageModel(tiny_model("llama", attn_implementation="eager"))
    >>> ids = repeated_random_tokens(4, 6, vocab=(3, 97), bos=1)
    >>> tuple(ids.shape)
    (4, 13)
    >>> induction_scores(lm, ids).shape
    (2, 4)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from lsi.core.inputs import Batch
from lsi.core.positions import PositionSpec, Span, as_positions
from lsi.errors import InputError
from lsi.locate.result import LocateResult

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel

# (batch) -> (target keys [b, q or 1, k] bool, queries [b, q] bool)
Targets = Callable[[Batch], tuple[torch.Tensor, torch.Tensor]]


def _head_means(lm: LanguageModel, inputs: Any, targets: Targets, batch_size: int, method: str,
                **settings: Any) -> LocateResult:
    """Mean over selected queries of the attention mass on their target keys, per head (streamed)."""
    sites = [f"blocks.{layer}.attn.pattern" for layer in range(lm.dims.n_layers)]
    total = torch.zeros(lm.dims.n_layers, lm.dims.n_heads, dtype=torch.float64)
    count = 0
    for batch in lm.batches(inputs, batch_size):
        cache = lm.run_with_cache(batch, sites)
        keys, queries = targets(batch)
        real = batch.attention_mask.bool()
        keys = keys & real[:, None, :]
        for layer, site in enumerate(sites):
            mass = (cache[site] * keys[:, None]).sum(-1)  # [b, h, q]
            total[layer] += mass.transpose(1, 2)[queries].double().sum(0).cpu()
        count += int(queries.sum())
    if count == 0:
        raise InputError(f"at least one query position for {method}", "none (every row too short, or no match)",
                         "pass longer inputs (e.g. repeated_random_tokens for induction scores)")
    grid = (("layer", tuple(str(i) for i in range(lm.dims.n_layers))),
            ("head", tuple(str(h) for h in range(lm.dims.n_heads))))
    return LocateResult(total / count, grid, method=method, settings={**settings, "n_queries": count})


def _not_first(batch: Batch) -> torch.Tensor:
    return Span(1, None).mask(batch.input_ids, batch.attention_mask)


def previous_token_scores(lm: LanguageModel, inputs: Any, *, batch_size: int = 32) -> LocateResult:
    """Mean attention from each real token (but the first) to the token right before it.

    Example: ``previous_token_scores(lm, texts).top(3)``.
    """
    def targets(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(batch.input_ids.shape[1], device=batch.input_ids.device)
        return (pos[None, :] == pos[:, None] - 1)[None], _not_first(batch)
    return _head_means(lm, inputs, targets, batch_size, "previous_token_scores")


def induction_scores(lm: LanguageModel, inputs: Any, *, batch_size: int = 32) -> LocateResult:
    """Prefix-matching score: mean attention from each token to the tokens that followed its earlier occurrences
    (queries without an earlier occurrence are skipped). On ``<bos> R R`` sequences from
    :func:`repeated_random_tokens` it is the attention from the second copy to the token after the first.

    Example: ``induction_scores(lm, repeated_random_tokens(64, 20, vocab=(100, 20000), bos=1)).top(5)``.
    """
    def targets(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        ids, real = batch.input_ids, batch.attention_mask.bool()
        same = (ids[:, :, None] == ids[:, None, :]) & real[:, None, :]  # [b, q, j]: token j equals token q
        keys = torch.zeros_like(same)
        keys[:, :, 1:] = same[:, :, :-1]  # key k = j + 1 follows an occurrence j of the query's token
        keys &= torch.ones_like(same[0]).tril()  # j < q, so k <= q
        return keys, keys.any(-1) & real
    return _head_means(lm, inputs, targets, batch_size, "induction_scores")


def attention_mass(lm: LanguageModel, inputs: Any, keys: PositionSpec, *, queries: PositionSpec = None,
                   batch_size: int = 32) -> LocateResult:
    """Mean attention mass that the ``queries`` positions (default: every real token) put on the ``keys``
    positions: e.g. ``keys=lsi.Match(refusal_ids)`` for chosen tokens, ``keys=0`` for the first token.

    Example: ``attention_mass(lm, prompts, lsi.Match(tok.encode(" sorry")), queries="last")``.
    """
    key_sel, query_sel = as_positions(keys), as_positions(queries)

    def targets(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return (key_sel.mask(batch.input_ids, batch.attention_mask)[:, None],
                query_sel.mask(batch.input_ids, batch.attention_mask))
    return _head_means(lm, inputs, targets, batch_size, "attention_mass", keys=str(key_sel), queries=str(query_sel))


def attention_sink_scores(lm: LanguageModel, inputs: Any, *, batch_size: int = 32) -> LocateResult:
    """Mean attention on the first real token (the sink) from every later real token.

    Example: ``attention_sink_scores(lm, texts).top(5)``.
    """
    def targets(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return as_positions(0).mask(batch.input_ids, batch.attention_mask)[:, None], _not_first(batch)
    return _head_means(lm, inputs, targets, batch_size, "attention_sink_scores")


def repeated_random_tokens(n: int, length: int, *, vocab: tuple[int, int], bos: int | None = None,
                           seed: int = 0) -> torch.Tensor:
    """``[n, (bos) + 2 * length]`` ids: ``<bos> R R`` with R drawn from ``range(*vocab)`` (without repeats when the
    range is large enough, so each token of the second copy has exactly one earlier occurrence).

    Example: ``repeated_random_tokens(2, 3, vocab=(10, 20), seed=0).shape`` is ``(2, 6)``.
    """
    low, high = vocab
    if n < 1 or length < 1 or high - low < 2:
        raise InputError("n >= 1, length >= 1 and a vocab range (low, high) of at least two ids",
                         f"n={n}, length={length}, vocab={vocab}",
                         "e.g. repeated_random_tokens(64, 20, vocab=(3, 500))")
    gen = torch.Generator().manual_seed(seed)
    if high - low >= length:
        block = torch.stack([torch.randperm(high - low, generator=gen)[:length] for _ in range(n)]) + low
    else:
        block = torch.randint(low, high, (n, length), generator=gen)
    first = [] if bos is None else [torch.full((n, 1), bos, dtype=torch.long)]
    return torch.cat([*first, block, block], 1)
