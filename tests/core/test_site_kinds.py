"""Open site kinds: a derived kind registered from outside lsi.core (a toy SAE) caches, patches and takes
gradients like a built-in site; references are computed with raw PyTorch hooks, without lsi."""

from __future__ import annotations

import pytest
import torch
from core_helpers import IDS, assert_no_hooks

import lsi
from lsi.core.bindings import bind_derived
from lsi.core.sites import (
    SITE_KINDS,
    Derived,
    Site,
    SiteKind,
    register_site_kind,
    registered_site_kind,
    to_transformer_lens,
    unregister_site_kind,
)
from lsi.errors import IndexOutOfRangeError, SiteError, SiteUnavailableError

pytestmark = pytest.mark.unit

D_SAE = 24  # != d_model (32)
ACTS = "resid_post.sae[toy].acts"
OTHER_IDS = torch.tensor([[40, 3, 11, 57, 26, 6, 33]])


class ToySAE:
    """relu(x @ W_enc + b_enc) and its decoder W_dec; written back as resid_post + (new - old) @ W_dec."""

    def __init__(self, d_model: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.W_enc = torch.randn(d_model, D_SAE, generator=g) / d_model**0.5
        self.b_enc = torch.randn(D_SAE, generator=g) * 0.1
        self.W_dec = torch.randn(D_SAE, d_model, generator=g) / D_SAE**0.5

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.W_enc + self.b_enc)

    def write(self, x: torch.Tensor, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return x + (new - old) @ self.W_dec

    def kind(self, name: str = ACTS) -> SiteKind:
        return SiteKind(name, ("batch", "pos", "d_sae"), "toy SAE latents of resid_post",
                        Derived("resid_post", read=self.encode, write=self.write), index_axis=2,
                        sizes={"d_sae": D_SAE})


@pytest.fixture
def toy(tiny_lm):
    lm = tiny_lm("llama")
    sae = ToySAE(lm.dims.d_model)
    with registered_site_kind(sae.kind()):
        yield lm, sae
    assert ACTS not in SITE_KINDS
    assert_no_hooks(lm.model)


def _resid_post(lm, ids, layer, edit=None):
    """Logits and layer ``layer``'s output from a raw forward hook (no lsi); ``edit`` may replace the output."""
    seen = {}

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        seen["resid_post"] = hidden
        if edit is None:
            return None
        new = edit(hidden)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = lm.model.get_submodule(lm.spec.layer_path(layer)).register_forward_hook(hook)
    try:
        logits = lm.model(input_ids=ids).logits
    finally:
        handle.remove()
    return logits, seen["resid_post"]


def _metric(logits, batch):
    return logits[0, -1].log_softmax(-1)[5] - logits[0, 3].log_softmax(-1)[9]


# --- grammar ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [f"blocks.1.{ACTS}", f"blocks.1.{ACTS}[3]", f"blocks.*.{ACTS}[1,2]",
                                  f"blocks.-1.{ACTS}", f"blocks.0:2.{ACTS}[0]"])
def test_parameterised_kind_round_trips(toy, text):
    site = Site.parse(text)
    assert site.kind == ACTS and str(site) == text and Site.parse(str(site)) == site


def test_parameterised_kind_fields(toy):
    assert Site.parse(f"blocks.1.{ACTS}[3]") == Site(ACTS, 1, unit=3) == Site(ACTS, 1, 3)
    assert Site.parse(f"blocks.1.{ACTS}[3]").indices() == (3,)
    with pytest.raises(SiteError, match="head= only on per-head sites"):
        Site(ACTS, 1, head=3)
    with pytest.raises(SiteError, match="a layer"):
        Site.parse(ACTS)
    with pytest.raises(SiteError, match="TransformerLens"):
        to_transformer_lens(f"blocks.1.{ACTS}")


def test_parameters_may_hold_paths():
    kind = ToySAE(32).kind("resid_post.sae[gemma-scope/layer_3/width_16k.v2].acts")
    with registered_site_kind(kind):
        text = "blocks.0.resid_post.sae[gemma-scope/layer_3/width_16k.v2].acts[7]"
        assert str(Site.parse(text)) == text and Site.parse(text).index == 7


def test_unknown_kind_is_suggested_from_the_registry(toy):
    with pytest.raises(SiteError) as info:
        Site.parse("blocks.0.resid_post.sae[tyo].acts[3]")
    assert f"did you mean {ACTS!r}" in info.value.fix
    with pytest.raises(SiteError) as info:
        Site.parse("blocks.0.resid_postt")
    assert "did you mean 'resid_post'" in info.value.fix


def test_unregistered_kind_no_longer_parses(toy):
    with registered_site_kind(ToySAE(32).kind("resid_post.sae[tmp].acts")):
        Site.parse("blocks.0.resid_post.sae[tmp].acts")
    with pytest.raises(SiteError, match="a site kind"):
        Site.parse("blocks.0.resid_post.sae[tmp].acts")


# --- registry errors --------------------------------------------------------------------------------------------

def test_registry_errors_are_typed_with_a_fix(toy):
    sae = ToySAE(32)
    cases = [
        (lambda: register_site_kind(sae.kind()), "unregister_site_kind"),  # duplicate
        (lambda: register_site_kind(SiteKind("resid_pre", ("batch", "pos", "d_model"), "again", sae.encode)),
         "unregister_site_kind"),
        (lambda: register_site_kind(SiteKind("resid_postt.sae[x].acts", ("batch", "pos", "d_sae"), "typo parent",
                                             Derived("resid_postt", read=sae.encode), sizes={"d_sae": D_SAE})),
         "did you mean 'resid_post'"),
        (lambda: register_site_kind(SiteKind("ln_final.sae[x].acts", ("batch", "pos", "d_sae"), "layer mismatch",
                                             Derived("ln_final", read=sae.encode), sizes={"d_sae": D_SAE})),
         "per_layer=False"),
        (lambda: register_site_kind(SiteKind("resid_post.sae[x]", ("batch", "pos"), "ends in [..]", sae.encode)),
         "rename"),
        (lambda: register_site_kind(SiteKind("blocks.x", ("batch", "pos"), "reserved", sae.encode)), "rename"),
        (lambda: register_site_kind(SiteKind("Resid", ("batch", "pos"), "upper case", sae.encode)), "rename"),
        (lambda: register_site_kind(SiteKind("resid_post.bad", ("batch", "pos"), "axis", sae.encode, index_axis=2)),
         "count axes"),
        (lambda: unregister_site_kind("resid_post.sae[nope].acts"), ACTS),
        (lambda: unregister_site_kind("resid_post"), "unregister those kinds first"),  # toy reads from it
    ]
    for action, fix in cases:
        with pytest.raises(SiteError) as info:
            action()
        err = info.value
        assert err.expected and err.found and fix in err.fix, (fix, str(err))
    assert SITE_KINDS["resid_pre"].definition == "input of decoder layer i"  # the built-in one is untouched


def test_builtin_kinds_register_like_any_other():
    """The built-ins are ordinary registry entries with the contract's TransformerLens names."""
    assert SITE_KINDS["attn.z"].transformer_lens == "attn.hook_z" and SITE_KINDS["attn.z"].parent is None
    assert list(SITE_KINDS)[:3] == ["embed", "resid_pre", "resid_mid"]


# --- the derived kind on a model ------------------------------------------------------------------------------

def test_shape_and_availability(toy):
    lm, _ = toy
    assert lm.site_shape(f"blocks.1.{ACTS}", batch=2, pos=5) == (2, 5, D_SAE)
    assert lm.site_shape(f"blocks.1.{ACTS}[3]") == (1, 1)
    assert lm.site_shape(f"blocks.1.{ACTS}[3,4]") == (1, 1, 2)
    assert Site(ACTS, 0) in lm.available_sites() and Site(ACTS, 1) in lm.available_sites()
    with pytest.raises(IndexOutOfRangeError, match=f"d_sae={D_SAE}"):
        lm.site_shape(f"blocks.1.{ACTS}[{D_SAE}]")


def test_cache_equals_the_encoder_by_hand(toy):
    lm, sae = toy
    cache = lm.run_with_cache(IDS, [f"blocks.*.{ACTS}", "blocks.*.resid_post"])
    for layer in range(lm.dims.n_layers):
        with torch.no_grad():
            _, resid = _resid_post(lm, IDS, layer)
            expected = torch.relu(resid @ sae.W_enc + sae.b_enc)
        assert expected.shape == (1, IDS.shape[1], D_SAE) and (expected > 0).any() and (expected == 0).any()
        torch.testing.assert_close(cache[f"blocks.{layer}.{ACTS}"], expected, atol=0, rtol=0)
        torch.testing.assert_close(cache[f"blocks.{layer}.{ACTS}[3]"], expected[..., 3], atol=0, rtol=0)
    last = lm.run_with_cache(IDS, f"blocks.1.{ACTS}", positions="last")
    torch.testing.assert_close(last[f"blocks.1.{ACTS}"], cache[f"blocks.1.{ACTS}"][:, -1:], atol=0, rtol=0)


def test_patch_from_another_run_equals_a_raw_hook(toy):
    lm, sae = toy
    with torch.no_grad():
        _, source_resid = _resid_post(lm, OTHER_IDS, 0)
        source_acts = sae.encode(source_resid)
        expected, _ = _resid_post(lm, IDS, 0, lambda h: h + (source_acts - sae.encode(h)) @ sae.W_dec)
        clean, _ = _resid_post(lm, IDS, 0)
    source = lm.run_with_cache(OTHER_IDS, f"blocks.0.{ACTS}")
    with lm.intervene(lsi.Patch(f"blocks.0.{ACTS}", source)):
        got = lm.forward(IDS)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got, clean, atol=1e-3)


def test_zero_one_feature_equals_a_raw_hook_and_later_hooks_see_it(toy):
    lm, sae = toy
    site = f"blocks.0.{ACTS}[3]"
    with torch.no_grad():
        _, resid = _resid_post(lm, IDS, 0)
        assert (sae.encode(resid)[..., 3] > 0).any()  # the feature is active, so zeroing it changes something
        expected, _ = _resid_post(lm, IDS, 0, lambda h: h - sae.encode(h)[..., 3:4] * sae.W_dec[3])
    with lm.intervene(lsi.Zero(site)):
        got = lm.forward(IDS)
        # a cache taken under the intervention (another session's hook) records the value the model used
        inner = lm.run_with_cache(IDS, [f"blocks.0.{ACTS}", "blocks.0.resid_post"])
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert inner[site].abs().max() == 0
    acts = sae.encode(resid)
    torch.testing.assert_close(inner[f"blocks.0.{ACTS}"][..., 4:], acts[..., 4:], atol=0, rtol=0)
    torch.testing.assert_close(inner["blocks.0.resid_post"], resid - acts[..., 3:4] * sae.W_dec[3])
    assert (sae.encode(inner["blocks.0.resid_post"])[..., 3] != 0).any()  # re-encoding would not give zero


def test_grads_equal_autograd_of_the_reference(toy):
    lm, sae = toy
    site = f"blocks.1.{ACTS}"
    res = lm.run_with_grads(IDS, _metric, [site, "blocks.1.resid_post"])
    with torch.no_grad():
        _, resid = _resid_post(lm, IDS, 1)
    acts = sae.encode(resid).requires_grad_(True)
    with torch.enable_grad():
        logits, _ = _resid_post(lm, IDS, 1, lambda h: h + (acts - sae.encode(h).detach()) @ sae.W_dec)
        (expected,) = torch.autograd.grad(_metric(logits, None), acts)
    torch.testing.assert_close(res.grads[site], expected, atol=1e-6, rtol=1e-5)
    assert expected.abs().max() > 0
    torch.testing.assert_close(res.activations[site], acts.detach(), atol=0, rtol=0)
    # chain rule: d m / d acts = d m / d resid_post @ W_dec^T (the write adds (new - old) @ W_dec)
    torch.testing.assert_close(res.grads[site], res.grads["blocks.1.resid_post"] @ sae.W_dec.T,
                               atol=1e-6, rtol=1e-5)


def test_a_rule_can_bind_a_derived_kind_on_some_layers_only(tiny_lm):
    """An SAE trained for one layer: the rule refuses other layers and binds the one it has via bind_derived."""
    lm = tiny_lm("llama")
    sae = ToySAE(lm.dims.d_model)
    derived = Derived("resid_post", read=sae.encode, write=sae.write)

    def layer_one_only(site, model, spec, dims):
        if site.layer != 1:
            raise SiteUnavailableError("the layer the SAE was trained on (1)", str(site), "use blocks.1")
        return bind_derived(site, derived, model, spec, dims)

    name = "resid_post.sae[one].acts"
    with registered_site_kind(sae.kind(name)):  # first under the same name on every layer
        assert lm.site_shape(f"blocks.0.{name}") == (1, 1, D_SAE)
    kind = SiteKind(name, ("batch", "pos", "d_sae"), "toy SAE at layer 1", layer_one_only, index_axis=2,
                    sizes={"d_sae": D_SAE})
    with registered_site_kind(kind):
        assert [s for s in lm.available_sites() if s.kind == name] == [Site(name, 1)]
        with pytest.raises(SiteUnavailableError, match="trained on"):
            lm.site_shape(f"blocks.0.{name}")  # what the model knew of the earlier kind does not carry over
        with pytest.raises(SiteUnavailableError, match="trained on"):
            lm.run_with_cache(IDS, f"blocks.*.{name}")
        cache = lm.run_with_cache(IDS, f"blocks.1.{name}")
        with torch.no_grad():
            expected = sae.encode(_resid_post(lm, IDS, 1)[1])
        torch.testing.assert_close(cache[f"blocks.1.{name}"], expected, atol=0, rtol=0)
    assert_no_hooks(lm.model)


def test_kinds_need_not_be_hashable(tiny_lm):
    """Rules and read / write functions may be unhashable callables (e.g. a dataclass with ``__call__``)."""

    class Halve:
        __hash__ = None  # type: ignore[assignment]

        def __call__(self, x):
            return x / 2

    lm = tiny_lm("llama")
    kind = SiteKind("resid_post.half", ("batch", "pos", "d_model"), "resid_post / 2", Derived("resid_post", Halve()))
    with registered_site_kind(kind):
        assert lm.site_shape("blocks.0.resid_post.half") == (1, 1, lm.dims.d_model)
        cache = lm.run_with_cache(IDS, ["blocks.0.resid_post.half", "blocks.0.resid_post"])
        torch.testing.assert_close(cache["blocks.0.resid_post.half"], cache["blocks.0.resid_post"] / 2, atol=0,
                                   rtol=0)
