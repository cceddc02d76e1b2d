"""Head-level steering (ITI): directions and spreads equal their brute-force formulas, head shifts equal a plain
torch hook on the output projection's input and fold into its bias (reloaded with plain transformers), and on the
binary_attribute organism the top-probed heads move the marked-word rate more than random heads do."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

from lsi.arch.dims import get_module
from lsi.core.steering import Steering
from lsi.errors import IndexOutOfRangeError, InputError, NonFiniteSteeringError, NotFoldableError, ShapeMismatchError
from lsi.organisms import binary_attribute as ba
from lsi.organisms._common import encode
from lsi.organisms.registry import ground_truth, load_organism
from lsi.steer.directional import DirectionalAblation
from lsi.steer.export import export_hf, fold
from lsi.steer.heads import HeadShift, head_features, iti_heads

IDS = torch.randint(3, 97, (3, 10), generator=torch.Generator().manual_seed(0))
GEN = torch.Generator().manual_seed(5)
# positives end in a token from 40..59, negatives in one from 60..79: what a head sees at the last token differs
POSITIVE = [[int(t) for t in torch.randint(3, 97, (4,), generator=GEN)] + [40 + i] for i in range(20)]
NEGATIVE = [[int(t) for t in torch.randint(3, 97, (3,), generator=GEN)] + [60 + i] for i in range(20)]


def _shift(lm, heads, seed: int = 1) -> HeadShift:
    shifts = torch.randn(len(heads), lm.dims.d_head, generator=torch.Generator().manual_seed(seed))
    return HeadShift(heads, shifts, 2.0, model=lm)


def _steered(lm, steering, ids=IDS) -> torch.Tensor:
    with steering.apply(lm):
        return lm.forward(ids)


@pytest.mark.unit
def test_iti_directions_equal_the_mass_mean_formula(tiny_lm):
    lm = tiny_lm("llama")
    found = iti_heads(lm, POSITIVE, NEGATIVE)
    z = {name: torch.stack([lm.run_with_cache([row], "blocks.*.attn.z").stack("blocks.*.attn.z")[:, 0, -1]
                            for row in rows]).double() for name, rows in (("pos", POSITIVE), ("neg", NEGATIVE))}
    theta = z["pos"].mean(0) - z["neg"].mean(0)  # [L, H, d_head]
    unit = theta / theta.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(found.directions, unit.float(), atol=1e-5, rtol=0)
    projected = (torch.cat([z["pos"], z["neg"]]) * unit).sum(-1)
    torch.testing.assert_close(found.sigma, projected.std(0, unbiased=False).float(), atol=1e-5, rtol=0)
    torch.testing.assert_close(found.separation, (theta.norm(dim=-1) / projected.std(0, unbiased=False)).float(),
                               atol=1e-4, rtol=0)
    assert found.accuracy.labels == [f"blocks.{layer}.attn.z[{h}]" for layer in range(2) for h in range(4)]
    accuracy, separation = found.accuracy.as_dict(), found.separation
    best = found.top_heads(8)
    keys = [(accuracy[f"blocks.{layer}.attn.z[{h}]"], float(separation[layer, h])) for layer, h in best]
    assert keys == sorted(keys, reverse=True)  # accuracy first, ties by separation
    shift = found.steering(k=2, alpha=3.0)
    with pytest.raises(InputError, match=r"k in \[1, 8\]"):
        found.steering(k=9, alpha=1.0)
    assert shift.heads == tuple(best[:2]) and shift.model == found.model
    torch.testing.assert_close(shift.shifts[0], found.sigma[best[0]] * found.directions[best[0]])
    pooled = head_features(lm, POSITIVE[:3], positions="mean")
    by_hand = lm.run_with_cache([POSITIVE[1]], "blocks.*.attn.z").stack("blocks.*.attn.z")[:, 0].mean(1)
    torch.testing.assert_close(pooled[1].float(), by_hand, atol=1e-6, rtol=0)


@pytest.mark.unit
@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox"])
def test_head_shift_equals_a_plain_hook_on_the_output_projection(tiny_lm, family):
    lm = tiny_lm(family)
    shift = _shift(lm, [(1, 2), (0, 0), (1, 3)])
    d_head = lm.dims.d_head
    handles = []
    for layer in range(2):
        def add(module, args, layer=layer):
            x = args[0].clone()
            for (lay, head), s in zip(shift.heads, shift.shifts, strict=True):
                if lay == layer:
                    x[..., head * d_head:(head + 1) * d_head] += 2.0 * s
            return (x, *args[1:])
        o_proj = get_module(lm.model, lm.spec.layer_path(layer, lm.spec.o_proj))
        handles.append(o_proj.register_forward_pre_hook(add))
    try:
        expected = lm.forward(IDS)
    finally:
        for h in handles:
            h.remove()
    assert float((expected - lm.forward(IDS)).abs().max()) > 1e-3
    torch.testing.assert_close(_steered(lm, shift), expected, atol=1e-5, rtol=0)


@pytest.mark.integration
@pytest.mark.parametrize(("family", "bias"), [
    ("gpt2", "transformer.h.1.attn.c_proj.bias"),  # Conv1D
    ("llama", "model.layers.1.self_attn.o_proj.bias"),  # added through config.attention_bias
    ("gpt_neox", "gpt_neox.layers.1.attention.dense.bias"),
    ("gemma2", "model.layers.1.self_attn.o_proj.bias"),  # a post-attention norm acts after the projection
])
def test_head_shift_folds_into_the_output_projection_bias(tiny_lm, tmp_path, family, bias):
    lm = tiny_lm(family)
    keys = set(lm.model.state_dict())
    shift = _shift(lm, [(1, 2), (0, 1), (1, 0)])
    hooked = _steered(lm, shift)
    folded = fold(lm, shift)
    assert float((hooked - lm.forward(IDS)).abs().max()) > 1e-3
    assert float((folded.forward(IDS) - hooked).abs().max()) < 1e-5
    w_o = lm.weights.W_O(1)  # [n_heads, d_head, d_model]
    expected = 2.0 * (shift.shifts[0] @ w_o[2] + shift.shifts[2] @ w_o[0])
    before = lm.model.state_dict().get(bias, torch.zeros(lm.dims.d_model))
    torch.testing.assert_close(folded.model.state_dict()[bias] - before, expected, atol=1e-5, rtol=0)
    assert set(lm.model.state_dict()) == keys  # the original model gained no bias
    out = export_hf(lm, shift, tmp_path / family)
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert float((plain(input_ids=IDS).logits - hooked).abs().max()) < 1e-5


@pytest.mark.integration
def test_head_shift_composes_with_ablation_when_folded(tiny_lm):
    lm = tiny_lm("gpt_neox")
    r = torch.randn(32, generator=torch.Generator().manual_seed(7))
    for steering in (DirectionalAblation(r) + _shift(lm, [(0, 1)]), _shift(lm, [(0, 1)]) + DirectionalAblation(r)):
        assert float((fold(lm, steering).forward(IDS) - _steered(lm, steering)).abs().max()) < 1e-5


@pytest.mark.unit
def test_head_shift_checks_and_round_trip(tiny_lm, tmp_path):
    lm = tiny_lm("llama")
    shift = HeadShift([(1, 2)], torch.ones(1, 8), 1.5, positions="last", scope="prompt", model=lm)
    loaded = Steering.load(shift.save(tmp_path / "shift"), lm)
    assert repr(loaded) == repr(shift)
    assert torch.equal(_steered(lm, loaded), _steered(lm, shift))
    with pytest.raises(NotFoldableError, match="every position"):
        fold(lm, shift)
    with pytest.raises(IndexOutOfRangeError, match=r"\(1, 4\)"):
        HeadShift([(1, 4)], torch.ones(1, 8)).apply(lm)
    with pytest.raises(ShapeMismatchError, match="d_head=8"):
        HeadShift([(1, 0)], torch.ones(1, 16)).apply(lm)
    with pytest.raises(ShapeMismatchError, match=r"\[2, d_head\]"):
        HeadShift([(1, 0), (0, 0)], torch.ones(8))
    with pytest.raises(InputError, match="distinct"):
        HeadShift([(1, 0), (1, 0)], torch.ones(2, 8))
    with pytest.raises(NonFiniteSteeringError):
        HeadShift([(1, 0)], torch.full((1, 8), float("nan")))
    with pytest.raises(NonFiniteSteeringError, match="lower alpha"):
        HeadShift([(1, 0)], torch.ones(1, 8), 1e39)


# -- binary_attribute organism ------------------------------------------------------------------------------------
def _marked_rate(lm, seqs: list[list[int]], marked: list[int], plain: list[int]) -> float:
    """Expected share of marked adjectives at the modifier slot that ends every sequence."""
    probs = lm.forward(seqs).softmax(-1)
    last = lm.to_batch(seqs).attention_mask.sum(1) - 1
    p = probs[torch.arange(len(seqs)), last]
    return float(p[:, marked].sum() / p[:, marked + plain].sum())


@pytest.mark.integration
def test_iti_heads_raise_the_marked_rate_more_than_random_heads():
    lm = load_organism("binary_attribute")
    gt = ground_truth("binary_attribute")
    task = ba.steer_tasks(lm, gt)[0]
    vocab = lm.tokenizer.get_vocab()
    marked, plain = ([vocab[w] for w in ba.ADJ[kind]] for kind in ("marked", "plain"))
    docs = [encode(vocab, d["text"].split()) for d in gt["splits"]["test"]["documents"] if d["attribute"] == 0]

    def rate(steering) -> float:
        with steering.apply(lm):
            return _marked_rate(lm, docs, marked, plain)

    found = iti_heads(lm, task.dev.positive, task.dev.negative)  # contrast and probes on dev, rates on test
    k, alpha = 3, 3.0
    iti = found.steering(k=k, alpha=alpha)
    base = _marked_rate(lm, docs, marked, plain)
    w_o = [lm.weights.W_O(layer) for layer in range(lm.dims.n_layers)]

    def write(head, s):  # what a z shift adds to the residual stream
        return s @ w_o[head[0]][head[1]]

    norms = [float(write(h, s).norm()) for h, s in zip(iti.heads, iti.shifts, strict=True)]
    others = [(layer, h) for layer in range(lm.dims.n_layers) for h in range(lm.dims.n_heads)
              if (layer, h) not in iti.heads]
    random_rates = []
    for heads in itertools.combinations(others, k):  # every other head choice, ITI's directions, equal write norms
        units = [found.directions[h] / write(h, found.directions[h]).norm() for h in heads]
        random_rates.append(rate(HeadShift(heads, torch.stack([n * u for n, u in zip(norms, units, strict=True)]),
                                           alpha)))
    steered, lowered = rate(iti), rate(found.steering(k=k, alpha=-alpha))
    assert steered > base + 0.1  # the intended direction ...
    assert lowered < base  # ... and back
    assert steered > sum(random_rates) / len(random_rates) + 0.05
