"""Direct logit attribution against the model's own logits, and top tokens against the unembedding of a vector."""

from contextlib import nullcontext

import pytest
import torch

from lsi.bench.registry import get_locate_methods
from lsi.errors import IndexOutOfRangeError, InputError, ShapeMismatchError, SiteUnavailableError
from lsi.evaluation.locate import LocateTask, Split
from lsi.locate.metrics import logit_diff
from lsi.locate.vocab import direct_logit_attribution, top_tokens

pytestmark = pytest.mark.unit
ROWS = [[5, 6, 7, 9, 11], [8, 9, 10], [12, 13, 14, 15]]  # right-padded into one batch


@pytest.fixture(scope="module")
def dla_method():
    return get_locate_methods(["dla"])[-1]


def _real_last_logits(lm, rows):
    logits = lm.forward(rows)
    return torch.stack([logits[i, len(r) - 1] for i, r in enumerate(rows)])


def _total(result) -> float:
    return float(result.scores.sum()) + result.settings["constant"]


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox", "qwen2"])
def test_components_sum_to_the_logit_difference(tiny_lm, family):
    # gpt2: LayerNorm and output-projection biases; llama: RMSNorm; gpt_neox: parallel attention; qwen2: qkv biases
    lm = tiny_lm(family)
    correct, incorrect = [20, 21, 22], [30, 31, 32]
    result = direct_logit_attribution(lm, ROWS, (correct, incorrect))
    last = _real_last_logits(lm, ROWS)
    rows = torch.arange(3)
    expected = float((last[rows, correct] - last[rows, incorrect]).mean())
    assert result.settings["logit"] == pytest.approx(expected, abs=1e-5)
    assert _total(result) == pytest.approx(expected, abs=1e-5)
    n_heads = lm.dims.n_layers * lm.dims.n_heads
    assert sum("head_out" in label for label in result.labels) == n_heads
    assert any(label.endswith("attn.bias") for label in result.labels) == (family in ("gpt2", "gpt_neox"))


def test_every_position_with_per_cell_targets_sums_to_the_mean_logit(tiny_lm):
    lm = tiny_lm("gpt2")
    batch = lm.to_batch(ROWS)
    targets = batch.input_ids.roll(-1, dims=1)  # the next token at every position
    result = direct_logit_attribution(lm, ROWS, targets, positions=None)
    logits = lm.forward(ROWS)
    mask = batch.attention_mask.bool()
    expected = logits.gather(-1, targets[..., None]).squeeze(-1)[mask].mean()
    assert _total(result) == pytest.approx(float(expected), abs=1e-5)


def test_directions_are_linear_and_vectors_match_tokens(tiny_lm):
    lm = tiny_lm("llama")
    a, b = direct_logit_attribution(lm, ROWS, 40), direct_logit_attribution(lm, ROWS, 50)
    pair = direct_logit_attribution(lm, ROWS, (40, 50))
    torch.testing.assert_close(pair.scores, a.scores - b.scores, atol=1e-6, rtol=0)
    vector = direct_logit_attribution(lm, ROWS, lm.weights.W_U[:, 40].clone())
    torch.testing.assert_close(vector.scores, a.scores, atol=1e-6, rtol=0)
    assert vector.metric == "direction" and a.metric == "logit[40]"


def test_layer_attention_equals_its_heads_plus_bias(tiny_lm):
    lm = tiny_lm("gpt2")
    heads = direct_logit_attribution(lm, ROWS, 40).as_dict()
    layers = direct_logit_attribution(lm, ROWS, 40, heads=False).as_dict()
    for layer in range(lm.dims.n_layers):
        parts = [v for k, v in heads.items() if k.startswith(f"blocks.{layer}.attn.")]
        assert layers[f"blocks.{layer}.attn.out"] == pytest.approx(sum(parts), abs=1e-6)
        assert layers[f"blocks.{layer}.mlp.out"] == pytest.approx(heads[f"blocks.{layer}.mlp.out"], abs=1e-7)


@pytest.mark.parametrize("family", ["gemma2", "olmo2"])
def test_post_attention_norm_families_refuse_heads_and_attribute_layers(tiny_lm, family):
    lm = tiny_lm(family)
    with pytest.raises(SiteUnavailableError, match="heads=False"):
        direct_logit_attribution(lm, ROWS, 40)
    result = direct_logit_attribution(lm, ROWS, 40, heads=False)
    cap = getattr(lm.model.config, "final_logit_softcapping", None)
    per_row = torch.tensor([_total(direct_logit_attribution(lm, [r], 40, heads=False)) for r in ROWS])
    expected = _real_last_logits(lm, ROWS)[:, 40]
    torch.testing.assert_close(torch.tanh(per_row / cap) * cap if cap else per_row, expected, atol=1e-5, rtol=0)
    assert _total(result) == pytest.approx(float(per_row.mean()), abs=1e-5)  # DLA explains the pre-cap logit


def test_bad_directions_are_refused(tiny_lm):
    lm = tiny_lm("llama")
    with pytest.raises(IndexOutOfRangeError):
        direct_logit_attribution(lm, ROWS, 97)
    with pytest.raises(ShapeMismatchError):
        direct_logit_attribution(lm, ROWS, torch.ones(5))
    with pytest.raises(ShapeMismatchError, match="broadcastable"):
        direct_logit_attribution(lm, ROWS, torch.ones(3, 5, lm.dims.d_model))  # per-cell vectors, one cell asked
    with pytest.raises(ShapeMismatchError):
        direct_logit_attribution(lm, ROWS, [1, 2])  # two ids for three inputs
    with pytest.raises(InputError, match="pair"):
        direct_logit_attribution(lm, ROWS, (1, 2, 3))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_top_tokens_rank_like_the_unembedded_vector(tiny_lm, family):
    lm = tiny_lm(family)
    vector = lm.weights.neuron_value(1, 7)
    # unembed(v) - unembed(0) = (weight ⊙ C v) @ W_U / scale(v): the same order, a positive multiple
    with torch.no_grad():
        reference = lm.unembed(vector) - lm.unembed(torch.zeros_like(vector))
    found = top_tokens(lm, "blocks.1.mlp.post[7]", k=6)
    assert [i for _, i, _ in found.top] == reference.topk(6).indices.tolist()
    assert [i for _, i, _ in found.bottom] == reference.topk(6, largest=False).indices.tolist()
    ratios = torch.tensor([s for _, _, s in found.top]) / reference.topk(6).values
    torch.testing.assert_close(ratios, ratios[:1].expand(6), rtol=1e-4, atol=0)
    assert float(ratios[0]) > 0


def test_top_tokens_refuse_what_is_not_a_vector(tiny_lm):
    lm = tiny_lm("llama")
    with pytest.raises(InputError, match="cached head output"):
        top_tokens(lm, "blocks.1.attn.head_out[2]")
    with pytest.raises(ShapeMismatchError):
        top_tokens(lm, torch.ones(2, lm.dims.d_model))
    with pytest.raises(InputError):
        top_tokens(lm, torch.ones(lm.dims.d_model), k=0)


def test_benchmark_dla_of_a_logit_difference_metric_equals_direct_dla(tiny_lm, dla_method):
    lm = tiny_lm("gpt2")
    batch = lm.to_batch(ROWS)
    metric = logit_diff(40, 50)
    split = Split(batch, lambda logits: metric(logits, batch), intervene=lambda u: nullcontext())
    heads = tuple(f"blocks.{layer}.attn.head_out[{h}]" for layer in range(2) for h in range(4))
    task = LocateTask("toy", "heads", heads, frozenset(heads[:1]), dev=split, test=split)
    assert dla_method.applies(task) is None
    scores = torch.tensor([dla_method.run(lm, task, 0)[u] for u in heads])
    direct = direct_logit_attribution(lm, ROWS, (40, 50)).as_dict()
    expected = torch.tensor([abs(direct[u]) for u in heads])
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=1e-4)
    layers = LocateTask("toy", "layers", ("blocks.0", "blocks.1"), frozenset({"blocks.0"}), dev=split, test=split)
    assert "residual-stream writers" in str(dla_method.applies(layers))


@pytest.mark.integration
def test_induction_heads_copy_through_their_ov_circuit_and_lead_dla(dla_method):
    from lsi.organisms.induction import locate_tasks
    from lsi.organisms.registry import ground_truth, load_organism

    lm, truth = load_organism("induction"), ground_truth("induction")
    first, n = truth["data"]["first_content_id"], truth["data"]["n_content"]
    w = lm.weights

    def copy_rate(layer: int, head: int) -> float:  # how often a token's OV image promotes the token itself
        return sum(top_tokens(lm, w.W_E[t] @ w.OV(layer, head), k=1).top[0][1] == t
                   for t in range(first, first + n)) / n

    rates = {f"blocks.{layer}.attn.head_out[{h}]": copy_rate(layer, h) for layer in range(2)
             for h in range(lm.dims.n_heads)}
    induction = set(truth["induction_heads"])
    assert set(sorted(rates, key=rates.__getitem__)[-2:]) == induction
    assert min(rates[h] for h in induction) > 0.5 > max(v for h, v in rates.items() if h not in induction)
    task = locate_tasks(lm, truth)[0]
    scores = dla_method.run(lm, task, 0)
    assert set(sorted(scores, key=scores.__getitem__)[-2:]) == induction
