"""Steering objects: directional ablation (hooks ≡ weight orthogonalization in every family where it applies),
vector addition, composition, save / load with model checks, shape and non-finite checks, and the refusal_gate
organism (ablation removes refusal, addition induces it, orthogonalization gives the same generations)."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

import lsi
from lsi.core.interventions import Add
from lsi.core.steering import Composed, Steering
from lsi.errors import InputError, ModelMismatchError, NonFiniteSteeringError, NotFoldableError, ShapeMismatchError
from lsi.organisms import refusal_gate as rg
from lsi.organisms.registry import ground_truth, load_organism
from lsi.steer.directional import DirectionalAblation, orthogonalize
from lsi.steer.directions import diff_in_means, diff_in_means_by_site

FOLDABLE = ("gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "phi3")
IDS = torch.randint(3, 97, (3, 12), generator=torch.Generator().manual_seed(0))


def _direction(seed: int = 1, d: int = 32) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.unit
def test_ablation_removes_the_direction_from_every_site(tiny_lm):
    lm = tiny_lm("llama")
    r = _direction()
    sites = ["blocks.*.resid_pre", "blocks.*.attn.out", "blocks.*.mlp.out"]
    with DirectionalAblation(r).apply(lm):
        cache = lm.run_with_cache(IDS, sites=sites)  # records the values the model used
    plain = lm.run_with_cache(IDS, sites=sites)
    unit = r / r.norm()
    for site in cache:
        assert float((plain[site] @ unit).abs().max()) > 1e-3
        assert float((cache[site] @ unit).abs().max()) < 1e-6, site
    torch.testing.assert_close(lm.forward(IDS), plain.logits)  # hooks removed after the block


@pytest.mark.arch
@pytest.mark.parametrize("family", FOLDABLE)
def test_orthogonalized_weights_equal_hook_ablation(fresh_lm, family):
    lm = fresh_lm(family)
    with torch.no_grad():  # HF initializes biases to zero: make them matter
        for name, p in lm.model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(3))
    r = _direction()
    base = lm.forward(IDS)
    with DirectionalAblation(r).apply(lm):
        hooked = lm.forward(IDS)
    edited = orthogonalize(lm, r)
    assert float((hooked - base).abs().max()) > 1e-2  # the ablation matters ...
    assert float((edited.forward(IDS) - hooked).abs().max()) < 1e-5  # ... and the weights reproduce it (float32)
    torch.testing.assert_close(lm.forward(IDS), base, atol=0, rtol=0)  # the original is untouched
    unit = (r / r.norm()).to(edited.weights.W_E)
    assert float((edited.weights.W_E @ unit).abs().max()) < 1e-6
    assert float((edited.weights.W_O(0).sum(0) @ unit).abs().max()) < 1e-6
    torch.testing.assert_close(edited.weights.W_U, lm.weights.W_U, atol=0, rtol=0)  # gpt2: untied, not edited


@pytest.mark.arch
@pytest.mark.parametrize("family", ["gemma2", "olmo2"])
def test_orthogonalization_refuses_post_norm_families(tiny_lm, family):
    lm = tiny_lm(family)
    with pytest.raises(NotFoldableError, match="norm after the projection") as err:
        orthogonalize(lm, _direction())
    assert "RMSNorm" in err.value.found


@pytest.mark.unit
def test_orthogonalize_in_place(fresh_lm):
    lm = fresh_lm("gpt2")
    r = _direction()
    with DirectionalAblation(r).apply(lm):
        hooked = lm.forward(IDS)
    assert orthogonalize(lm, r, copy=False) is lm
    assert float((lm.forward(IDS) - hooked).abs().max()) < 1e-5
    with pytest.raises(ShapeMismatchError, match="d_model=32"):
        orthogonalize(lm, torch.ones(31))


@pytest.mark.unit
def test_steering_applies_during_generate(tiny_lm):
    lm = tiny_lm("llama")
    r = _direction()
    with DirectionalAblation(r).apply(lm) as session:
        hooked = lm.generate([[5, 6, 7], [8, 9]], max_new_tokens=6)
    assert session.fire_counts["blocks.1.resid_pre"] == 6  # the prompt pass and every decoding step
    assert torch.equal(hooked, orthogonalize(lm, r).generate([[5, 6, 7], [8, 9]], max_new_tokens=6))
    # a strong addition at the last layer's output takes over greedy decoding, also on cached decoding steps
    push = Add("blocks.1.resid_post", lm.weights.W_U[:, 60], alpha=1e3)
    with push.apply(lm):
        steered = lm.generate([[5, 6, 7]], max_new_tokens=4)
    assert steered[0, 3:].tolist() == [60] * 4 != lm.generate([[5, 6, 7]], max_new_tokens=4)[0, 3:].tolist()


@pytest.mark.unit
def test_add_vector_touches_only_its_positions(tiny_lm):
    lm = tiny_lm("llama")
    v = _direction(2)
    site = "blocks.1.resid_pre"
    with Add(site, v, 0.5, positions="last").apply(lm):
        steered = lm.run_with_cache(IDS, sites=[site])[site]
    delta = steered - lm.run_with_cache(IDS, sites=[site])[site]
    torch.testing.assert_close(delta[:, -1], (0.5 * v).expand(3, -1), atol=1e-6, rtol=0)
    assert float(delta[:, :-1].abs().max()) == 0.0


@pytest.mark.unit
def test_composition_applies_parts_in_order(tiny_lm):
    lm = tiny_lm("llama")
    r = _direction()
    ablate = DirectionalAblation(r)
    add = Add("blocks.1.resid_pre", r + _direction(2), 2.0)
    both = ablate + add
    assert isinstance(both, Composed) and both.leaves() == (ablate, add)
    assert len((both + ablate).leaves()) == 3
    assert str(both.interventions(lm)[-1].site) == "blocks.1.resid_pre"
    with ablate.apply(lm), add.apply(lm):
        nested = lm.forward(IDS)
    with lm.intervene(ablate, add):
        together = lm.forward(IDS)
    torch.testing.assert_close(together, nested, atol=0, rtol=0)
    with lm.intervene([add, ablate]):
        swapped = lm.forward(IDS)  # at blocks.1.resid_pre the ablation now also removes the vector's component
    assert float((swapped - together).abs().max()) > 1e-2
    with pytest.raises(InputError, match="interventions or steerings"):
        lm.intervene(["blocks.0.mlp.out"])


@pytest.mark.unit
def test_save_and_load_round_trip_without_pickle(tiny_lm, tmp_path):
    lm = tiny_lm("llama")
    steer = (DirectionalAblation(_direction(), model=lm)
             + Add("blocks.1.resid_pre", _direction(2), 1.5, positions=[0, -1], scope="prompt", model=lm))
    path = steer.save(tmp_path / "steer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["steer.json", "steer.safetensors"]
    meta = json.loads(path.read_text())
    assert meta["format"] == 2 and meta["model"] == {"family": "llama", "dims": dataclasses.asdict(lm.dims)}
    assert [(p["type"], p["module"]) for p in meta["parts"]] == [
        ("DirectionalAblation", "lsi.steer.directional"), ("Add", "lsi.core.interventions")]
    assert sorted(load_file(str(tmp_path / "steer.safetensors"))) == ["0.direction", "1.vector"]
    loaded = Steering.load(path, lm)
    assert isinstance(loaded, Composed) and repr(loaded.leaves()[1]) == repr(steer.leaves()[1])
    with steer.apply(lm):
        want = lm.forward(IDS)
    with loaded.apply(lm):
        torch.testing.assert_close(lm.forward(IDS), want, atol=0, rtol=0)
    single = DirectionalAblation(_direction(), model=lm)
    single.save(tmp_path / "single")
    assert torch.equal(DirectionalAblation.load(tmp_path / "single.json", lm).direction, single.direction)
    with pytest.raises(InputError, match="a saved Add"):
        Add.load(tmp_path / "single", lm)
    with pytest.raises(InputError, match="model=lm"):
        DirectionalAblation(_direction()).save(tmp_path / "anonymous")


@pytest.mark.unit
@pytest.mark.parametrize(("family", "overrides", "reason"), [
    ("llama", {"hidden_size": 48}, "d_model=48"),
    ("llama", {"num_hidden_layers": 3}, "n_layers=3"),
    ("mistral", {}, "mistral model"),
])
def test_load_refuses_a_model_of_other_dimensions(tiny_lm, tmp_path, family, overrides, reason):
    DirectionalAblation(_direction(), model=tiny_lm("llama")).save(tmp_path / "steer")
    other = tiny_lm(family, **overrides)
    with pytest.raises(ModelMismatchError) as err:
        Steering.load(tmp_path / "steer", other)
    assert "llama model with n_layers=2, d_model=32" in err.value.expected and reason in err.value.found
    with pytest.raises(ModelMismatchError):
        Add("blocks.0.resid_pre", _direction(), model=tiny_lm("llama")).interventions(other)


@pytest.mark.unit
def test_vectors_must_fit_their_sites(tiny_lm):
    lm = tiny_lm("llama")
    with pytest.raises(ShapeMismatchError) as err:
        Add("blocks.0.resid_pre", torch.ones(31)).apply(lm)
    assert err.value.expected.startswith("a vector of shape (32,)") and err.value.found == "shape (31,)"
    with pytest.raises(ShapeMismatchError, match=r"size 8 for blocks\.0\.attn\.z"):
        DirectionalAblation(_direction(), sites="blocks.*.attn.z").interventions(lm)
    with pytest.raises(ShapeMismatchError, match="one vector"):
        DirectionalAblation(torch.ones(2, 32))
    with pytest.raises(InputError, match="non-zero"):
        DirectionalAblation(torch.zeros(32))


@pytest.mark.unit
def test_non_finite_strengths_are_refused(tiny_lm):
    lm = tiny_lm("llama")
    with pytest.raises(NonFiniteSteeringError, match="alpha=nan"):
        Add("blocks.0.resid_pre", torch.ones(32), float("nan"))
    with pytest.raises(NonFiniteSteeringError, match="NaN/inf entries"):
        DirectionalAblation(torch.tensor([1.0, float("inf")]))
    with pytest.raises(NonFiniteSteeringError, match=r"alpha=1e\+37"):
        Add("blocks.0.resid_pre", torch.full((32,), 100.0), 1e37)  # 1e39 overflows float32
    half = Add("blocks.0.resid_pre", torch.ones(32), 1e5)  # fine in float32, not in float16
    with pytest.raises(NonFiniteSteeringError, match=r"torch\.float16"):
        half.interventions(tiny_lm("llama", dtype=torch.float16))
    # each addition is finite, but adding it at both layers overflows the stream: the logits check names it
    flood = Add("blocks.*.resid_pre", torch.ones(32), 3e38)
    with pytest.raises(NonFiniteSteeringError, match=r"blocks\.\*\.resid_pre, alpha=3e\+38") as err, flood.apply(lm):
        lm.forward(IDS)
    assert "NaN/inf" in err.value.found
    assert bool(torch.isfinite(lm.forward(IDS)).all())  # hooks removed after the error


# -- the refusal_gate organism --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gate():
    """The organism, its splits, and the refusal direction selected on dev like its verification does: the
    diff-in-means candidate (layer input × post-instruction position) whose ablation leaves the fewest dev
    refusals (ties: higher dev task accuracy)."""
    lm = load_organism("refusal_gate")
    splits = ground_truth("refusal_gate")["splits"]
    dev = splits["dev"]
    # layer 0's input is the embedding: identical templates, no signal
    sites = [f"blocks.{layer}.resid_pre" for layer in range(1, lm.dims.n_layers)]
    positions = range(-len(rg.POST_INSTRUCTION), 0)
    candidates = {p: diff_in_means_by_site(lm, dev["harmful"], dev["harmless"], sites, positions=p) for p in positions}
    best = None
    for site in sites:
        for position in positions:
            v = candidates[position][site]
            with DirectionalAblation(v).apply(lm):
                rates = rg._rates(lm, dev, [])
            key = (rates["harmful_refusal"], -rates["harmless_accuracy"])
            if best is None or key < best[0]:
                best = (key, site, position, v)
    assert best is not None
    return lm, splits, best[1], best[2], best[3]


@pytest.mark.slow
@pytest.mark.integration
def test_diff_in_means_equals_the_organisms_own_means(gate):
    lm, splits, _, _, _ = gate
    dev = splits["dev"]
    own = rg._post_instruction_means(lm, dev["harmful"]) - rg._post_instruction_means(lm, dev["harmless"])
    for layer in range(lm.dims.n_layers):
        for p in range(-3, 0):  # ours runs padded batches; the organism's groups prompts by length
            ours = diff_in_means(lm, dev["harmful"], dev["harmless"], f"blocks.{layer}.resid_pre", positions=p)
            torch.testing.assert_close(ours, own[layer, p + 3], atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.integration
def test_refusal_direction_ablates_and_induces_refusal(gate):
    lm, splits, site, _, v = gate
    dev, test = splits["dev"], splits["test"]
    base = rg._rates(lm, test, [])
    ablate = DirectionalAblation(v, model=lm)
    with ablate.apply(lm):
        ablated = rg._rates(lm, test, [])
    assert base["harmful_refusal"] >= 0.95
    assert ablated["harmful_refusal"] <= 0.05
    assert ablated["harmless_accuracy"] >= 0.98 * base["harmless_accuracy"]
    induced = {}
    for alpha in rg.ADD_SCALES:  # the smallest strength that induces refusal on dev
        with Add(site, v, alpha).apply(lm):
            induced[alpha] = rg._rates(lm, dev, [])["harmless_refusal"]
        if induced[alpha] >= 0.95:
            break
    with Add(site, v, alpha).apply(lm):
        added = rg._rates(lm, test, [])
    assert base["harmless_refusal"] <= 0.05 and added["harmless_refusal"] >= 0.9, (induced, added)


@pytest.mark.slow
@pytest.mark.integration
def test_orthogonalized_organism_matches_the_hooks(gate):
    # float64 for the 1e-5 check: this trained model has logits up to ~20 and amplifies last-bit differences, so in
    # float32 the two routes differ by float rounding (~2e-5, 1e-6 of the logit scale); in float64 they agree.
    lm, splits, _, _, v = gate
    texts = splits["test"]["harmful"][:100] + splits["test"]["harmless"][:100]
    ablate = DirectionalAblation(v)
    edited = orthogonalize(lm, v)
    with ablate.apply(lm):
        hooked_replies = rg._replies(lm, texts, [])
    assert rg._replies(edited, texts, []) == hooked_replies
    wide = lsi.LanguageModel(copy.deepcopy(lm.model).double(), lm.tokenizer, spec=lm.spec)
    batch = wide.to_batch(texts)
    real = batch.attention_mask.bool()
    with ablate.apply(wide):
        hooked = wide.forward(batch)
    assert float((hooked - wide.forward(batch))[real].abs().max()) > 1.0
    assert float((orthogonalize(wide, v).forward(batch) - hooked)[real].abs().max()) < 1e-5
    with ablate.apply(lm):
        hooked32 = lm.forward(batch)
    assert float((edited.forward(batch) - hooked32)[real].abs().max()) < 1e-4
