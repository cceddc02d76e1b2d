"""Steering directions: diff-in-means against a per-example reference and a planted embedding difference (several
sites from one pass per batch), PCA of paired differences against a direct SVD, probe directions on planted data,
padding and bad input."""

from __future__ import annotations

import pytest
import torch

from lsi.core.positions import Index, Match
from lsi.errors import InputError
from lsi.steer.directions import (
    diff_in_means,
    diff_in_means_by_site,
    pca_of_differences,
    probe_direction,
    site_features,
)

POSITIVE = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14, 15, 16, 17, 18]]
NEGATIVE = [[20, 21, 22], [23, 24, 25, 26, 27, 28], [29, 30]]
SITE = "blocks.1.resid_post"


def _reference_mean(lm, rows, site, positions):
    """Token-weighted mean of ``site`` over the selected positions, each row run alone (no padding)."""
    values = []
    for row in rows:
        value = lm.run_with_cache([row], sites=[site])[site][0]
        picked = {"last": [len(row) - 1], "all": list(range(len(row)))}[positions] if isinstance(positions, str) \
            else positions
        values.append(value[picked])
    return torch.cat(values).mean(0)


@pytest.mark.unit
@pytest.mark.parametrize("positions", ["last", "all", [1]])
def test_diff_in_means_matches_unpadded_per_example_reference(tiny_lm, positions):
    lm = tiny_lm("llama")
    got = diff_in_means(lm, POSITIVE, NEGATIVE, SITE, positions=positions)
    want = _reference_mean(lm, POSITIVE, SITE, positions) - _reference_mean(lm, NEGATIVE, SITE, positions)
    assert got.shape == (lm.dims.d_model,) and got.dtype == torch.float32
    assert float(want.norm()) > 0.03  # tiny random models have small activations: tolerances are 1e-6 here
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    streamed = diff_in_means(lm, POSITIVE, NEGATIVE, SITE, positions=positions, batch_size=1)
    torch.testing.assert_close(streamed, got, atol=1e-7, rtol=0)


@pytest.mark.unit
def test_diff_in_means_by_site_reads_every_site_from_one_pass_per_batch(tiny_lm):
    lm = tiny_lm("llama")
    sites = ["blocks.*.resid_pre", SITE, "blocks.0.attn.head_out[1]", "blocks.0.attn.head_out[2]"]
    passes: list[int] = []
    handle = lm.model.register_forward_pre_hook(lambda *_: passes.append(1))
    try:
        got = diff_in_means_by_site(lm, POSITIVE, NEGATIVE, sites, positions="all", batch_size=2)
    finally:
        handle.remove()
    assert len(passes) == 4  # 2 batches of 4 positive rows + 2 of 3 negative rows, whatever the number of sites
    assert list(got) == ["blocks.0.resid_pre", "blocks.1.resid_pre", SITE, "blocks.0.attn.head_out[1]",
                         "blocks.0.attn.head_out[2]"]
    for site, v in got.items():
        want = _reference_mean(lm, POSITIVE, site, "all") - _reference_mean(lm, NEGATIVE, site, "all")
        torch.testing.assert_close(v, want, atol=1e-6, rtol=0)
        assert torch.equal(v, diff_in_means(lm, POSITIVE, NEGATIVE, site, positions="all", batch_size=2)), site


@pytest.mark.unit
def test_diff_in_means_is_padding_side_independent(tiny_lm):
    lm = tiny_lm("llama")
    left_pos = lm.to_batch(POSITIVE, padding_side="left")
    left_neg = lm.to_batch(NEGATIVE, padding_side="left")
    assert left_pos.has_padding
    torch.testing.assert_close(diff_in_means(lm, left_pos, left_neg, SITE, batch_size=3),
                               diff_in_means(lm, POSITIVE, NEGATIVE, SITE), atol=1e-6, rtol=0)


@pytest.mark.unit
def test_diff_in_means_recovers_a_planted_embedding_difference(tiny_lm):
    # At the first layer's input the value at a position is the token's embedding (Llama: no positional one), so
    # prompts ending in 40 vs 41 differ in their last-token mean by exactly W_E[40] - W_E[41].
    lm = tiny_lm("llama")
    prefixes = [[3, 4], [5], [6, 7, 8], [9, 10]]
    got = diff_in_means(lm, [[*p, 40] for p in prefixes], [[*p, 41] for p in prefixes], "blocks.0.resid_pre")
    w_e = lm.weights.W_E
    torch.testing.assert_close(got, w_e[40] - w_e[41], atol=1e-6, rtol=0)


@pytest.mark.unit
def test_site_features_of_one_head_and_of_several_positions(tiny_lm):
    lm = tiny_lm("llama")
    rows = [[5, 6, 7], [8, 9, 10]]
    head = site_features(lm, rows, "blocks.0.attn.head_out[1]")
    cache = lm.run_with_cache(rows, sites=["blocks.0.attn.head_out"])
    torch.testing.assert_close(head, cache["blocks.0.attn.head_out[1]"][:, -1], atol=1e-6, rtol=0)
    pooled = site_features(lm, rows, SITE, positions=[0, 2])
    full = lm.run_with_cache(rows, sites=[SITE])[SITE]
    torch.testing.assert_close(pooled, full[:, [0, 2]].mean(1), atol=1e-6, rtol=0)


@pytest.mark.unit
def test_pca_of_differences_matches_a_direct_svd_and_is_sign_aligned(tiny_lm):
    lm = tiny_lm("llama")
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(3, 97, (12, 5), generator=gen).tolist()
    b = [[*row[:-1], 50] for row in a]
    dirs = pca_of_differences(lm, a, b, SITE, k=2)
    diffs = (site_features(lm, a, SITE) - site_features(lm, b, SITE)).double()
    vh = torch.linalg.svd(diffs, full_matrices=False).Vh[:2].float()
    assert dirs.shape == (2, lm.dims.d_model)
    for got, want in zip(dirs, vh, strict=True):
        assert abs(float(got @ want)) == pytest.approx(1.0, abs=1e-5)  # same axis
    assert bool((dirs.double() @ diffs.mean(0) >= 0).all())  # pointing along the mean difference
    torch.testing.assert_close(pca_of_differences(lm, b, a, SITE, k=2), -dirs, atol=1e-5, rtol=0)


@pytest.mark.unit
def test_pca_of_differences_recovers_a_shared_shift(tiny_lm):
    # Every pair differs by the same embedding difference: a rank-one set whose top direction is that difference
    # (a centred PCA would have nothing left to find).
    lm = tiny_lm("llama")
    prefixes = [[3, 4], [5], [6, 7, 8], [9, 10], [11]]
    top = pca_of_differences(lm, [[*p, 40] for p in prefixes], [[*p, 41] for p in prefixes], "blocks.0.resid_pre")[0]
    shift = lm.weights.W_E[40] - lm.weights.W_E[41]
    torch.testing.assert_close(top, shift / shift.norm(), atol=1e-5, rtol=0)


@pytest.mark.unit
def test_probe_direction_recovers_a_planted_direction_on_unequal_scales():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(600, 12, generator=gen) * torch.linspace(0.3, 4.0, 12)
    planted = torch.randn(12, generator=gen)
    labels = (x @ planted > 0).long()
    direction = probe_direction(x, labels)
    assert float(direction.norm()) == pytest.approx(1.0, abs=1e-5)
    assert float(direction @ planted / planted.norm()) > 0.9
    torch.testing.assert_close(probe_direction(x, labels, positive=0), -direction, atol=1e-5, rtol=0)


@pytest.mark.unit
def test_bad_input_is_refused_with_typed_errors(tiny_lm):
    lm = tiny_lm("llama")
    with pytest.raises(InputError, match="one concrete site"):
        diff_in_means(lm, POSITIVE, NEGATIVE, "blocks.*.resid_pre")
    with pytest.raises(InputError, match="one vector per position"):
        diff_in_means(lm, POSITIVE, NEGATIVE, "blocks.0.attn.pattern")
    with pytest.raises(InputError, match="at least one real token in every row"):
        diff_in_means(lm, POSITIVE, NEGATIVE, SITE, positions=Match(96))
    with pytest.raises(InputError, match="as many inputs"):
        pca_of_differences(lm, POSITIVE, NEGATIVE, SITE)
    with pytest.raises(InputError, match="k in"):
        pca_of_differences(lm, POSITIVE, POSITIVE, SITE, k=5)
    with pytest.raises(InputError, match="exactly two classes"):
        probe_direction(torch.randn(9, 3), [0, 1, 2] * 3)
    with pytest.raises(InputError, match="positive among"):
        probe_direction(torch.randn(8, 3), [0, 1] * 4, positive="yes")
    with pytest.raises(InputError, match="batch_size"):
        diff_in_means(lm, POSITIVE, NEGATIVE, SITE, batch_size=0)
    with pytest.raises(Exception, match="position"):
        diff_in_means(lm, POSITIVE, NEGATIVE, SITE, positions=Index(4))  # [9, 10] has no position 4
