"""Interventions, positions, composition, generation scopes and gradients, each against a hand computation."""

from __future__ import annotations

import pytest
import torch
from core_helpers import FAMILIES, IDS, PARALLEL, assert_no_hooks, hf_logits

import lsi
from lsi.arch.dims import linear_weight
from lsi.core.bindings import head_out_weight
from lsi.errors import LsiError

pytestmark = pytest.mark.integration

ATOL = 1e-5
# families whose attn.out / mlp.out are the raw output projections (no post-norm), so head/neuron edits are linear
LINEAR_OUT = ["gpt2", "llama", "phi3", "qwen2"]
IDS_B = torch.tensor([[9, 33, 12, 70, 42, 55, 19]])  # same length as IDS, different tokens


def cache_under(lm, ops, sites, inputs=IDS, **kwargs):
    with lm.intervene(*ops):
        return lm.run_with_cache(inputs, sites, **kwargs)


# --- each op against a hand computation ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", LINEAR_OUT)
@pytest.mark.parametrize("head", [0, 3])
def test_zero_head_out_subtracts_that_head(tiny_lm, family, head):
    lm = tiny_lm(family)
    sites = ["blocks.1.attn.head_out", "blocks.1.attn.out", "blocks.1.resid_pre"]
    clean = lm.run_with_cache(IDS, sites)
    hit = cache_under(lm, [lsi.Zero(f"blocks.1.attn.head_out[{head}]")], sites)
    torch.testing.assert_close(hit["blocks.1.resid_pre"], clean["blocks.1.resid_pre"], atol=0, rtol=0)
    expected = clean["blocks.1.attn.out"] - clean[f"blocks.1.attn.head_out[{head}]"]
    torch.testing.assert_close(hit["blocks.1.attn.out"], expected, atol=ATOL, rtol=0)
    # the cache records the value the model used: that head is zero, the others untouched
    assert hit[f"blocks.1.attn.head_out[{head}]"].abs().max() == 0
    others = [h for h in range(lm.dims.n_heads) if h != head]
    torch.testing.assert_close(hit["blocks.1.attn.head_out"][..., others, :],
                               clean["blocks.1.attn.head_out"][..., others, :], atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_kv_head_under_gqa_zeroes_its_query_group(tiny_lm, family):
    """Zeroing v of kv head g zeroes z of exactly the query heads that read it."""
    lm = tiny_lm(family)
    group = lm.dims.n_heads // lm.dims.n_kv_heads
    hit = cache_under(lm, [lsi.Zero("blocks.0.attn.v[1]")], ["blocks.0.attn.z", "blocks.0.attn.v"])
    z = hit["blocks.0.attn.z"]
    readers = list(range(group, 2 * group))
    assert z[..., readers, :].abs().max() == 0
    assert all(z[..., h, :].abs().max() > 0 for h in range(lm.dims.n_heads) if h not in readers)
    assert hit["blocks.0.attn.v[1]"].abs().max() == 0


@pytest.mark.parametrize("family", LINEAR_OUT)
def test_scale_one_neuron(tiny_lm, family):
    lm = tiny_lm(family)
    unit, factor = 7, 3.0
    sites = ["blocks.0.mlp.post", "blocks.0.mlp.out"]
    clean = lm.run_with_cache(IDS, sites)
    hit = cache_under(lm, [lsi.Scale(f"blocks.0.mlp.post[{unit}]", factor)], sites)
    torch.testing.assert_close(hit[f"blocks.0.mlp.post[{unit}]"], factor * clean[f"blocks.0.mlp.post[{unit}]"],
                               atol=0, rtol=0)
    others = [u for u in range(lm.dims.d_mlp) if u != unit]
    assert torch.equal(hit["blocks.0.mlp.post"][..., others], clean["blocks.0.mlp.post"][..., others])
    w_down = linear_weight(lm.model.get_submodule(lm.spec.layer_path(0, lm.spec.mlp_down)), lm.spec.conv1d)
    delta = (factor - 1) * clean[f"blocks.0.mlp.post[{unit}]"][..., None] * w_down[:, unit].detach()
    torch.testing.assert_close(hit["blocks.0.mlp.out"], clean["blocks.0.mlp.out"] + delta, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_add_at_resid_post_reaches_next_resid_pre_exactly(tiny_lm, family):
    lm = tiny_lm(family)
    vec = torch.linspace(-2, 2, lm.dims.d_model)
    sites = ["blocks.0.resid_post", "blocks.1.resid_pre", "blocks.1.resid_post"]
    clean = lm.run_with_cache(IDS, sites)
    hit = cache_under(lm, [lsi.Add("blocks.0.resid_post", vec, alpha=0.5)], sites)
    torch.testing.assert_close(hit["blocks.1.resid_pre"], clean["blocks.1.resid_pre"] + 0.5 * vec, atol=1e-6, rtol=0)
    torch.testing.assert_close(hit["blocks.0.resid_post"], hit["blocks.1.resid_pre"], atol=0, rtol=0)
    assert not torch.allclose(hit["blocks.1.resid_post"], clean["blocks.1.resid_post"] + 0.5 * vec, atol=1e-4)


@pytest.mark.parametrize("family", LINEAR_OUT)
def test_set_one_head_of_z(tiny_lm, family):
    lm = tiny_lm(family)
    value = torch.arange(lm.dims.d_head, dtype=torch.float32) / 10
    sites = ["blocks.1.attn.z", "blocks.1.attn.out"]
    clean = lm.run_with_cache(IDS, sites)
    hit = cache_under(lm, [lsi.Set("blocks.1.attn.z[2]", value)], sites)
    assert torch.equal(hit["blocks.1.attn.z[2]"], value.expand(1, IDS.shape[1], -1))
    z = clean["blocks.1.attn.z"].clone()
    z[..., 2, :] = value
    o_proj = lm.model.get_submodule(lm.spec.layer_path(1, lm.spec.o_proj))
    with torch.no_grad():
        torch.testing.assert_close(hit["blocks.1.attn.out"], o_proj(z.flatten(-2)), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_mean_ablation_from_cache_mean(tiny_lm, family):
    lm = tiny_lm(family)
    ref = lm.to_batch([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]], padding_side="left")
    ref_cache = lm.run_with_cache(ref, ["blocks.0.mlp.post", "blocks.0.attn.head_out"])
    mean = ref_cache.mean("blocks.0.mlp.post")
    real = ref.attention_mask.bool()
    torch.testing.assert_close(mean, ref_cache["blocks.0.mlp.post"][real].mean(0), atol=1e-6, rtol=0)
    assert mean.shape == (lm.dims.d_mlp,)
    # padding is excluded: the plain mean over all 15 slots differs
    assert not torch.allclose(mean, ref_cache["blocks.0.mlp.post"].mean((0, 1)), atol=1e-4)
    hit = cache_under(lm, [lsi.Mean("blocks.0.mlp.post", mean)], ["blocks.0.mlp.post"])
    torch.testing.assert_close(hit["blocks.0.mlp.post"], mean.expand(1, IDS.shape[1], -1), atol=0, rtol=0)
    head_mean = ref_cache.mean("blocks.0.attn.head_out[1]")
    assert head_mean.shape == (lm.dims.d_model,)
    hit = cache_under(lm, [lsi.Mean("blocks.0.attn.head_out[1]", head_mean)], ["blocks.0.attn.head_out"])
    torch.testing.assert_close(hit["blocks.0.attn.head_out[1]"], head_mean.expand(1, IDS.shape[1], -1),
                               atol=0, rtol=0)


PATCH_SITES = ["blocks.0.resid_post", "blocks.0.attn.z", "blocks.0.mlp.post", "blocks.0.attn.v",
               "blocks.1.attn.head_out", "blocks.0.resid_mid", "embed"]


@pytest.mark.parametrize(("family", "site"), [(f, s) for s in PATCH_SITES for f in FAMILIES
                                              if not (s.endswith("resid_mid") and f in PARALLEL)])
def test_patch_one_position_reproduces_source(tiny_lm, family, site):
    lm = tiny_lm(family)
    src = lm.run_with_cache(IDS, [site, "blocks.1.resid_post", "logits"])
    clean = lm.run_with_cache(IDS_B, [site, "blocks.1.resid_post"])
    pos = 3
    hit = cache_under(lm, [lsi.Patch(site, src, positions=[pos])], [site, "blocks.1.resid_post"], inputs=IDS_B)
    # exact for direct writes; resid_mid is written through attn.out, so one rounding may differ
    tol = 1e-6 if site.endswith("resid_mid") else 0
    torch.testing.assert_close(hit[site][:, pos], src[site][:, pos], atol=tol, rtol=0)
    others = [p for p in range(IDS.shape[1]) if p != pos]
    torch.testing.assert_close(hit[site][:, others], clean[site][:, others], atol=0, rtol=0)
    # causality: later positions downstream change, earlier ones do not
    after, before = hit["blocks.1.resid_post"], clean["blocks.1.resid_post"]
    torch.testing.assert_close(after[:, :pos], before[:, :pos], atol=0, rtol=0)
    assert not torch.allclose(after[:, pos:], before[:, pos:], atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_everywhere_reproduces_source_logits(tiny_lm, family):
    lm = tiny_lm(family)
    src = lm.run_with_cache(IDS, "blocks.0.resid_post")
    with lm.intervene(lsi.Patch("blocks.0.resid_post", src)):
        got = lm.forward(IDS_B)
    torch.testing.assert_close(got, hf_logits(lm, IDS), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_apply(tiny_lm, family):
    lm = tiny_lm(family)
    clean = lm.run_with_cache(IDS, ["blocks.0.mlp.pre", "blocks.0.mlp.post"])
    sites = ["blocks.0.mlp.pre", "blocks.0.mlp.post"]
    hit = cache_under(lm, [lsi.Apply("blocks.0.mlp.pre", lambda x: 2 * x + 1)], sites)
    torch.testing.assert_close(hit["blocks.0.mlp.pre"], 2 * clean["blocks.0.mlp.pre"] + 1, atol=1e-6, rtol=0)
    act = lm.model.get_submodule(lm.spec.layer_path(0, lm.spec.mlp_act))
    if not lm.spec.gated:
        with torch.no_grad():
            torch.testing.assert_close(hit["blocks.0.mlp.post"], act(hit["blocks.0.mlp.pre"]), atol=ATOL, rtol=0)
    # Apply on a selected neuron sees only that neuron's slice
    seen = []
    cache_under(lm, [lsi.Apply("blocks.0.mlp.post[4,9]", lambda x: seen.append(x.shape) or x)], ["logits"])
    assert seen == [torch.Size([1, IDS.shape[1], 2])]


# --- positions ----------------------------------------------------------------------------------------------------

ROWS = [[5, 17, 42, 8, 17], [9, 30, 17], [11, 4, 77, 50, 6, 13]]


def _selected(rows, side, which):
    """Hand-computed (row, absolute position) pairs for a selector on padded rows."""
    width = max(map(len, rows))
    out = set()
    for r, row in enumerate(rows):
        off = width - len(row) if side == "left" else 0
        n = len(row)
        if which == "last":
            idx = [n - 1]
        elif which == "index":
            idx = [0, n - 2]
        elif which == "span":
            idx = list(range(n))[1:3]
        elif which == "match":
            idx = [i for i, t in enumerate(row) if t == 17]
        elif which == "match2":
            idx = [i for i in range(n - 1) if row[i:i + 2] == [42, 8]] + [i + 1 for i in range(n - 1)
                                                                         if row[i:i + 2] == [42, 8]]
        else:  # all
            idx = list(range(n))
        out |= {(r, off + i) for i in idx}
    return out


SELECTORS = {"last": "last", "index": lsi.Index([0, -2]), "span": lsi.Span(1, 3), "match": lsi.Match(17),
             "match2": lsi.Match([42, 8]), "all": None}


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("which", list(SELECTORS))
def test_positions_restrict_the_change(tiny_lm, side, which):
    lm = tiny_lm("llama")
    batch = lm.to_batch(ROWS, padding_side=side)
    vec = torch.ones(lm.dims.d_model)
    clean = lm.run_with_cache(batch, "blocks.0.resid_post")
    hit = cache_under(lm, [lsi.Add("blocks.0.resid_post", vec, positions=SELECTORS[which])], "blocks.0.resid_post",
                      inputs=batch)
    diff = hit["blocks.0.resid_post"] - clean["blocks.0.resid_post"]
    changed = {(r, p) for r, p in zip(*torch.nonzero(diff.abs().amax(-1) > 0, as_tuple=True), strict=True)}
    changed = {(int(r), int(p)) for r, p in changed}
    expected = _selected(ROWS, side, which)
    assert expected, "the selector must hit something in this test"
    assert changed == expected
    for r, p in expected:
        torch.testing.assert_close(diff[r, p], vec, atol=1e-6, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_cache_positions_are_padding_aware(tiny_lm, side):
    lm = tiny_lm("qwen2")
    batch = lm.to_batch(ROWS, padding_side=side)
    full = lm.run_with_cache(batch, "blocks.1.resid_post")
    for spec, which in (("last", "last"), (lsi.Index([0, -2]), "index"), (lsi.Span(1, 3), "span")):
        picked = lm.run_with_cache(batch, "blocks.1.resid_post", positions=spec)
        expected = sorted(_selected(ROWS, side, which))
        assert sorted((r, int(p)) for r, row in enumerate(picked.positions.tolist()) for p in row) == expected
        for r, row in enumerate(picked.positions):
            torch.testing.assert_close(picked["blocks.1.resid_post"][r], full["blocks.1.resid_post"][r, row],
                                       atol=0, rtol=0)


# --- composition, non-mutation --------------------------------------------------------------------------------------

def test_composition_order_at_one_site(tiny_lm):
    lm = tiny_lm("llama")
    vec = torch.full((lm.dims.d_model,), 0.25)
    site = "blocks.0.resid_post"
    x = lm.run_with_cache(IDS, site)[site]
    scale_then_add = cache_under(lm, [lsi.Scale(site, 2.0), lsi.Add(site, vec)], site)[site]
    add_then_scale = cache_under(lm, [lsi.Add(site, vec), lsi.Scale(site, 2.0)], site)[site]
    torch.testing.assert_close(scale_then_add, 2 * x + vec, atol=1e-6, rtol=0)
    torch.testing.assert_close(add_then_scale, 2 * (x + vec), atol=1e-6, rtol=0)
    # two separate intervene blocks nest: the outer one is applied first
    with lm.intervene(lsi.Scale(site, 2.0)), lm.intervene(lsi.Add(site, vec)):
        nested = lm.run_with_cache(IDS, site)[site]
    torch.testing.assert_close(nested, 2 * x + vec, atol=1e-6, rtol=0)
    # a list of interventions is the same as passing them one by one
    as_list = cache_under(lm, [[lsi.Add(site, vec), lsi.Scale(site, 2.0)]], site)[site]
    assert torch.equal(as_list, add_then_scale)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_composition_order_on_head_out_reaches_the_model(tiny_lm, family):
    """Zero head 1, then scale every head by 2: attention writes 2 * (sum of the other heads) (+ bias)."""
    lm = tiny_lm(family)
    hs, out = "blocks.0.attn.head_out", "blocks.0.attn.out"
    clean = lm.run_with_cache(IDS, [hs, out])
    o_proj = lm.model.get_submodule(lm.spec.layer_path(0, lm.spec.o_proj))
    bias = o_proj.bias.detach() if getattr(o_proj, "bias", None) is not None else 0
    heads = clean[hs].clone()
    heads[..., 1, :] = 0
    hit = cache_under(lm, [lsi.Zero(f"{hs}[1]"), lsi.Scale(hs, 2.0)], [hs, out])
    torch.testing.assert_close(hit[out], (2 * heads).sum(-2) + bias, atol=ATOL, rtol=0)
    torch.testing.assert_close(hit[hs], 2 * heads, atol=1e-6, rtol=0)  # and the cache shows what was used


def test_composition_head_and_whole_site_in_cache(tiny_lm):
    lm = tiny_lm("llama")
    hs = "blocks.0.attn.head_out"
    h = lm.run_with_cache(IDS, hs)[hs]
    both = cache_under(lm, [lsi.Zero(f"{hs}[1]"), lsi.Add(hs, torch.ones(lm.dims.d_model))], hs)[hs]
    expected = h + 1
    expected[..., 1, :] = 1
    torch.testing.assert_close(both, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_interventions_never_mutate_sources(tiny_lm, family):
    lm = tiny_lm(family)
    writable = [str(s) for s in lm.available_sites() if s.kind != "attn.pattern"]
    src = lm.run_with_cache(IDS, writable)
    before = {k: v.clone() for k, v in src.items()}
    d = lm.dims
    add_vec, set_val = torch.randn(d.d_model), torch.randn(d.d_mlp)
    add_before, set_before = add_vec.clone(), set_val.clone()
    for ops in ([lsi.Patch(s, src) for s in writable],
                [lsi.Patch(s, src, positions="last") for s in writable],
                [lsi.Add("blocks.*.resid_post", add_vec), lsi.Set("blocks.*.mlp.post", set_val),
                 lsi.Add("embed", add_vec), lsi.Scale("blocks.*.attn.out", 0.5)]):
        with lm.intervene(*ops):
            out = lm.run_with_cache(IDS_B, writable)
            lm.forward(IDS_B)
        for k in src:
            assert torch.equal(src[k], before[k]), f"{k} of the source cache was modified in place"
        # and what was cached under the intervention is not affected by later runs either
        snapshot = {k: v.clone() for k, v in out.items()}
        lm.forward(IDS)
        for k in out:
            assert torch.equal(out[k], snapshot[k]), f"{k} changed after a later run"
    assert torch.equal(add_vec, add_before) and torch.equal(set_val, set_before)
    assert_no_hooks(lm.model)


def test_patch_from_tensor(tiny_lm):
    lm = tiny_lm("llama")
    site = "blocks.1.attn.z"
    src = lm.run_with_cache(IDS, site)
    tensor = src[site].clone()
    a = cache_under(lm, [lsi.Patch(site, tensor, positions=[2])], site, inputs=IDS_B)
    b = cache_under(lm, [lsi.Patch(site, src, positions=[2])], site, inputs=IDS_B)
    assert torch.equal(a[site], b[site])
    assert torch.equal(tensor, src[site])


# --- generation scopes ----------------------------------------------------------------------------------------------

N_NEW = 6


def _gen(lm, prompt, ops=(), n=N_NEW, **kwargs):
    with lm.intervene(*ops):
        return lm.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kwargs)


@pytest.fixture
def steer():
    """A huge Add at the last layer's resid_post: any touched position predicts one fixed token."""

    def make(lm, scope, positions=None):
        w_u = lm.model.get_submodule(lm.spec.unembed).weight.detach()
        vec = 1e4 * w_u[40]
        with torch.no_grad():
            forced = int(lm.unembed(vec).argmax())
        return lsi.Add(f"blocks.{lm.dims.n_layers - 1}.resid_post", vec, positions=positions, scope=scope), forced

    return make


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_scopes(tiny_lm, steer, family):
    lm = tiny_lm(family)
    prompt = [[5, 17, 42, 8]]
    p = len(prompt[0])
    plain = _gen(lm, prompt)[0, p:].tolist()
    op, forced = steer(lm, "generated")
    assert plain.count(forced) < N_NEW - 1, "pick another steering token: the plain text already repeats it"

    gen = _gen(lm, prompt, [op])[0, p:].tolist()
    assert gen[0] == plain[0]  # the prompt pass is untouched
    assert gen[1:] == [forced] * (N_NEW - 1)

    op_all, _ = steer(lm, "all")
    assert _gen(lm, prompt, [op_all])[0, p:].tolist() == [forced] * N_NEW

    op_prompt, _ = steer(lm, "prompt", positions="last")
    out = _gen(lm, prompt, [op_prompt])[0]
    assert out[p] == forced
    # only the first generated token's logits changed: the rest is the plain greedy continuation
    cont = _gen(lm, [prompt[0] + [forced]], n=N_NEW - 1)[0]
    assert out.tolist() == cont.tolist()
    assert_no_hooks(lm.model)


def test_generate_prompt_scope_logits(tiny_lm, steer):
    """Check through the step logits: prompt scope + last position changes step 0 only."""
    lm = tiny_lm("llama")
    prompt = [[5, 17, 42, 8]]
    op, forced = steer(lm, "prompt", positions="last")
    kw = dict(return_dict_in_generate=True, output_logits=True)
    out = _gen(lm, prompt, [op], **kw)
    assert int(out.sequences[0, 4]) == forced
    ref = _gen(lm, [prompt[0] + [forced]], n=N_NEW - 1, **kw)
    for step in range(1, N_NEW):
        torch.testing.assert_close(out.logits[step], ref.logits[step - 1], atol=1e-5, rtol=0)
    plain = _gen(lm, prompt, **kw)
    assert not torch.allclose(out.logits[0], plain.logits[0], atol=1e-2)


def test_generate_left_padded_batch_with_last_position(tiny_lm, steer):
    lm = tiny_lm("llama")
    prompts = [[5, 17, 42, 8], [9, 30]]
    op, forced = steer(lm, "prompt", positions="last")
    out = _gen(lm, prompts, [op])
    assert out[:, 4].tolist() == [forced, forced]
    op_gen, _ = steer(lm, "generated")
    out = _gen(lm, prompts, [op_gen])
    assert (out[:, 5:] == forced).all()
    # the unsteered first token of the short row equals its unbatched greedy token
    assert int(out[1, 4]) == int(_gen(lm, [prompts[1]], n=1)[0, -1])


# --- gradients --------------------------------------------------------------------------------------------------------

def _metric(t):
    return lambda logits, batch: logits[0, -1, t]


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen3"])
def test_grads_analytic_at_logits_and_ln_final(tiny_lm, family):
    lm = tiny_lm(family)
    t = 11
    res = lm.run_with_grads(IDS, _metric(t), ["logits", "ln_final"])
    onehot = torch.zeros_like(res.grads["logits"])
    onehot[0, -1, t] = 1
    assert torch.equal(res.grads["logits"], onehot)
    w_u = lm.model.get_submodule(lm.spec.unembed).weight.detach()
    expected = torch.zeros_like(res.grads["ln_final"])
    expected[0, -1] = w_u[t]
    torch.testing.assert_close(res.grads["ln_final"], expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(res.value, hf_logits(lm, IDS)[0, -1, t], atol=0, rtol=0)
    assert torch.equal(res.activations["logits"], hf_logits(lm, IDS))
    assert all(p.grad is None for p in lm.model.parameters())
    assert_no_hooks(lm.model)


@pytest.mark.parametrize("family", FAMILIES)
def test_grads_match_autograd_through_a_set_leaf(tiny_lm, family):
    lm = tiny_lm(family)
    site = "blocks.0.resid_post"
    metric = lambda logits, batch: logits[0, -1, 11] - logits[0, -2, 5]  # noqa: E731
    res = lm.run_with_grads(IDS, metric, [site, "blocks.1.mlp.post"])
    leaf = lm.run_with_cache(IDS, site)[site].clone().requires_grad_(True)
    with lm.intervene(lsi.Set(site, leaf)), torch.enable_grad():
        logits = lm.model(input_ids=IDS).logits
        (grad,) = torch.autograd.grad(metric(logits, None), [leaf])
    torch.testing.assert_close(res.grads[site], grad, atol=1e-6, rtol=1e-5)
    assert res.grads[site][0, -1].abs().max() > 0 and res.grads[site][0, 0].abs().max() > 0
    assert res.grads["blocks.1.mlp.post"].shape == (1, IDS.shape[1], lm.dims.d_mlp)
    # the zero-valued probe leaves the activations (and so the metric) bit-identical
    plain = lm.run_with_cache(IDS, [site, "blocks.1.mlp.post"])
    assert torch.equal(res.activations[site], plain[site])
    assert torch.equal(res.activations["blocks.1.mlp.post"], plain["blocks.1.mlp.post"])
    assert torch.equal(res.value, metric(hf_logits(lm, IDS), None))


def test_grads_match_finite_differences_in_float64():
    from lsi.testing import tiny_model

    lm = lsi.LanguageModel(tiny_model("gpt2").double())
    site = "blocks.0.resid_mid"
    metric = lambda logits, batch: logits[0, -1].log_softmax(-1)[11]  # noqa: E731
    res = lm.run_with_grads(IDS, metric, site)
    grad = res.grads[site]
    eps = 1e-6
    for pos, dim in [(6, 0), (6, 17), (2, 5), (0, 31)]:
        e = torch.zeros(1, IDS.shape[1], lm.dims.d_model, dtype=torch.float64)
        e[0, pos, dim] = eps
        vals = []
        for sign in (1, -1):
            with lm.intervene(lsi.Add(site, sign * e)):
                vals.append(metric(lm.forward(IDS), None))
        fd = (vals[0] - vals[1]) / (2 * eps)
        torch.testing.assert_close(grad[0, pos, dim], fd, atol=1e-7, rtol=1e-5)


def test_grads_head_out_and_z_relation(tiny_lm):
    """d m / d head_out[h] is the same for every head (they are summed) and d m / d z[h] = W_O[h] @ that."""
    lm = tiny_lm("gpt2")
    res = lm.run_with_grads(IDS, _metric(3), ["blocks.0.attn.head_out", "blocks.0.attn.z"])
    g_head, g_z = res.grads["blocks.0.attn.head_out"], res.grads["blocks.0.attn.z"]
    for h in range(1, lm.dims.n_heads):
        torch.testing.assert_close(g_head[..., h, :], g_head[..., 0, :], atol=1e-7, rtol=0)
    w_o = head_out_weight(lm.model.get_submodule(lm.spec.layer_path(0, lm.spec.o_proj)), lm.spec, lm.dims).detach()
    torch.testing.assert_close(g_z, torch.einsum("bphd,hed->bphe", g_head, w_o), atol=1e-6, rtol=1e-5)


def test_grads_without_requires_grad(fresh_lm):
    lm = fresh_lm("llama")
    sites = ["blocks.*.resid_pre", "blocks.0.attn.z"]
    with_params = lm.run_with_grads(IDS, _metric(11), sites)
    for p in lm.model.parameters():
        p.requires_grad_(False)
    without = lm.run_with_grads(IDS, _metric(11), sites)
    for k in with_params.grads:
        assert without.grads[k].abs().max() > 0, k
        torch.testing.assert_close(without.grads[k], with_params.grads[k], atol=0, rtol=0)
    assert torch.equal(without.value, with_params.value)
    assert all(p.grad is None for p in lm.model.parameters())
    assert_no_hooks(lm.model)


# --- indexed sites in caches and gradients, logits during generation ----------------------------------------------

def test_cache_and_grads_at_indexed_sites(tiny_lm):
    """A head- or neuron-indexed site can be requested directly and read back under the same name."""
    lm = tiny_lm("llama", attn_implementation="eager")
    full = lm.run_with_cache(IDS, ["blocks.0.attn.z", "blocks.0.mlp.post", "blocks.1.attn.pattern"])
    for site, picked in (("blocks.0.attn.z[1]", full["blocks.0.attn.z"][:, :, 1]),
                         ("blocks.0.mlp.post[2,3]", full["blocks.0.mlp.post"][..., [2, 3]]),
                         ("blocks.1.attn.pattern[0]", full["blocks.1.attn.pattern"][:, 0])):
        cache = lm.run_with_cache(IDS, site)
        assert torch.equal(cache[site], picked), site
        assert tuple(cache[site].shape) == lm.site_shape(site, pos=IDS.shape[1])
    metric = _metric(11)
    res_full = lm.run_with_grads(IDS, metric, "blocks.0.attn.z")
    res = lm.run_with_grads(IDS, metric, "blocks.0.attn.z[1]")
    torch.testing.assert_close(res.grads["blocks.0.attn.z[1]"], res_full.grads["blocks.0.attn.z"][:, :, 1],
                               atol=0, rtol=0)


def test_cache_positions_with_pattern(tiny_lm):
    lm = tiny_lm("qwen2", attn_implementation="eager")
    full = lm.run_with_cache(IDS, "blocks.0.attn.pattern")["blocks.0.attn.pattern"]
    last = lm.run_with_cache(IDS, "blocks.0.attn.pattern", positions=[1, -1])["blocks.0.attn.pattern"]
    assert last.shape == (1, lm.dims.n_heads, 2, IDS.shape[1])
    assert torch.equal(last, full[:, :, [1, IDS.shape[1] - 1]])


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_generate_with_logits_site_intervention(tiny_lm, family):
    lm = tiny_lm(family)
    prompt = [[5, 17, 42, 8]]
    plain = _gen(lm, prompt)[0, 4:].tolist()
    t = next(i for i in range(10, 97) if i not in plain)
    boost = torch.zeros(lm.dims.vocab)
    boost[t] = 1e4
    assert _gen(lm, prompt, [lsi.Add("logits", boost)])[0, 4:].tolist() == [t] * N_NEW
    first = _gen(lm, prompt, [lsi.Add("logits", boost, positions="last", scope="prompt")])[0, 4:].tolist()
    assert first[0] == t
    assert first[1:] == _gen(lm, [prompt[0] + [t]], n=N_NEW - 1)[0, 5:].tolist()
    # a prompt position other than the last one does not touch the next-token logits
    assert _gen(lm, prompt, [lsi.Add("logits", boost, positions=0, scope="prompt")])[0, 4:].tolist() == plain
    assert_no_hooks(lm.model)


# --- padding: interventions and gradients in a padded batch equal the unbatched ones -------------------------------

PAD_ROWS = [[5, 17, 42, 8, 63], [9, 30], [11, 4, 77]]


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_interventions_batched_equal_unbatched(tiny_lm, family, side):
    lm = tiny_lm(family)
    ops = [lsi.Zero("blocks.0.attn.head_out[1]"), lsi.Add("blocks.0.resid_post", torch.ones(lm.dims.d_model)),
           lsi.Scale("blocks.1.mlp.post", 0.5, positions=lsi.Index([0, -1])),
           lsi.Zero("blocks.1.attn.v", positions="last")]
    batch = lm.to_batch(PAD_ROWS, padding_side=side)
    width = batch.input_ids.shape[1]
    with lm.intervene(*ops):
        batched = lm.forward(batch)
        singles = [lm.forward([row]) for row in PAD_ROWS]
    for r, row in enumerate(PAD_ROWS):
        real = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        torch.testing.assert_close(batched[r, real], singles[r][0], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(singles[r][0], lm.forward([row])[0], atol=1e-3)


@pytest.mark.parametrize("side", ["left", "right"])
def test_grads_batched_equal_unbatched(tiny_lm, side):
    lm = tiny_lm("llama")
    batch = lm.to_batch(PAD_ROWS, padding_side=side)
    width = batch.input_ids.shape[1]
    last = [width - 1 if side == "left" else len(r) - 1 for r in PAD_ROWS]

    def metric(logits, b):
        return sum(logits[i, p, 11] for i, p in enumerate(last))

    res = lm.run_with_grads(batch, metric, ["blocks.0.resid_post", "blocks.1.attn.z"])
    for r, row in enumerate(PAD_ROWS):
        single = lm.run_with_grads([row], _metric(11), ["blocks.0.resid_post", "blocks.1.attn.z"])
        real = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        for key in single.grads:
            torch.testing.assert_close(res.grads[key][r, real], single.grads[key][0], atol=1e-6, rtol=1e-5)
        pad = torch.ones(width, dtype=torch.bool)
        pad[real] = False
        if pad.any():  # padding does not influence the metric
            assert res.grads["blocks.0.resid_post"][r, pad].abs().max() == 0


def test_patch_from_a_cache_padded_on_the_other_side(tiny_lm):
    """A cache of the same prompts is an identity patch, whichever side it was padded on; if lsi cannot align
    the two paddings it must say so (a typed error), never patch misaligned positions silently."""
    lm = tiny_lm("llama")
    rows = [[5, 17, 42, 8, 63], [9, 30]]
    src = lm.run_with_cache(lm.to_batch(rows, padding_side="right"), "blocks.1.resid_post")
    left = lm.to_batch(rows, padding_side="left")
    try:
        with lm.intervene(lsi.Patch("blocks.1.resid_post", src)):
            patched = lm.forward(left)
            generated = lm.generate(rows, max_new_tokens=3, min_new_tokens=3)
    except LsiError as err:
        assert "pad" in str(err)
        return
    torch.testing.assert_close(patched, lm.forward(left), atol=1e-6, rtol=0)
    assert torch.equal(generated, lm.generate(rows, max_new_tokens=3, min_new_tokens=3))


# --- interventions are steering leaves: serialisable, checked, one identity -----------------------------------------

def _leaves(lm):
    from lsi.steer.directional import DirectionalAblation
    from lsi.steer.heads import HeadShift
    from lsi.steer.pruning import DeleteLayers

    gen = torch.Generator().manual_seed(3)
    d = lm.dims.d_model
    down = f"{lm.spec.layer_path(0, lm.spec.mlp_down)}.weight"
    return [lsi.Zero("blocks.0.mlp.post[3,7]", model=lm),
            lsi.Scale("blocks.1.attn.head_out[1]", 0.5, positions="last", model=lm),
            lsi.Add("blocks.1.resid_pre", torch.randn(d, generator=gen), 2.0, scope="prompt", model=lm),
            lsi.Set("blocks.0.attn.out", torch.randn(d, generator=gen), positions=[0, 2], model=lm),
            lsi.Mean("blocks.1.mlp.post[2]", torch.tensor(0.3), model=lm),
            DirectionalAblation(torch.randn(d, generator=gen), model=lm),
            HeadShift([(0, 1)], torch.randn(1, lm.dims.d_head, generator=gen), 1.5, model=lm),
            DeleteLayers([1], model=lm),
            lsi.WeightEdit.of(lm, {down: 0.01 * torch.randn(lm.model.get_parameter(down).shape, generator=gen)})]


def test_every_serialisable_leaf_round_trips_and_intervene_accepts_it(tiny_lm, tmp_path):
    lm = tiny_lm("llama")
    base = lm.forward(IDS)
    for i, leaf in enumerate(_leaves(lm)):
        with lm.intervene(leaf):
            want = lm.forward(IDS)
        assert not torch.equal(want, base), leaf
        loaded = lsi.Steering.load(leaf.save(tmp_path / f"leaf{i}"), lm)
        assert type(loaded) is type(leaf) and repr(loaded) == repr(leaf)
        with loaded.apply(lm):
            torch.testing.assert_close(lm.forward(IDS), want, atol=0, rtol=0)
        assert torch.equal(lm.forward(IDS), base)  # hooks removed, weights restored
    assert_no_hooks(lm.model)


def test_intervene_takes_compositions_lists_and_weight_edits_like_apply(tiny_lm):
    lm = tiny_lm("llama")
    leaves = _leaves(lm)
    together = lsi.compose(leaves[:5], leaves[8])
    with together.apply(lm):
        want = lm.forward(IDS)
    with lm.intervene(leaves[0], leaves[1:5], leaves[8]):
        torch.testing.assert_close(lm.forward(IDS), want, atol=0, rtol=0)
    with lm.intervene(*leaves[:5]), lm.intervene(leaves[8]):  # nested: weight deltas first, then the hooks
        torch.testing.assert_close(lm.forward(IDS), want, atol=0, rtol=0)
    with pytest.raises(lsi.errors.InputError, match="interventions or steerings"):
        lm.intervene("blocks.0.mlp.out")


def test_patch_and_apply_refuse_to_save(tiny_lm, tmp_path):
    from lsi.errors import NotSerializableError

    lm = tiny_lm("llama")
    cache = lm.run_with_cache(IDS, "blocks.0.resid_post")
    for leaf in (lsi.Patch("blocks.0.resid_post", cache, model=lm), lsi.Apply("embed", lambda x: x, model=lm)):
        with pytest.raises(NotSerializableError, match=type(leaf).__name__):
            (lsi.Zero("embed", model=lm) + leaf).save(tmp_path / "s")
    assert not list(tmp_path.iterdir())


def test_non_finite_values_are_refused_when_built():
    from lsi.errors import NonFiniteSteeringError

    v = torch.ones(8)
    for build in (lambda: lsi.Add("embed", v, float("inf")), lambda: lsi.Add("embed", v * float("nan")),
                  lambda: lsi.Add("embed", v * 1e30, 1e10),  # alpha * vector overflows float32
                  lambda: lsi.Scale("embed", float("nan")), lambda: lsi.Set("embed", v / 0),
                  lambda: lsi.Mean("embed", torch.tensor([float("-inf")]))):
        with pytest.raises(NonFiniteSteeringError):
            build()


def test_each_identity_user_refuses_another_model(tiny_lm, tmp_path):
    from lsi.errors import ModelMismatchError
    from lsi.locate.tuned_lens import TunedLens

    lm, other = tiny_lm("llama"), tiny_lm("llama", num_hidden_layers=3)
    with pytest.raises(ModelMismatchError, match="n_layers differs"):  # a steering
        lm.intervene(lsi.Zero("embed", model=other))
    edit = _leaves(lm)[-1]
    twin = lsi.LanguageModel(__import__("copy").deepcopy(lm.model), lm.tokenizer, spec=lm.spec, verify=False)
    name = next(iter(edit.deltas))
    with torch.no_grad():
        twin.model.get_parameter(name).add_(1e-3)
    with pytest.raises(ModelMismatchError, match="fingerprint"):  # a weight edit on other weights
        twin.intervene(edit)
    lens = TunedLens.identity(lm)
    lens.save(tmp_path / "lens")
    with torch.no_grad():
        twin.model.get_parameter(f"{lm.spec.final_norm}.weight").mul_(2.0)
    with pytest.raises(ModelMismatchError, match="fingerprint"):  # a tuned lens
        TunedLens.load(tmp_path / "lens", twin)
    lsi.cache_to_disk(lm, [[1, 2, 3]], "blocks.0.resid_post", tmp_path / "store")
    with pytest.raises(ModelMismatchError, match="n_layers differs"):  # an activation store resumed on another model
        lsi.cache_to_disk(other, [[1, 2, 3]], "blocks.0.resid_post", tmp_path / "store")
    assert lsi.ActivationStore(tmp_path / "store").model == lsi.ModelIdentity.of(lm)


def test_steerings_saved_under_names_with_dots_stay_apart(tiny_lm, tmp_path):
    lm = tiny_lm("llama")
    for alpha in (0.5, 0.25):
        lsi.Add("blocks.1.resid_pre", torch.ones(32), alpha, model=lm).save(tmp_path / f"boys_alpha{alpha}")
    loaded = [lsi.Steering.load(tmp_path / f"boys_alpha{alpha}", lm) for alpha in (0.5, 0.25)]
    assert [leaf.alpha for leaf in loaded] == [0.5, 0.25]
    assert len(list(tmp_path.iterdir())) == 4
