"""Site selectors: parsing, printing, expansion, TransformerLens names, errors; and cache addressing."""

from __future__ import annotations

import pytest
import torch

import lsi
from lsi.core.cache import ActivationCache
from lsi.core.sites import SITE_KINDS, Site, as_sites, from_transformer_lens, to_transformer_lens
from lsi.errors import IndexOutOfRangeError, LsiError, SiteError

pytestmark = pytest.mark.unit

CONTRACT_KINDS = {"embed", "resid_pre", "resid_mid", "resid_post", "attn.out", "attn.z", "attn.head_out",
                  "attn.pattern", "attn.q", "attn.k", "attn.v", "mlp.out", "mlp.post", "mlp.pre", "ln_final", "logits"}


def test_kinds_are_the_contract_table():
    assert set(SITE_KINDS) == CONTRACT_KINDS
    assert {k for k, v in SITE_KINDS.items() if not v.per_layer} == {"embed", "ln_final", "logits"}
    assert SITE_KINDS["attn.k"].shape == ("batch", "pos", "n_kv_heads", "d_head")
    assert SITE_KINDS["attn.pattern"].shape == ("batch", "n_heads", "q_pos", "k_pos")
    assert SITE_KINDS["attn.pattern"].position_axis == 2
    assert {k for k, v in SITE_KINDS.items() if v.index_axis is not None} == {
        "attn.z", "attn.head_out", "attn.pattern", "attn.q", "attn.k", "attn.v", "mlp.post", "mlp.pre"}


ROUND_TRIP = [
    "embed", "ln_final", "logits",
    "blocks.0.resid_pre", "blocks.11.resid_mid", "blocks.3.resid_post", "blocks.-1.resid_post", "blocks.-12.attn.out",
    "blocks.*.resid_pre", "blocks.0:2.mlp.out", "blocks.-3:-1.attn.z", "blocks.:2.attn.q", "blocks.1:.attn.k",
    "blocks.1,3.attn.head_out", "blocks.-1,0,2.mlp.pre",
    "blocks.3.attn.z[3]", "blocks.2.mlp.post[1,2]", "blocks.*.attn.head_out[0]", "blocks.0:2.mlp.post[5,7,9]",
    "blocks.5.attn.pattern[2]", "blocks.1.attn.v[1]", "blocks.-2.attn.q[0,3]",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_parse_str_round_trip(text):
    site = Site.parse(text)
    assert str(site) == text
    assert Site.parse(str(site)) == site
    assert Site.parse(site) is site
    assert hash(Site.parse(text)) == hash(site)


def test_parse_fields():
    s = Site.parse("blocks.5.attn.head_out[3]")
    assert (s.kind, s.layer, s.index) == ("attn.head_out", 5, 3)
    assert s == Site("attn.head_out", layer=5, head=3) == Site("attn.head_out", 5, 3)
    assert Site.parse("blocks.2.mlp.post[1,2]") == Site("mlp.post", 2, unit=[1, 2])
    assert Site.parse("blocks.2.mlp.post[1,2]").indices() == (1, 2)
    assert Site.parse("blocks.2.mlp.post[1]").indices() == (1,)
    assert Site.parse("blocks.-1.resid_pre").layer == -1
    assert Site.parse("blocks.*.resid_pre").is_pattern and not Site.parse("blocks.1.resid_pre").is_pattern
    assert Site("resid_pre", "2").layer == 2  # a digit string is an index, not a pattern
    assert Site.parse("  blocks.1.resid_pre ") == Site("resid_pre", 1)
    assert Site("attn.k", 0, head=1).index == 1  # head= on kv heads is fine
    assert Site.parse("blocks.3.attn.z[3]").without_index() == Site("attn.z", 3)


@pytest.mark.parametrize(("text", "n_layers", "layers"), [
    ("blocks.*.resid_pre", 4, [0, 1, 2, 3]),
    ("blocks.0:2.resid_pre", 4, [0, 1]),
    ("blocks.1,3.resid_pre", 4, [1, 3]),
    ("blocks.-1.resid_pre", 4, [3]),
    ("blocks.-4.resid_pre", 4, [0]),
    ("blocks.-2:.resid_pre", 4, [2, 3]),
    ("blocks.:-1.resid_pre", 4, [0, 1, 2]),
    ("blocks.-3:-1.resid_pre", 5, [2, 3]),
    ("blocks.-1,0.resid_pre", 3, [2, 0]),
])
def test_expand_normalizes_layers(text, n_layers, layers):
    site = Site.parse(text)
    assert site.layers(n_layers) == layers
    expanded = site.expand(n_layers)
    assert [s.layer for s in expanded] == layers
    assert all(s.kind == "resid_pre" and not s.is_pattern for s in expanded)


def test_expand_keeps_index_and_globals():
    assert [str(s) for s in Site.parse("blocks.*.attn.z[2]").expand(2)] == ["blocks.0.attn.z[2]", "blocks.1.attn.z[2]"]
    assert Site.parse("logits").expand(3) == [Site("logits")]


def test_as_sites_orders_and_dedups():
    got = as_sites(["blocks.1.resid_pre", "blocks.*.resid_pre", "blocks.-1.resid_pre", "embed"], n_layers=3)
    assert [str(s) for s in got] == ["blocks.1.resid_pre", "blocks.0.resid_pre", "blocks.2.resid_pre", "embed"]
    assert as_sites(Site("resid_post", -1), n_layers=2) == [Site("resid_post", 1)]


@pytest.mark.parametrize(("text", "n_layers"), [("blocks.4.resid_pre", 4), ("blocks.-5.resid_pre", 4),
                                                ("blocks.1,7.resid_pre", 4)])
def test_layer_out_of_range(text, n_layers):
    with pytest.raises(IndexOutOfRangeError, match="4 layers"):
        Site.parse(text).expand(n_layers)
    with pytest.raises(IndexError):  # also an IndexError for plain Python handling
        Site.parse(text).expand(n_layers)


@pytest.mark.parametrize(("text", "phrase"), [
    ("blocks.0.resid_prre", "resid_pre"),
    ("blocks.0.atn.z", "attn.z"),
    ("blocks.0.mlp.psot", "mlp.post"),
    ("resid_pre", "a layer"),
    ("blocks.0.embed", "no layer"),
    ("blocks.0.logits", "no layer"),
    ("blocks.0.resid_pre[3]", "no index"),
    ("blocks.0.attn.out[1]", "no index"),
    ("blocks.0.attn.z[a]", "integer"),
    ("blocks.0.attn.z[]", "integer"),
    ("blocks.x.resid_pre", "pattern"),
    ("blocks.1-2.resid_pre", "pattern"),
    ("blocks.0.resid_pre.", "site like"),
    ("", "site like"),
    ("hook_resid_pre", "a site kind"),
])
def test_parse_errors_have_remedies(text, phrase):
    with pytest.raises(SiteError) as info:
        Site.parse(text)
    err = info.value
    assert phrase in str(err)
    assert isinstance(err, LsiError) and isinstance(err, KeyError)
    assert err.fix and err.expected and err.found
    assert not str(err).startswith("'")  # not KeyError-quoted


def test_constructor_errors():
    with pytest.raises(SiteError, match="did you mean 'resid_pre'"):
        Site("resid_prre", 0)
    with pytest.raises(SiteError, match="head= only on per-head sites"):
        Site("resid_pre", 0, head=1)
    with pytest.raises(SiteError, match="unit= only on neuron or feature sites"):
        Site("attn.z", 0, unit=1)
    with pytest.raises(SiteError, match="at most one"):
        Site("mlp.post", 0, index=1, unit=2)
    with pytest.raises(SiteError, match="a layer"):
        Site("attn.z")
    with pytest.raises(SiteError, match="no layer"):
        Site("embed", layer=0)


def test_misspelled_site_message_suggests_the_kind():
    with pytest.raises(SiteError) as info:
        Site.parse("blocks.0.resid_prre")
    assert "did you mean 'resid_pre'" in info.value.fix


# --- TransformerLens names --------------------------------------------------------------------------------------

TL_PAIRS = [
    ("blocks.3.resid_pre", "blocks.3.hook_resid_pre"),
    ("blocks.3.resid_mid", "blocks.3.hook_resid_mid"),
    ("blocks.3.resid_post", "blocks.3.hook_resid_post"),
    ("blocks.0.attn.out", "blocks.0.hook_attn_out"),
    ("blocks.0.mlp.out", "blocks.0.hook_mlp_out"),
    ("blocks.1.attn.z", "blocks.1.attn.hook_z"),
    ("blocks.1.attn.q", "blocks.1.attn.hook_q"),
    ("blocks.1.attn.k", "blocks.1.attn.hook_k"),
    ("blocks.1.attn.v", "blocks.1.attn.hook_v"),
    ("blocks.1.attn.pattern", "blocks.1.attn.hook_pattern"),
    ("blocks.2.attn.head_out", "blocks.2.attn.hook_result"),
    ("blocks.2.mlp.pre", "blocks.2.mlp.hook_pre"),
    ("blocks.2.mlp.post", "blocks.2.mlp.hook_post"),
    ("embed", "hook_embed"),
    ("ln_final", "ln_final.hook_normalized"),
]


@pytest.mark.parametrize(("ours", "tl"), TL_PAIRS)
def test_transformer_lens_names_both_ways(ours, tl):
    assert lsi.to_transformer_lens(ours) == tl
    assert lsi.to_transformer_lens(Site.parse(ours)) == tl
    assert lsi.from_transformer_lens(tl) == Site.parse(ours)
    assert str(from_transformer_lens(to_transformer_lens(ours))) == ours


def test_transformer_lens_covers_every_kind_but_logits():
    assert {Site.parse(o).kind for o, _ in TL_PAIRS} == CONTRACT_KINDS - {"logits"}


def test_transformer_lens_errors():
    with pytest.raises(SiteError, match="no hook"):
        to_transformer_lens("logits")
    with pytest.raises(SiteError, match=r"blocks\.0\.hook_resid_pre"):
        from_transformer_lens("blocks.0.hook_resid_prre")
    for bad in ("hook_pos_embed", "blocks.0.attn.hook_attn_scores", "blocks.x.hook_resid_pre", "resid_pre"):
        with pytest.raises(SiteError):
            from_transformer_lens(bad)


# --- addressing a cache ----------------------------------------------------------------------------------------------

def _cache():
    z = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    post = torch.arange(2 * 3 * 6, dtype=torch.float32).view(2, 3, 6)
    resid = torch.randn(2, 3, 8)
    return ActivationCache({"blocks.1.attn.z": z, "blocks.0.mlp.post": post, "blocks.0.resid_post": resid,
                            "blocks.1.resid_post": resid + 1},
                           n_layers=2, attention_mask=torch.tensor([[1, 1, 1], [0, 1, 1]])), z, post, resid


def test_cache_addressing():
    cache, z, post, resid = _cache()
    assert torch.equal(cache["blocks.1.attn.z"], z)
    assert torch.equal(cache["blocks.-1.attn.z"], z)
    assert torch.equal(cache[Site("attn.z", 1, head=2)], z[:, :, 2])
    assert torch.equal(cache["blocks.1.attn.z[1,3]"], z[:, :, [1, 3]])
    assert torch.equal(cache["blocks.0.mlp.post[4]"], post[..., 4])
    assert torch.equal(cache.full("blocks.1.attn.z[2]"), z)
    assert "blocks.1.attn.z[0]" in cache and "blocks.0.attn.z" not in cache and "nonsense" not in cache
    assert len(cache) == 4 and set(cache) == {"blocks.1.attn.z", "blocks.0.mlp.post", "blocks.0.resid_post",
                                              "blocks.1.resid_post"}
    stacked = cache.stack("blocks.*.resid_post")
    assert stacked.shape == (2, 2, 3, 8) and torch.equal(stacked[1], resid + 1)


def test_cache_mean_excludes_padding():
    cache, z, post, _ = _cache()
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(cache.mean("blocks.0.mlp.post"), post[mask].mean(0))
    torch.testing.assert_close(cache.mean("blocks.1.attn.z[2]"), z[:, :, 2][mask].mean(0))


def test_cache_errors():
    cache, *_ = _cache()
    with pytest.raises(SiteError, match="add it to sites="):
        cache["blocks.0.attn.z"]
    with pytest.raises(SiteError, match="stack"):
        cache["blocks.*.resid_post"]
    with pytest.raises(IndexOutOfRangeError):
        cache["blocks.2.resid_post"]
