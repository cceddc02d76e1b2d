"""Architecture conformance: every registered family honours the site contract (ARCHITECTURE.md, sites table).

The checks are about meaning (decomposition identities against HF's own tensors), not only shapes.
"""

from __future__ import annotations

import pytest
import torch
from core_helpers import FAMILIES, GATED, IDS, PARALLEL, assert_no_hooks, hf_logits

import lsi
from lsi.arch.dims import get_module
from lsi.core.hooks import HookSession
from lsi.errors import SiteUnavailableError

pytestmark = pytest.mark.arch

ATOL = 1e-5


def _all_cache(lm, ids=IDS):
    """Every available site of ``lm`` (eager attention), plus HF's output with hidden states."""
    sites = lm.available_sites()
    with torch.no_grad(), HookSession(lm.model, lm.spec, lm.dims, cache=sites) as session:
        out = lm.model(input_ids=ids, output_hidden_states=True)
    return session, out


def _raw_hook(module, store, key):
    """A plain PyTorch forward hook (no lsi) that records a module's input and output."""

    def hook(mod, args, kwargs, output):
        store[key] = (args[0] if args else kwargs["hidden_states"], output[0] if isinstance(output, tuple) else output)

    return module.register_forward_hook(hook, with_kwargs=True)


# --- every site fires once, with its shape ----------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_each_available_site_fires_once_with_its_shape(tiny_lm, family):
    lm = tiny_lm(family, attn_implementation="eager")
    sites = lm.available_sites()
    n = lm.dims.n_layers
    per_layer = {s.kind for s in sites if s.layer is not None}
    expected_kinds = {"resid_pre", "resid_post", "attn.out", "attn.z", "attn.head_out", "attn.pattern", "attn.q",
                      "attn.k", "attn.v", "mlp.out", "mlp.post", "mlp.pre"}
    if family not in PARALLEL:
        expected_kinds.add("resid_mid")
    assert per_layer == expected_kinds
    assert {str(s) for s in sites if s.layer is None} == {"embed", "ln_final", "logits"}
    assert len(sites) == 3 + n * len(expected_kinds)

    session, _ = _all_cache(lm)
    assert set(session.fire_counts) == {str(s) for s in sites}
    assert all(c == 1 for c in session.fire_counts.values()), dict(session.fire_counts)
    for s in sites:
        assert tuple(session.values[str(s)].shape) == lm.site_shape(s, batch=1, pos=IDS.shape[1]), str(s)
    assert_no_hooks(lm.model)


@pytest.mark.parametrize("family", FAMILIES)
def test_run_with_cache_shapes_batch_of_two(tiny_lm, family):
    lm = tiny_lm(family, attn_implementation="eager")
    d = lm.dims
    ids = torch.cat([IDS, IDS.flip(1)])
    cache = lm.run_with_cache(ids, sites=["blocks.*.attn.q", "blocks.*.attn.k", "blocks.*.attn.v",
                                          "blocks.-1.mlp.post", "blocks.0.attn.pattern", "blocks.1.attn.head_out"])
    p = ids.shape[1]
    for i in range(d.n_layers):
        assert cache[f"blocks.{i}.attn.q"].shape == (2, p, d.n_heads, d.d_head)
        assert cache[f"blocks.{i}.attn.k"].shape == (2, p, d.n_kv_heads, d.d_head)
        assert cache[f"blocks.{i}.attn.v"].shape == (2, p, d.n_kv_heads, d.d_head)
    assert cache["blocks.1.mlp.post"].shape == (2, p, d.d_mlp)
    assert cache["blocks.0.attn.pattern"].shape == (2, d.n_heads, p, p)
    assert cache["blocks.1.attn.head_out"].shape == (2, p, d.n_heads, d.d_model)
    assert cache["blocks.1.attn.head_out[2]"].shape == (2, p, d.d_model)
    if family not in ("gpt2", "gpt_neox"):
        assert d.n_kv_heads < d.n_heads  # the tiny models exercise GQA


# --- resid_mid availability -------------------------------------------------------------------------------------

def test_resid_mid_unavailable_for_parallel_gpt_neox(tiny_lm):
    lm = tiny_lm("gpt_neox")
    assert lm.model.config.use_parallel_residual and lm.parallel_attn
    with pytest.raises(SiteUnavailableError, match="parallel"):
        lm.run_with_cache(IDS, "blocks.0.resid_mid")
    with pytest.raises(SiteUnavailableError):
        lm.run_with_cache(IDS, "blocks.*.resid_mid")
    with pytest.raises(SiteUnavailableError):
        lm.site_shape("blocks.1.resid_mid")
    with pytest.raises(SiteUnavailableError), lm.intervene(lsi.Zero("blocks.0.resid_mid")):
        pass
    with pytest.raises(SiteUnavailableError):
        HookSession(lm.model, lm.spec, lm.dims, cache=[lsi.Site("resid_mid", 0)])
    assert_no_hooks(lm.model)


def test_resid_mid_available_for_sequential_gpt_neox(tiny_lm):
    lm = tiny_lm("gpt_neox", use_parallel_residual=False, attn_implementation="eager")
    assert not lm.parallel_attn
    assert lsi.Site("resid_mid", 1) in lm.available_sites()
    session, out = _all_cache(lm)
    v = session.values
    for i in range(lm.dims.n_layers):
        torch.testing.assert_close(v[f"blocks.{i}.resid_mid"], v[f"blocks.{i}.resid_pre"] + v[f"blocks.{i}.attn.out"],
                                   atol=ATOL, rtol=0)
        torch.testing.assert_close(v[f"blocks.{i}.resid_post"], v[f"blocks.{i}.resid_mid"] + v[f"blocks.{i}.mlp.out"],
                                   atol=ATOL, rtol=0)
    torch.testing.assert_close(v["blocks.0.resid_post"], out.hidden_states[1], atol=0, rtol=0)
    torch.testing.assert_close(v["ln_final"], out.hidden_states[-1], atol=0, rtol=0)


# --- residual stream vs HF hidden states -------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_resid_matches_output_hidden_states(tiny_lm, family):
    lm = tiny_lm(family, attn_implementation="eager")
    session, out = _all_cache(lm)
    v, hs, n = session.values, out.hidden_states, lm.dims.n_layers
    assert len(hs) == n + 1
    torch.testing.assert_close(v["embed"], hs[0], atol=0, rtol=0)
    for i in range(n):
        torch.testing.assert_close(v[f"blocks.{i}.resid_pre"], hs[i], atol=0, rtol=0)
        if i < n - 1:
            torch.testing.assert_close(v[f"blocks.{i}.resid_post"], hs[i + 1], atol=0, rtol=0)
            torch.testing.assert_close(v[f"blocks.{i}.resid_post"], v[f"blocks.{i + 1}.resid_pre"], atol=0, rtol=0)
    # HF's last hidden state is after the final norm; resid_post of the last layer is before it
    torch.testing.assert_close(v["ln_final"], hs[-1], atol=0, rtol=0)
    norm = get_module(lm.model, lm.spec.final_norm)
    with torch.no_grad():
        torch.testing.assert_close(norm(v[f"blocks.{n - 1}.resid_post"]), hs[-1], atol=ATOL, rtol=0)
    assert not torch.allclose(v[f"blocks.{n - 1}.resid_post"], hs[-1], atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_decomposition(tiny_lm, family):
    lm = tiny_lm(family, attn_implementation="eager")
    v = _all_cache(lm)[0].values
    for i in range(lm.dims.n_layers):
        pre, attn, mlp, post = (v[f"blocks.{i}.{k}"] for k in ("resid_pre", "attn.out", "mlp.out", "resid_post"))
        assert attn.abs().max() > 1e-3 and mlp.abs().max() > 1e-3  # both really write something
        if family in PARALLEL:
            torch.testing.assert_close(post, pre + attn + mlp, atol=ATOL, rtol=0)
        else:
            mid = v[f"blocks.{i}.resid_mid"]
            torch.testing.assert_close(mid, pre + attn, atol=ATOL, rtol=0)
            torch.testing.assert_close(post, mid + mlp, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_head_out_sums_to_output_projection(tiny_lm, family):
    lm = tiny_lm(family, attn_implementation="eager")
    raw: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [_raw_hook(lm.model.get_submodule(lm.spec.layer_path(i, lm.spec.o_proj)), raw, i)
               for i in range(lm.dims.n_layers)]
    try:
        v = _all_cache(lm)[0].values
    finally:
        for h in handles:
            h.remove()
    for i in range(lm.dims.n_layers):
        o_proj = lm.model.get_submodule(lm.spec.layer_path(i, lm.spec.o_proj))
        o_in, o_out = raw[i]
        head_out = v[f"blocks.{i}.attn.head_out"]
        bias = o_proj.bias if getattr(o_proj, "bias", None) is not None else torch.zeros(lm.dims.d_model)
        torch.testing.assert_close(head_out.sum(-2) + bias.detach(), o_out, atol=ATOL, rtol=1e-5)
        # z is the input of the output projection, split by head
        torch.testing.assert_close(v[f"blocks.{i}.attn.z"].flatten(-2), o_in, atol=0, rtol=0)
        # heads really differ (the split is per head, not a copy)
        assert not torch.allclose(head_out[..., 0, :], head_out[..., 1, :])


@pytest.mark.parametrize("family", FAMILIES)
def test_pattern_rows_sum_to_one_and_are_causal(tiny_lm, family):
    lm = tiny_lm(family, attn_implementation="eager")
    v = _all_cache(lm)[0].values
    p = IDS.shape[1]
    for i in range(lm.dims.n_layers):
        pattern = v[f"blocks.{i}.attn.pattern"]
        assert pattern.shape == (1, lm.dims.n_heads, p, p)
        torch.testing.assert_close(pattern.sum(-1), torch.ones(1, lm.dims.n_heads, p), atol=ATOL, rtol=0)
        assert (pattern >= 0).all()
        assert torch.triu(pattern, diagonal=1).abs().max() == 0  # no attention to the future


@pytest.mark.parametrize("family", FAMILIES)
def test_z_is_pattern_times_v_with_gqa_grouping(tiny_lm, family):
    """z[h] = pattern[h] @ v[h // (n_heads / n_kv_heads)]: ties q/k (via pattern), v and z together."""
    lm = tiny_lm(family, attn_implementation="eager")
    v = _all_cache(lm)[0].values
    group = lm.dims.n_heads // lm.dims.n_kv_heads
    for i in range(lm.dims.n_layers):
        pattern, vals, z = (v[f"blocks.{i}.attn.{k}"] for k in ("pattern", "v", "z"))
        vals = vals.repeat_interleave(group, dim=2)  # [b, k, h, dh]
        expected = torch.einsum("bhqk,bkhd->bqhd", pattern, vals)
        torch.testing.assert_close(z, expected, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("which", ["q", "k"])
def test_zeroing_q_or_k_heads_makes_exactly_their_attention_uniform(tiny_lm, family, which):
    """A zero query (or key) gives zero scores, so a uniform causal pattern, for exactly the heads that read it:
    checks that q/k are the right slices of fused projections and that writes land there (GQA grouping too)."""
    lm = tiny_lm(family, attn_implementation="eager")
    d, p = lm.dims, IDS.shape[1]
    group = d.n_heads // d.n_kv_heads
    index = 1
    hit_heads = [index] if which == "q" else list(range(index * group, (index + 1) * group))
    with lm.intervene(lsi.Zero(f"blocks.0.attn.{which}[{index}]")):
        pattern = lm.run_with_cache(IDS, "blocks.0.attn.pattern")["blocks.0.attn.pattern"]
    clean = lm.run_with_cache(IDS, "blocks.0.attn.pattern")["blocks.0.attn.pattern"]
    uniform = torch.tril(torch.ones(p, p)) / torch.arange(1, p + 1)[:, None]
    for h in range(d.n_heads):
        if h in hit_heads:
            torch.testing.assert_close(pattern[0, h], uniform, atol=1e-6, rtol=0)
        elif family != "olmo2":  # OLMo-2's q_norm/k_norm normalize over all heads together, so others move
            torch.testing.assert_close(pattern[0, h], clean[0, h], atol=0, rtol=0)
            assert not torch.allclose(clean[0, h], uniform, atol=1e-3)


def test_gpt2_pattern_is_softmax_of_q_k():
    """For GPT-2 (no rotary embedding) the q/k sites determine the pattern exactly."""
    from lsi.testing import tiny_model

    lm = lsi.LanguageModel(tiny_model("gpt2", attn_implementation="eager"))
    cache = lm.run_with_cache(IDS, ["blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.pattern"])
    q, k = cache["blocks.0.attn.q"], cache["blocks.0.attn.k"]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / lm.dims.d_head ** 0.5
    p = IDS.shape[1]
    scores = scores.masked_fill(torch.ones(p, p, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(cache["blocks.0.attn.pattern"], scores.softmax(-1), atol=ATOL, rtol=1e-4)


# --- logits --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_logits_site_and_unembed(tiny_lm, family):
    lm = tiny_lm(family, attn_implementation="eager")
    session, out = _all_cache(lm)
    v, n = session.values, lm.dims.n_layers
    with torch.no_grad():
        torch.testing.assert_close(lm.unembed(v[f"blocks.{n - 1}.resid_post"]), out.logits, atol=ATOL, rtol=1e-5)
    cap_name = lm.spec.final_logit_softcap
    cap = getattr(lm.model.config, cap_name) if cap_name else None
    if cap:
        # the logits site is the unembedding output; the family soft-caps it afterwards
        assert family == "gemma2"
        torch.testing.assert_close(torch.tanh(v["logits"] / cap) * cap, out.logits, atol=ATOL, rtol=1e-5)
    else:
        assert torch.equal(v["logits"], out.logits)


# --- MLP ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_pre_to_post(tiny_lm, family):
    lm = tiny_lm(family, attn_implementation="eager")
    spec = lm.spec
    raw: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [_raw_hook(lm.model.get_submodule(spec.layer_path(0, spec.mlp_in)), raw, "in")]
    if spec.mlp_gate is not None:
        handles.append(_raw_hook(lm.model.get_submodule(spec.layer_path(0, spec.mlp_gate)), raw, "gate"))
    try:
        v = _all_cache(lm)[0].values
    finally:
        for h in handles:
            h.remove()
    act = lm.model.get_submodule(spec.layer_path(0, spec.mlp_act))
    pre, post = v["blocks.0.mlp.pre"], v["blocks.0.mlp.post"]
    assert spec.gated == (family in GATED)
    with torch.no_grad():
        if not spec.gated:
            torch.testing.assert_close(post, act(pre), atol=ATOL, rtol=1e-5)
            torch.testing.assert_close(pre, raw["in"][1], atol=0, rtol=0)  # pre = W_in x + b
        else:
            if spec.mlp_gate_up is not None:
                gate, up = raw["in"][1].chunk(2, dim=-1)
            else:
                gate, up = raw["gate"][1], raw["in"][1]
            torch.testing.assert_close(pre, gate, atol=0, rtol=0)
            torch.testing.assert_close(post, act(pre) * up, atol=ATOL, rtol=1e-5)
            assert not torch.allclose(post, act(pre), atol=1e-3)


# --- the norms feeding attention and the MLP --------------------------------------------------------------------

def _distinct_norms(model):
    """``model`` with random weights (and biases) in every norm: freshly initialized norms are all one function."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if "Norm" in type(module).__name__:
                for param in module.parameters(recurse=False):
                    param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_named_norms_feed_attention_and_mlp(family):
    """``pre_attn_norm`` / ``pre_mlp_norm`` of the residual stream are the attention / MLP inputs (the residual
    itself where the spec names none), and the attention norm's output through W_Q gives ``attn.q``."""
    from lsi.testing import tiny_model

    lm = lsi.LanguageModel(_distinct_norms(tiny_model(family, attn_implementation="eager")))
    spec, n = lm.spec, lm.dims.n_layers
    assert (spec.pre_attn_norm is None) == (spec.pre_mlp_norm is None) == (family == "olmo2")
    blocks = (spec.attn, spec.mlp_down.rsplit(".", 1)[0])
    raw: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    handles = [_raw_hook(lm.model.get_submodule(spec.layer_path(i, path)), raw, (i, path))
               for i in range(n) for path in blocks]
    try:
        v = _all_cache(lm)[0].values
    finally:
        for h in handles:
            h.remove()
    for i in range(n):
        pre = v[f"blocks.{i}.resid_pre"]
        mid = pre if family in PARALLEL else v[f"blocks.{i}.resid_mid"]
        with torch.no_grad():
            attn_in, mlp_in = [x if path is None else lm.model.get_submodule(spec.layer_path(i, path))(x)
                               for path, x in ((spec.pre_attn_norm, pre), (spec.pre_mlp_norm, mid))]
        torch.testing.assert_close(raw[i, blocks[0]][0], attn_in, atol=0, rtol=0)
        torch.testing.assert_close(raw[i, blocks[1]][0], mlp_in, atol=ATOL, rtol=0)
        if spec.pre_attn_norm is not None:
            # positions are compared relative to the first, which cancels the projection's bias
            q = v[f"blocks.{i}.attn.q"][0]
            predicted = torch.einsum("pd,hde->phe", attn_in[0], lm.weights.W_Q(i))
            torch.testing.assert_close(predicted - predicted[:1], q - q[:1], atol=ATOL, rtol=1e-4)


# --- no-op interventions, hooks --------------------------------------------------------------------------------------

def _copy(x: torch.Tensor) -> torch.Tensor:
    """An equal tensor with the same strides (a plain clone of a non-contiguous view may change which kernel
    the next op uses, e.g. SiLU on phi3's chunked gate, and so the last bit)."""
    return torch.empty_strided(x.size(), x.stride(), dtype=x.dtype).copy_(x)


def _writable(lm):
    return [s for s in lm.available_sites() if s.kind != "attn.pattern"]


@pytest.mark.parametrize("family", FAMILIES)
def test_noop_interventions_are_bit_identical_and_leave_no_hooks(tiny_lm, family):
    lm = tiny_lm(family)
    expected = hf_logits(lm, IDS)
    assert torch.equal(lm.forward(IDS), expected)
    with lm.intervene():
        assert torch.equal(lm.forward(IDS), expected)
    assert_no_hooks(lm.model)
    identity = [lsi.Apply(s, lambda x: x) for s in _writable(lm)]
    with lm.intervene(*identity) as session:
        got = lm.forward(IDS)
    assert torch.equal(got, expected)
    assert set(session.fire_counts) == {str(s) for s in _writable(lm)}
    assert all(c == 1 for c in session.fire_counts.values())
    assert_no_hooks(lm.model)
    assert torch.equal(hf_logits(lm, IDS), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_value_preserving_writes_are_bit_identical(tiny_lm, family):
    """Writing back an equal (cloned) value goes through every site's write path and changes nothing."""
    lm = tiny_lm(family)
    expected = hf_logits(lm, IDS)
    ops = [lsi.Apply(s, _copy) for s in _writable(lm) if s.kind != "resid_mid"]
    ops += [lsi.Apply("blocks.0.attn.z[1]", _copy), lsi.Apply("blocks.1.mlp.post[3,5]", _copy),
            lsi.Scale("blocks.*.attn.head_out", 1.0), lsi.Add("blocks.0.resid_post", torch.zeros(lm.dims.d_model)),
            lsi.Apply("blocks.*.attn.v[0]", _copy, positions="last")]
    with lm.intervene(*ops):
        assert torch.equal(lm.forward(IDS), expected)
    assert_no_hooks(lm.model)


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - PARALLEL))
def test_resid_mid_value_preserving_write(tiny_lm, family):
    """resid_mid is written by changing attn.out; re-writing the same value may move the last bit only."""
    lm = tiny_lm(family)
    expected = hf_logits(lm, IDS)
    with lm.intervene(lsi.Apply("blocks.*.resid_mid", _copy)):
        got = lm.forward(IDS)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert_no_hooks(lm.model)


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_removed_when_code_inside_intervene_raises(tiny_lm, family):
    lm = tiny_lm(family)
    with pytest.raises(RuntimeError, match="user error"), lm.intervene(lsi.Zero("blocks.*.mlp.out")):
        lm.forward(IDS)
        raise RuntimeError("user error")
    assert_no_hooks(lm.model)

    def boom(x):
        raise RuntimeError("fn error")

    with pytest.raises(RuntimeError, match="fn error"), lm.intervene(lsi.Apply("blocks.1.attn.z", boom)):
        lm.forward(IDS)
    assert_no_hooks(lm.model)
    with pytest.raises(lsi.errors.IndexOutOfRangeError):
        lm.run_with_cache(IDS, "blocks.*.resid_post", positions=[50])
    assert_no_hooks(lm.model)
    assert torch.equal(lm.forward(IDS), hf_logits(lm, IDS))


def test_hf_model_called_positionally_inside_intervene(tiny_lm):
    """Calling the wrapped HF model directly (ids as first positional argument) inside intervene works."""
    lm = tiny_lm("llama")
    op = lsi.Zero("blocks.0.mlp.out")
    with lm.intervene(op):
        expected = lm.forward(IDS)
        with torch.no_grad():
            got = lm.model(IDS).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    assert not torch.equal(got, hf_logits(lm, IDS))
    assert_no_hooks(lm.model)


# --- batched == unbatched ------------------------------------------------------------------------------------------

ROWS = [[5, 17, 42], [8, 63, 21, 9, 30], [11, 4, 77, 50, 6, 13, 88]]
BATCH_SITES = ["embed", "blocks.*.resid_post", "blocks.0.attn.z", "blocks.1.attn.head_out", "blocks.1.mlp.post",
               "blocks.0.attn.k", "blocks.1.attn.pattern", "ln_final", "logits"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_batched_equals_unbatched(tiny_lm, family, side):
    lm = tiny_lm(family, attn_implementation="eager")
    batch = lm.to_batch(ROWS, padding_side=side)
    assert batch.has_padding
    width = batch.input_ids.shape[1]
    cache = lm.run_with_cache(batch, BATCH_SITES)
    logits = lm.forward(batch)
    last = lm.run_with_cache(batch, ["blocks.0.resid_post", "logits"], positions="last")
    for r, row in enumerate(ROWS):
        n = len(row)
        real = slice(width - n, width) if side == "left" else slice(0, n)
        single = lm.run_with_cache([row], BATCH_SITES)
        for key in single:
            is_pattern = lsi.Site.parse(key).kind == "attn.pattern"
            got = cache[key][r, :, real, real] if is_pattern else cache[key][r, real]
            torch.testing.assert_close(got, single[key][0], atol=1e-5, rtol=1e-5, msg=f"{key} row {r}")
        torch.testing.assert_close(logits[r, real], lm.forward([row])[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(last["logits"][r, 0], single["logits"][0, -1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(last["blocks.0.resid_post"][r, 0], single["blocks.0.resid_post"][0, -1],
                                   atol=1e-5, rtol=1e-5)
    expected_last = [[width - 1]] * 3 if side == "left" else [[len(r) - 1] for r in ROWS]
    assert last.positions.tolist() == expected_last
