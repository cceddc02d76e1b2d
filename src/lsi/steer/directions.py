"""Steering directions from data: difference in means, PCA of paired differences, a linear probe's weights.

Every direction is read at one site whose value is ``[batch, pos, d]`` (residual states, ``attn.out``,
``mlp.out``, one head's ``attn.head_out[h]``, ...) at chosen real-token positions (padding-aware: ``"last"`` is
each row's last real token whatever the padding side); :func:`diff_in_means_by_site` reads several sites from the
same forward passes. Inputs are streamed ``batch_size`` rows at a time.
Results are float32 CPU tensors; :func:`diff_in_means` is in the site's activation units (add it as is with
``alpha=1`` to move the negative mean onto the positive one), :func:`pca_of_differences` and
:func:`probe_direction` are unit vectors.

Example:
    >>> import lsi
    >>> from lsi.testing import tiny_model
    >>> lm = lsi.LanguageModel(tiny_model("llama"))
    >>> v = diff_in_means(lm, [[5, 6, 7], [5, 8]], [[5, 6, 9], [4, 9]], "blocks.1.resid_pre")
    >>> tuple(v.shape)
    (32,)
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch

from lsi.core.inputs import Batch
from lsi.core.positions import PositionSpec, as_positions
from lsi.core.sites import Site
from lsi.errors import InputError
from lsi.locate.probing import Labels, train_probe

if TYPE_CHECKING:
    from lsi.core.inputs import Inputs
    from lsi.core.model import LanguageModel


def _check_vector_site(lm: LanguageModel, s: Site) -> Site:
    if s.info.position_axis != 1 or len(lm.site_shape(s)) != 3:
        raise InputError("a site with one vector per position ([batch, pos, d])",
                         f"{s} of shape {lm.site_shape(s)}",
                         "use a residual site, attn.out, mlp.out or one head: 'blocks.0.attn.head_out[2]'")
    return s


def one_site(lm: LanguageModel, site: str | Site) -> Site:
    """The single concrete site ``site`` names, checked to hold one vector per position."""
    sites = lm.resolve_sites(site)
    if len(sites) != 1:
        raise InputError("one concrete site", f"{site!r} (expands to {len(sites)} sites)",
                         "name one layer, e.g. 'blocks.2.resid_pre'")
    return _check_vector_site(lm, sites[0])


def _sums(lm: LanguageModel, inputs: Inputs | Batch, sites: list[Site], positions: PositionSpec,
          batch_size: int) -> Iterator[tuple[dict[Site, torch.Tensor], torch.Tensor]]:
    """Per chunk, from one forward pass: the sum of each site's value over each row's selected positions
    ``{site: [b, d]}`` (float64) and the number of positions selected per row ``[b]``."""
    selector = as_positions(positions)
    for batch in lm.batches(inputs, batch_size):
        mask = selector.mask(batch.input_ids, batch.attention_mask)
        counts = mask.sum(1)
        if bool((counts == 0).any()):
            rows = torch.nonzero(counts == 0).flatten().tolist()
            raise InputError(f"positions={selector} to select at least one real token in every row",
                             f"no token selected in rows {rows[:10]} of a batch", "choose positions every input has")
        cache = lm.run_with_cache(batch, sites=sites)
        yield {s: (cache[s].double() * mask.to(cache[s].device)[..., None]).sum(1).cpu() for s in sites}, counts.cpu()


def diff_in_means_by_site(lm: LanguageModel, positive: Inputs | Batch, negative: Inputs | Batch,
                          sites: str | Site | Sequence[str | Site], *, positions: PositionSpec = "last",
                          batch_size: int = 64) -> dict[str, torch.Tensor]:
    """:func:`diff_in_means` at every site ``sites`` names (patterns expand, e.g. ``"blocks.*.resid_pre"``), keyed
    by concrete site name, from one forward pass per batch of each input set whatever the number of sites.

    Example:
        >>> import lsi
        >>> from lsi.testing import tiny_model
        >>> lm = lsi.LanguageModel(tiny_model("llama"))
        >>> by_site = diff_in_means_by_site(lm, [[3, 10]], [[3, 11]], "blocks.*.resid_pre")
        >>> list(by_site), tuple(by_site["blocks.1.resid_pre"].shape)
        (['blocks.0.resid_pre', 'blocks.1.resid_pre'], (32,))
    """
    concrete = [_check_vector_site(lm, s) for s in lm.resolve_sites(sites)]

    def means(inputs: Inputs | Batch) -> dict[Site, torch.Tensor]:
        totals, count = dict.fromkeys(concrete, torch.zeros((), dtype=torch.float64)), 0
        for sums, counts in _sums(lm, inputs, concrete, positions, batch_size):
            totals = {s: totals[s] + sums[s].sum(0) for s in concrete}
            count += int(counts.sum())
        return {s: total / count for s, total in totals.items()}

    mean_positive, mean_negative = means(positive), means(negative)
    return {str(s): (mean_positive[s] - mean_negative[s]).float() for s in concrete}


def diff_in_means(lm: LanguageModel, positive: Inputs | Batch, negative: Inputs | Batch, site: str | Site, *,
                  positions: PositionSpec = "last", batch_size: int = 64) -> torch.Tensor:
    """``μ⁺ − μ⁻``: the mean of ``site``'s value over every selected real token of the positive inputs minus the
    same mean over the negative inputs (token-weighted: with ``positions="all"`` a longer input counts more).

    Returns ``[d]`` (``d_model`` for residual sites) in activation units, float32 on the CPU. Several sites:
    :func:`diff_in_means_by_site` (one pass for all).

    Example:
        >>> import lsi
        >>> from lsi.testing import tiny_model
        >>> lm = lsi.LanguageModel(tiny_model("llama"))
        >>> e = lm.weights.W_E
        >>> v = diff_in_means(lm, [[3, 10]], [[3, 11]], "blocks.0.resid_pre")  # the embedding: W_E[10] - W_E[11]
        >>> torch.allclose(v, e[10] - e[11])
        True
    """
    s = one_site(lm, site)
    return diff_in_means_by_site(lm, positive, negative, s, positions=positions, batch_size=batch_size)[str(s)]


def site_features(lm: LanguageModel, inputs: Inputs | Batch, site: str | Site, *, positions: PositionSpec = "last",
                  batch_size: int = 64) -> torch.Tensor:
    """One feature vector per input ``[n, d]``: the site's value at the selected positions (their mean when
    several are selected), float32 on the CPU. Feed it to :func:`probe_direction`.

    Example:
        >>> import lsi
        >>> from lsi.testing import tiny_model
        >>> lm = lsi.LanguageModel(tiny_model("llama"))
        >>> tuple(site_features(lm, [[3, 4], [5, 6, 7]], "blocks.1.resid_post").shape)
        (2, 32)
    """
    s = one_site(lm, site)
    rows = [sums[s] / counts[:, None] for sums, counts in _sums(lm, inputs, [s], positions, batch_size)]
    return torch.cat(rows).float()


def pca_of_differences(lm: LanguageModel, pairs_a: Inputs | Batch, pairs_b: Inputs | Batch, site: str | Site, *,
                       k: int = 1, positions: PositionSpec = "last", batch_size: int = 64) -> torch.Tensor:
    """Top ``k`` principal directions of the paired differences ``a_i − b_i`` of :func:`site_features`.

    The PCA is uncentred (right singular vectors of the difference matrix, i.e. eigenvectors of ``E[δ δᵀ]``): a
    shift shared by every pair is the first direction, where centring would remove it. Each direction is
    sign-aligned to the mean difference (its dot product with it is ≥ 0). Returns unit rows ``[k, d]``;
    ``[0]`` is the top direction.

    Example:
        >>> import lsi
        >>> from lsi.testing import tiny_model
        >>> lm = lsi.LanguageModel(tiny_model("llama"))
        >>> dirs = pca_of_differences(lm, [[3, 10], [4, 10]], [[3, 11], [4, 11]], "blocks.0.resid_pre")
        >>> e = lm.weights.W_E
        >>> float(dirs[0] @ (e[10] - e[11]) / (e[10] - e[11]).norm()) > 0.999
        True
    """
    a = site_features(lm, pairs_a, site, positions=positions, batch_size=batch_size).double()
    b = site_features(lm, pairs_b, site, positions=positions, batch_size=batch_size).double()
    if a.shape != b.shape:
        raise InputError("as many inputs in pairs_a as in pairs_b (pair i = a[i], b[i])",
                         f"{a.shape[0]} and {b.shape[0]}", "pass aligned lists")
    if not 1 <= k <= min(a.shape):
        raise InputError(f"k in [1, {min(a.shape)}] (at most the number of pairs and the width)", str(k),
                         "lower k or add pairs")
    diffs = a - b
    directions = torch.linalg.svd(diffs, full_matrices=False).Vh[:k]
    signs = torch.where(directions @ diffs.mean(0) < 0, -1.0, 1.0).to(directions.dtype)
    return (directions * signs[:, None]).float()


def probe_direction(features: torch.Tensor, labels: Labels, *, positive: Hashable | None = None,
                    l2: float = 1e-3) -> torch.Tensor:
    """Unit weight vector of a logistic probe (:func:`lsi.locate.probing.train_probe`) separating two classes,
    in the raw feature space (the standardisation folded back in), pointing towards class ``positive``
    (default: the last class in sorted order, e.g. ``1`` or ``True``). Returns ``[d]``.

    Example:
        >>> x = torch.randn(200, 4, generator=torch.Generator().manual_seed(0))
        >>> d = probe_direction(x, (x[:, 2] > 0).long())
        >>> int(d.abs().argmax()), float(d[2]) > 0.9
        (2, True)
    """
    fitted = train_probe(features, labels, l2=l2)
    if len(fitted.classes) != 2:
        raise InputError("labels of exactly two classes", f"classes {fitted.classes!r}",
                         "probe one contrast at a time (e.g. label = class == c)")
    pos = fitted.classes[-1] if positive is None else positive
    if pos not in fitted.classes:
        raise InputError(f"positive among the classes {fitted.classes!r}", repr(pos), "name one of the labels")
    i = fitted.classes.index(pos)
    w = (fitted.weight[i] - fitted.weight[1 - i]) / fitted.std
    return (w / w.norm()).float()
