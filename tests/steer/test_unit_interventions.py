"""Zero / Scale / Mean / Set of heads, neurons and residual states equal plain torch hooks written by hand;
positions and scope, save / load, shape and non-finite refusals, targets taken from locate results, and the
two_languages organism (zeroing one language's recorded neurons hurts that language only)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

import lsi
from lsi.arch.dims import get_module, linear_weight
from lsi.core.steering import Steering, compose
from lsi.errors import (
    IndexOutOfRangeError,
    InputError,
    NonFiniteSteeringError,
    ReadOnlySiteError,
    ShapeMismatchError,
)
from lsi.locate.result import LocateResult
from lsi.organisms._common import encode, mean_nll
from lsi.organisms.registry import ground_truth, load_organism
from lsi.steer.located import group_units, located_sites

FAMILIES = ("gpt2", "llama", "gpt_neox")
IDS = torch.randint(3, 97, (3, 9), generator=torch.Generator().manual_seed(0))
REFERENCE = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]  # padded: means must count real tokens only


def _module(lm, layer: int, path: str):
    return get_module(lm.model, lm.spec.layer_path(layer, path))


@contextlib.contextmanager
def _input_edit(lm, layer: int, path: str, edit):
    """A plain torch pre-hook replacing the first input of a module by ``edit(x)`` (a copy)."""
    handle = _module(lm, layer, path).register_forward_pre_hook(lambda m, args: (edit(args[0].clone()), *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def _steered(lm, steering: Steering, ids=IDS) -> torch.Tensor:
    with steering.apply(lm):
        return lm.forward(ids)


def _columns(cols, value):
    def edit(x):
        x[..., cols] = value(x[..., cols]) if callable(value) else value
        return x
    return edit


@pytest.mark.unit
@pytest.mark.parametrize("family", FAMILIES)
def test_zero_and_scale_equal_plain_torch_hooks(tiny_lm, family):
    lm = tiny_lm(family)
    base = lm.forward(IDS)
    zero = lsi.Zero("blocks.0.mlp.post[3,17]") + lsi.Zero("blocks.1.mlp.post[5]")
    down = lm.spec.mlp_down
    with _input_edit(lm, 0, down, _columns([3, 17], 0.0)), _input_edit(lm, 1, down, _columns([5], 0.0)):
        expected = lm.forward(IDS)
    assert float((expected - base).abs().max()) > 1e-4
    torch.testing.assert_close(_steered(lm, zero), expected, atol=1e-6, rtol=0)

    d_head = lm.dims.d_head
    scale = lsi.Scale("blocks.1.attn.z[2]", 0.3) + lsi.Scale("blocks.0.attn.z[0]", 0.3)
    head = lambda h: list(range(h * d_head, (h + 1) * d_head))  # noqa: E731
    with _input_edit(lm, 1, lm.spec.o_proj, _columns(head(2), lambda x: 0.3 * x)), \
            _input_edit(lm, 0, lm.spec.o_proj, _columns(head(0), lambda x: 0.3 * x)):
        expected = lm.forward(IDS)
    assert float((expected - base).abs().max()) > 1e-4
    torch.testing.assert_close(_steered(lm, scale), expected, atol=1e-6, rtol=0)


@pytest.mark.unit
@pytest.mark.parametrize("family", FAMILIES)
def test_mean_equals_the_brute_force_mean_over_real_tokens(tiny_lm, family):
    lm = tiny_lm(family)
    seen = []
    with _input_edit(lm, 1, lm.spec.mlp_down, lambda x: seen.append(x) or x):
        for row in REFERENCE:  # one unpadded row at a time
            lm.forward([row])
    tokens = torch.cat([x[0] for x in seen])  # [real tokens, d_mlp]
    expected = tokens[:, [4, 30]].double().mean(0).float()
    mean = lsi.Mean.of(lm, "blocks.*.mlp.post[4,30]", REFERENCE, batch_size=2)
    assert [str(leaf.site) for leaf in mean.leaves()] == ["blocks.0.mlp.post[4,30]", "blocks.1.mlp.post[4,30]"]
    torch.testing.assert_close(mean.leaves()[1].value, expected, atol=1e-6, rtol=0)
    only_layer_1 = lsi.Mean("blocks.1.mlp.post[4,30]", mean.leaves()[1].value)
    with _input_edit(lm, 1, lm.spec.mlp_down, _columns([4, 30], expected)):
        brute = lm.forward(IDS)
    assert float((brute - lm.forward(IDS)).abs().max()) > 1e-4
    torch.testing.assert_close(_steered(lm, only_layer_1), brute, atol=1e-6, rtol=0)


@pytest.mark.unit
@pytest.mark.parametrize("family", FAMILIES)
def test_set_head_output_and_residual_state(tiny_lm, family):
    lm = tiny_lm(family)
    gen = torch.Generator().manual_seed(4)
    target = torch.randn(lm.dims.d_model, generator=gen)
    o_proj = _module(lm, 1, lm.spec.o_proj)
    d_head = lm.dims.d_head
    w_o = linear_weight(o_proj, lm.spec.conv1d)[:, 2 * d_head:3 * d_head]  # head 2's columns [d_model, d_head]

    def replace_head(module, args, out):  # out - (what head 2 wrote) + target
        z = args[0][..., 2 * d_head:3 * d_head]
        return out - z @ w_o.T + target

    handle = o_proj.register_forward_hook(replace_head)
    try:
        expected = lm.forward(IDS)
    finally:
        handle.remove()
    torch.testing.assert_close(_steered(lm, lsi.Set("blocks.1.attn.head_out[2]", target)), expected,
                               atol=1e-5, rtol=0)


@pytest.mark.unit
def test_last_position_only_changes_the_last_prediction(tiny_lm):
    lm = tiny_lm("llama")
    base = lm.forward(IDS)
    steered = _steered(lm, compose(lsi.Zero(s, positions="last") for s in ["blocks.0.attn.head_out[1]",
                                                                            "blocks.0.mlp.post"]))
    assert torch.equal(steered[:, :-1], base[:, :-1])
    assert float((steered[:, -1] - base[:, -1]).abs().min()) > 0.0


@pytest.mark.unit
@pytest.mark.parametrize("scope", ["generated", "prompt"])
def test_scope_during_generate(tiny_lm, scope):
    lm = tiny_lm("gpt2")
    steer = lsi.Scale("blocks.*.resid_post", 3.0, scope=scope)
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12]]

    def logits_per_step(steering=None) -> list[torch.Tensor]:
        calls: list[torch.Tensor] = []
        handle = get_module(lm.model, lm.spec.unembed).register_forward_hook(lambda m, a, out: calls.append(out))
        try:
            with steering.apply(lm) if steering else contextlib.nullcontext():
                lm.generate(prompts, max_new_tokens=4)
        finally:
            handle.remove()
        return calls

    plain, steered = logits_per_step(), logits_per_step(steer)
    assert len(plain) == len(steered) == 4  # the prompt pass, then one pass per new token
    assert torch.equal(steered[0], plain[0]) == (scope == "generated")
    if scope == "generated":  # the same first token, then every decoding step is steered
        assert torch.equal(steered[0][:, -1].argmax(-1), plain[0][:, -1].argmax(-1))
        assert float((steered[1] - plain[1]).abs().max()) > 1e-3


@pytest.mark.unit
def test_save_and_load_round_trip(tiny_lm, tmp_path):
    lm = tiny_lm("llama")
    steer = (lsi.Zero("blocks.0.mlp.post[3,17]", model=lm)
             + lsi.Scale("blocks.1.attn.z[2]", 1.5, positions=lsi.Match(9), scope="prompt", model=lm)
             + lsi.Mean.of(lm, ["blocks.1.mlp.post[4]", "blocks.0.attn.head_out[1]"], REFERENCE,
                           positions=lsi.Span(1, 3))
             + lsi.Set("blocks.1.resid_pre", torch.linspace(-1, 1, 32), positions=[0, -1], model=lm)
             + lsi.Add("blocks.0.resid_post", torch.linspace(0, 1, 32), 0.5, scope="generated", model=lm))
    ids = IDS.clone()
    ids[:, 4] = 9  # the Match selector has tokens to match
    before = _steered(lm, steer, ids)
    assert float((before - lm.forward(ids)).abs().max()) > 1e-3
    loaded = Steering.load(steer.save(tmp_path / "amp"), lm)
    assert [repr(p) for p in loaded.leaves()] == [repr(p) for p in steer.leaves()]
    assert torch.equal(_steered(lm, loaded, ids), before)
    assert tuple(loaded.leaves()[2].value.shape) == ()  # one neuron's mean is a scalar
    assert [type(leaf).__name__ for leaf in loaded.leaves()] == ["Zero", "Scale", "Mean", "Mean", "Set", "Add"]


@pytest.mark.unit
def test_bad_values_are_refused(tiny_lm):
    lm = tiny_lm("llama")
    base = lm.forward(IDS)
    with pytest.raises(ShapeMismatchError, match=r"shape \(32,\) for blocks.1.attn.head_out\[2\]"):
        lsi.Set("blocks.1.attn.head_out[2]", torch.ones(8)).apply(lm)
    with pytest.raises(ShapeMismatchError, match=r"shape \(2,\)"):  # two neurons take two values (or one)
        lsi.Set("blocks.*.mlp.post[1,2]", torch.tensor([0.5, 0.5, 0.5])).apply(lm)
    with pytest.raises(NonFiniteSteeringError, match="1 NaN/inf"):
        lsi.Set("blocks.0.resid_pre", torch.tensor([0.0] * 31 + [math.nan]))
    with pytest.raises(NonFiniteSteeringError, match="finite factor"):
        lsi.Scale("blocks.0.mlp.post", math.inf)
    with pytest.raises(NonFiniteSteeringError, match=r"torch\.float16"):  # finite in float32, not in the model's dtype
        lsi.Set("blocks.0.resid_pre", torch.full((32,), 1e5)).apply(tiny_lm("llama", dtype=torch.float16))
    with pytest.raises(ReadOnlySiteError), lm.intervene(lsi.Zero("blocks.0.attn.pattern[1]")):
        pass
    with pytest.raises(IndexOutOfRangeError):
        lsi.Zero("blocks.0.mlp.post[48]").apply(lm)
    assert torch.equal(lm.forward(IDS), base)  # nothing left applied


@pytest.mark.unit
@pytest.mark.parametrize("family", ["gpt2", "gpt_neox"])
def test_from_locate_zeroes_exactly_the_located_neurons(tiny_lm, family):
    lm = tiny_lm(family)
    labels = [f"blocks.{layer}.mlp.post[{j}]" for layer in range(2) for j in range(48)]
    scores = torch.zeros(96)
    planted = {"blocks.1.mlp.post[40]": 5.0, "blocks.0.mlp.post[7]": 4.0, "blocks.1.mlp.post[2]": 3.0,
               "blocks.0.mlp.post[30]": 2.0}
    for label, score in planted.items():
        scores[labels.index(label)] = score
    result = LocateResult.over(labels, scores, method="planted")
    assert located_sites(result, 4) == ["blocks.1.mlp.post[2,40]", "blocks.0.mlp.post[7,30]"]
    steer = compose(lsi.Zero(s, model=lm) for s in located_sites(result, 4))
    down = lm.spec.mlp_down
    with _input_edit(lm, 0, down, _columns([7, 30], 0.0)), _input_edit(lm, 1, down, _columns([2, 40], 0.0)):
        expected = lm.forward(IDS)
    torch.testing.assert_close(_steered(lm, steer), expected, atol=1e-6, rtol=0)
    with _input_edit(lm, 0, down, _columns([7], 0.0)), _input_edit(lm, 1, down, _columns([2, 40], 0.0)):
        one_fewer = lm.forward(IDS)
    assert float((one_fewer - expected).abs().max()) > 1e-5  # every located neuron counts
    lowest = located_sites(LocateResult.over(labels, -scores, method="ablation"), 1, by="abs")
    assert lowest == ["blocks.1.mlp.post[40]"]


@pytest.mark.unit
def test_from_locate_reads_head_grids_and_refuses_other_labels(tiny_lm):
    lm = tiny_lm("llama")
    grid = LocateResult(torch.tensor([[0.0, 0.9, 0.0, 0.0], [0.8, 0.0, 0.0, 0.7]]),
                        (("layer", ("0", "1")), ("head", ("0", "1", "2", "3"))), method="induction_scores")
    assert located_sites(grid, 3, head_site="attn.z") == ["blocks.0.attn.z[1]", "blocks.1.attn.z[0,3]"]
    steer = lsi.Mean.of(lm, located_sites(grid, 3), REFERENCE)
    assert [str(leaf.site) for leaf in steer.leaves()] == ["blocks.0.attn.head_out[1]", "blocks.1.attn.head_out[0,3]"]
    assert [tuple(leaf.value.shape) for leaf in steer.leaves()] == [(32,), (2, 32)]
    with pytest.raises(InputError, match="name sites"):
        located_sites(LocateResult.over(["blocks.0", "blocks.1"], [1.0, 2.0], method="bi"), 1)
    with pytest.raises(InputError, match=r"k in \[1, 8\]"):
        located_sites(grid, 9)
    assert group_units(["blocks.0.mlp.post[3]", "blocks.*.mlp.post[1]", "blocks.0.mlp.post[3]"]) == \
        ["blocks.0.mlp.post[3]", "blocks.*.mlp.post[1]"]


@pytest.mark.integration
def test_zeroing_one_languages_neurons_hurts_that_language_only():
    lm = load_organism("two_languages")
    gt = ground_truth("two_languages")
    vocab, pad = lm.tokenizer.get_vocab(), lm.tokenizer.pad_token_id
    docs = {lang: [encode(vocab, d.split()) for d in gt["splits"]["test"][lang][:60]] for lang in ("A", "B")}
    base = {lang: mean_nll(lm.forward, seqs, pad) for lang, seqs in docs.items()}
    for lang, other in (("A", "B"), ("B", "A")):
        steer = compose(lsi.Zero(s, model=lm) for s in group_units(gt["neurons"][lang]))
        assert len(steer.leaves()) == lm.dims.n_layers  # one op per layer
        with steer.apply(lm):
            nll = {k: mean_nll(lm.forward, seqs, pad) for k, seqs in docs.items()}
        own, side = math.exp(nll[lang] - base[lang]), math.exp(nll[other] - base[other])
        assert own >= 3.0, (lang, own)
        assert side <= 1.1, (lang, side)
