"""Acceptance on the real checkpoint ../shared/models/stories260k (Llama, GQA 8 heads / 4 kv heads, 5 layers)."""

from __future__ import annotations

import pytest
import torch
from core_helpers import assert_no_hooks

import lsi
from lsi.core.hooks import HookSession

pytestmark = pytest.mark.acceptance

PROMPT = "Once upon a time"
PROMPT_IDS = [1, 403, 407, 261, 378]
EXPECTED = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day,"
ATOL = 1e-5


@pytest.fixture(scope="module")
def eager_lm(stories_dir):
    return lsi.load(stories_dir, attn_implementation="eager")


def test_readme_matches_expected_text(stories_dir):
    assert EXPECTED in (stories_dir / "README.md").read_text()


def test_load_and_dims(stories_lm):
    lm = stories_lm
    assert lm.family == "llama" and not lm.probed
    d = lm.dims
    assert (d.n_layers, d.d_model, d.n_heads, d.n_kv_heads, d.d_head, d.d_mlp, d.vocab) == (5, 64, 8, 4, 8, 172, 512)
    assert lm.tokenizer is not None and lm.tokenizer.padding_side == "left" and lm.pad_id == 0
    assert lm.to_batch(PROMPT).input_ids.tolist() == [PROMPT_IDS]


def test_greedy_generation_matches_readme(stories_lm):
    lm = stories_lm
    assert lm.generate_text(PROMPT, max_new_tokens=30) == [EXPECTED]
    ids = lm.generate(PROMPT, max_new_tokens=30)
    assert ids[0, :5].tolist() == PROMPT_IDS and ids.shape[1] == 5 + 30
    # the same through an empty intervene block and through identity interventions on every writable site
    with lm.intervene():
        assert lm.generate_text(PROMPT, max_new_tokens=30) == [EXPECTED]
    noop = [lsi.Apply(s, lambda x: x) for s in lm.available_sites() if s.kind != "attn.pattern"]
    with lm.intervene(*noop):
        assert lm.generate_text(PROMPT, max_new_tokens=30) == [EXPECTED]
    assert_no_hooks(lm.model)


def test_batched_generation_with_left_padding(stories_lm):
    lm = stories_lm
    texts = lm.generate_text([PROMPT, "The cat"], max_new_tokens=30)
    assert texts[0] == EXPECTED
    assert texts[1] == lm.generate_text("The cat", max_new_tokens=30)[0]


def test_interventions_change_the_story(stories_lm):
    lm = stories_lm
    with lm.intervene(lsi.Zero("blocks.2.mlp.out")):
        ablated = lm.generate_text(PROMPT, max_new_tokens=30)[0]
    assert ablated.startswith(PROMPT) and ablated != EXPECTED
    w_u = lm.model.get_submodule(lm.spec.unembed).weight.detach()
    target = lm.encode(" dog")[-1]
    with lm.intervene(lsi.Add("blocks.4.resid_post", 50 * w_u[target], scope="generated")):
        steered_ids = lm.generate(PROMPT, max_new_tokens=10)[0, 5:].tolist()
    assert steered_ids.count(target) >= 5, lm.tokenizer.decode(steered_ids)
    assert lm.generate_text(PROMPT, max_new_tokens=30) == [EXPECTED]  # all gone afterwards
    assert_no_hooks(lm.model)


def test_site_contract_on_the_real_model(eager_lm):
    lm = eager_lm
    batch = lm.to_batch(PROMPT)
    sites = lm.available_sites()
    raw: dict[int, torch.Tensor] = {}
    handles = [lm.model.get_submodule(lm.spec.layer_path(i, lm.spec.o_proj)).register_forward_hook(
        lambda m, a, o, i=i: raw.__setitem__(i, o)) for i in range(lm.dims.n_layers)]
    try:
        with torch.no_grad(), HookSession(lm.model, lm.spec, lm.dims, cache=sites) as session:
            out = lm.model(input_ids=batch.input_ids, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    v, hs, n, p = session.values, out.hidden_states, lm.dims.n_layers, len(PROMPT_IDS)
    assert all(c == 1 for c in session.fire_counts.values()) and len(session.fire_counts) == len(sites)
    for s in sites:
        assert tuple(v[str(s)].shape) == lm.site_shape(s, pos=p), str(s)
    assert torch.equal(v["embed"], hs[0]) and torch.equal(v["ln_final"], hs[-1])
    assert torch.equal(v["logits"], out.logits)
    group = lm.dims.n_heads // lm.dims.n_kv_heads
    assert group == 2
    for i in range(n):
        b = f"blocks.{i}."
        assert torch.equal(v[b + "resid_pre"], hs[i])
        if i < n - 1:
            assert torch.equal(v[b + "resid_post"], hs[i + 1])
        torch.testing.assert_close(v[b + "resid_mid"], v[b + "resid_pre"] + v[b + "attn.out"], atol=ATOL, rtol=0)
        torch.testing.assert_close(v[b + "resid_post"], v[b + "resid_mid"] + v[b + "mlp.out"], atol=ATOL, rtol=0)
        torch.testing.assert_close(v[b + "attn.head_out"].sum(-2), raw[i], atol=ATOL, rtol=1e-5)
        pattern = v[b + "attn.pattern"]
        torch.testing.assert_close(pattern.sum(-1), torch.ones(1, lm.dims.n_heads, p), atol=ATOL, rtol=0)
        assert v[b + "attn.k"].shape[2] == 4 and v[b + "attn.q"].shape[2] == 8
        expected_z = torch.einsum("bhqk,bkhd->bqhd", pattern, v[b + "attn.v"].repeat_interleave(group, dim=2))
        torch.testing.assert_close(v[b + "attn.z"], expected_z, atol=ATOL, rtol=1e-4)
        act = lm.model.get_submodule(lm.spec.layer_path(i, lm.spec.mlp_act))
        up = lm.model.get_submodule(lm.spec.layer_path(i, lm.spec.mlp_in))
        norm_out = lm.model.get_submodule(lm.spec.layer_path(i, "post_attention_layernorm"))
        with torch.no_grad():
            torch.testing.assert_close(v[b + "mlp.post"], act(v[b + "mlp.pre"]) * up(norm_out(v[b + "resid_mid"])),
                                       atol=ATOL, rtol=1e-4)
    with torch.no_grad():
        torch.testing.assert_close(lm.unembed(v[f"blocks.{n - 1}.resid_post"]), out.logits, atol=ATOL, rtol=1e-5)
    assert_no_hooks(lm.model)


def test_noop_bit_identical_and_batched_equals_unbatched(stories_lm):
    lm = stories_lm
    ids = torch.tensor([PROMPT_IDS])
    with torch.no_grad():
        plain = lm.model(ids).logits
    assert torch.equal(lm.forward(PROMPT), plain)
    with lm.intervene(*[lsi.Apply(s, lambda x: x) for s in lm.available_sites() if s.kind != "attn.pattern"]):
        assert torch.equal(lm.forward(PROMPT), plain)
    texts = [PROMPT, "The cat sat", "Lily and Ben went to the park to play"]
    for side in ("left", "right"):
        batch = lm.to_batch(texts, padding_side=side)
        cache = lm.run_with_cache(batch, ["blocks.*.resid_post", "blocks.3.attn.z", "logits"])
        width = batch.input_ids.shape[1]
        for r, text in enumerate(texts):
            single = lm.run_with_cache(text, ["blocks.*.resid_post", "blocks.3.attn.z", "logits"])
            n = single["logits"].shape[1]
            real = slice(width - n, width) if side == "left" else slice(0, n)
            for key in single:
                torch.testing.assert_close(cache[key][r, real], single[key][0], atol=1e-5, rtol=1e-5)
    assert_no_hooks(lm.model)


def test_patching_a_name_between_prompts(stories_lm):
    """Activation patching on real text: patching every resid_pre position from a source run reproduces it."""
    lm = stories_lm
    a, b = "Tom went to the park", "Sam went to the park"
    assert len(lm.encode(a)) == len(lm.encode(b))
    src = lm.run_with_cache(a, "blocks.2.resid_pre")
    with lm.intervene(lsi.Patch("blocks.2.resid_pre", src)):
        patched = lm.forward(b)
    torch.testing.assert_close(patched, lm.forward(a), atol=ATOL, rtol=0)
    assert not torch.allclose(lm.forward(b), lm.forward(a), atol=1e-2)
