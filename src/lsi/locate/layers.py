"""Layer distances: how far contrastive inputs sit apart per layer, and how much each layer changes the residual
stream (Block Influence, angular distance).

x^l is the residual stream entering layer l (``blocks.{l}.resid_pre``) and x^L the last layer's output
(``blocks.{L-1}.resid_post``, before the final norm). Means run over the selected real tokens of every row.

Example:
    >>> import lsi
    >>> from lsi.testing import tiny_model
    >>> lm = lsi.LanguageModel(tiny_model("llama"))
    >>> block_influence(lm, [[5, 6, 7], [8, 9]]).labels
    ['blocks.0', 'blocks.1']
    >>> angular_distance(lm, [[5, 6, 7]], n=2).labels
    ['blocks.0']
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from lsi.core.positions import PositionSpec, as_positions
from lsi.errors import InputError
from lsi.locate.magnitude import require_tokens, unit_sites, unit_values
from lsi.locate.result import LocateResult

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel, SiteSpec


def layer_distances(lm: LanguageModel, inputs_a: Any, inputs_b: Any, sites: SiteSpec = "blocks.*.resid_post", *,
                    positions: PositionSpec = "last", batch_size: int = 32) -> LocateResult:
    """Mean ||x_a − x_b|| (L2) per site between paired rows of two inputs, over the ``positions`` of each row
    (``"last"``: each row's last real token, so paired rows may differ in length; ``"all"`` needs equal lengths).

    Example: ``layer_distances(lm, clean_prompts, corrupted_prompts).top(3)``.
    """
    concrete = unit_sites(lm, sites)
    batch_a, batch_b = lm.to_batch(inputs_a), lm.to_batch(inputs_b)
    n_a, n_b = len(batch_a.input_ids), len(batch_b.input_ids)
    if n_a != n_b:
        raise InputError("the same number of rows in both inputs (pairs)", f"{n_a} and {n_b}", "pair every row")
    select = as_positions(positions)
    total = torch.zeros(len(concrete), dtype=torch.float64)
    count = 0
    for a, b in zip(lm.batches(batch_a, batch_size), lm.batches(batch_b, batch_size), strict=True):
        mask_a, mask_b = (select.mask(x.input_ids, x.attention_mask) for x in (a, b))
        if not torch.equal(mask_a.sum(1), mask_b.sum(1)):
            raise InputError(f"the same number of selected tokens ({select}) in each pair of rows",
                             f"{mask_a.sum(1).tolist()} and {mask_b.sum(1).tolist()}",
                             "use positions='last' for pairs of different lengths")
        cache_a, cache_b = lm.run_with_cache(a, concrete), lm.run_with_cache(b, concrete)
        for i, s in enumerate(concrete):
            diff = unit_values(cache_a, s)[mask_a].double() - unit_values(cache_b, s)[mask_b].double()
            total[i] += diff.norm(dim=-1).sum().cpu()
        count += int(mask_a.sum())
    return LocateResult.over([str(s) for s in concrete], total / require_tokens(count), method="layer_distances",
                             positions=str(select), n_tokens=count)


def _mean_over_tokens(lm: LanguageModel, inputs: Any, n: int, fn: Callable[[torch.Tensor], torch.Tensor],
                      positions: PositionSpec, batch_size: int) -> torch.Tensor:
    """Mean over selected real tokens of ``fn(cos(x^l, x^{l+n}))`` for l = 0 .. L − n."""
    layers = lm.dims.n_layers
    if not 1 <= n <= layers:
        raise InputError(f"a layer gap n in [1, {layers}]", str(n), "e.g. n=1 for adjacent layers")
    sites = [*(f"blocks.{layer}.resid_pre" for layer in range(layers)), f"blocks.{layers - 1}.resid_post"]
    select = as_positions(positions)
    total = torch.zeros(layers - n + 1, dtype=torch.float64)
    count = 0
    for batch in lm.batches(inputs, batch_size):
        cache = lm.run_with_cache(batch, sites)
        chosen = select.mask(batch.input_ids, batch.attention_mask)
        states = [cache[s][chosen].double() for s in sites]  # x^0 .. x^L, [tokens, d_model] each
        for layer in range(layers - n + 1):
            cos = torch.nn.functional.cosine_similarity(states[layer], states[layer + n], dim=-1)
            total[layer] += fn(cos).sum().cpu()
        count += int(chosen.sum())
    return total / require_tokens(count)


def block_influence(lm: LanguageModel, inputs: Any, *, positions: PositionSpec = None,
                    batch_size: int = 32) -> LocateResult:
    """Block Influence (ShortGPT): BI_l = 1 − E_{x,t} cos(x^l_t, x^{l+1}_t); low BI = a layer that barely changes
    the residual stream (a pruning candidate). Labels ``blocks.{l}``.

    Example: ``block_influence(lm, texts).top(3)`` (the most influential layers).
    """
    scores = _mean_over_tokens(lm, inputs, 1, lambda cos: 1 - cos, positions, batch_size)
    return LocateResult.over([f"blocks.{layer}" for layer in range(len(scores))], scores, method="block_influence",
                             positions=str(as_positions(positions)))


def angular_distance(lm: LanguageModel, inputs: Any, *, n: int = 1, positions: PositionSpec = None,
                     batch_size: int = 32) -> LocateResult:
    """Mean angular distance arccos(cos(x^l_t, x^{l+n}_t)) / π between the residual stream before layer l and
    after layer l + n − 1; label ``blocks.{l}`` names the block of ``n`` layers starting at l.

    Example: ``angular_distance(lm, texts, n=4, positions="last")`` (the lowest blocks are pruning candidates).
    """
    scores = _mean_over_tokens(lm, inputs, n, lambda cos: torch.arccos(cos.clamp(-1, 1)) / math.pi, positions,
                               batch_size)
    return LocateResult.over([f"blocks.{layer}" for layer in range(len(scores))], scores, method="angular_distance",
                             n=n, positions=str(as_positions(positions)))
