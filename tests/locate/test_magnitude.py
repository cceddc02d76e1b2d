"""Weight statistics, activation statistics and LAPE, each against a hand computation; LAPE on two_languages."""

from __future__ import annotations

import math

import pytest
import torch

from lsi.errors import InputError, SiteUnavailableError
from lsi.locate.magnitude import (
    activation_contrast,
    activation_probability,
    activation_stats,
    lape_neurons,
    lape_scores,
    vector_stat,
    weight_norms,
)
from lsi.locate.result import LocateResult

pytestmark = pytest.mark.unit

ROWS = [[5, 17, 42, 8, 63], [9, 33], [70, 12, 44, 21]]  # different lengths: padded batches


# -- static weights -----------------------------------------------------------------------------------------------
def test_vector_stat_against_hand_values() -> None:
    x = torch.tensor([[0.0, 0.0, 0.0, 0.0, 10.0], [3.0, -4.0, 0.0, 0.0, 0.0]])
    assert vector_stat(x, "l2").tolist() == pytest.approx([10.0, 5.0])
    assert vector_stat(x, "linf").tolist() == pytest.approx([10.0, 4.0])
    # row 0: centred (-2, -2, -2, -2, 8): E[c²] = 16, E[c⁴] = 832
    assert float(vector_stat(x, "kurtosis")[0]) == pytest.approx(832 / 16**2)
    # row 0: std 4, only the 8 is beyond 1 or 1.5 std; row 1: centred (3.2, -3.8, .2, .2, .2), std 2.23
    assert vector_stat(x, "outliers", k=1.0).tolist() == [1.0, 2.0]
    assert vector_stat(x, "outliers", k=1.5).tolist() == [1.0, 1.0]


def test_neuron_norms_match_each_neurons_weights(tiny_lm) -> None:
    lm = tiny_lm("llama")
    for of, vector in (("value", lm.weights.neuron_value), ("key", lm.weights.neuron_key)):
        r = weight_norms(lm, "neurons", of=of, norm="linf")
        assert r.labels[lm.dims.d_mlp + 7] == "blocks.1.mlp.post[7]"
        expected = [float(vector(layer, j).abs().max()) for layer in range(2) for j in range(lm.dims.d_mlp)]
        assert r.scores.tolist() == pytest.approx(expected)
    gate = weight_norms(lm, "neurons", of="gate")  # llama's gate_proj rows
    hf_gate = lm.model.model.layers[0].mlp.gate_proj.weight
    assert gate.scores[: lm.dims.d_mlp].tolist() == pytest.approx(hf_gate.norm(dim=1).tolist(), rel=1e-5)


def test_head_norms_handle_grouped_query_attention(tiny_lm) -> None:
    lm = tiny_lm("llama")  # 4 query heads share 2 key/value heads
    w = lm.weights
    ov = weight_norms(lm, "heads", of="OV")
    assert ov.axes[1] == ("head", ("0", "1", "2", "3"))
    for layer in range(2):
        for h in range(4):
            hand = w.W_V(layer)[h // 2] @ w.W_O(layer)[h]  # kv head of query head h under GQA
            assert float(ov.scores[layer, h]) == pytest.approx(float(hand.norm()), rel=1e-5)
    k = weight_norms(lm, "heads", of="K")
    assert k.axes[1] == ("kv_head", ("0", "1")) and k.shape == (2, 2)
    k_proj = lm.model.model.layers[1].self_attn.k_proj.weight.view(2, lm.dims.d_head, lm.dims.d_model)
    assert k.scores[1].tolist() == pytest.approx(k_proj.flatten(1).norm(dim=1).tolist(), rel=1e-5)
    kurt = weight_norms(lm, "heads", of="Q", norm="kurtosis")
    assert float(kurt.scores[0, 3]) == pytest.approx(float(vector_stat(w.W_Q(0)[3].reshape(1, -1), "kurtosis")))


def test_row_norms(tiny_lm) -> None:
    lm = tiny_lm("gpt2")
    emb = weight_norms(lm, "rows", of="W_E")
    assert emb.axes[0][0] == "row" and emb.shape == (lm.dims.vocab,)
    assert emb.scores.tolist() == pytest.approx(lm.model.transformer.wte.weight.norm(dim=1).tolist(), rel=1e-5)
    out = weight_norms(lm, "rows", of="W_out", norm="outliers", k=2.0)
    assert out.shape == (2, lm.dims.d_model) and out.settings["k"] == 2.0
    hand = vector_stat(lm.weights.W_out(1), "outliers", k=2.0)
    assert out.scores[1].tolist() == hand.tolist()


def test_weight_norms_bad_input(tiny_lm) -> None:
    lm = tiny_lm("gpt2")
    with pytest.raises(SiteUnavailableError, match="gate"):
        weight_norms(lm, "neurons", of="gate")  # GPT-2 MLPs have no gate
    with pytest.raises(InputError, match="what="):
        weight_norms(lm, "layers")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="of= one of"):
        weight_norms(lm, "heads", of="value")
    with pytest.raises(InputError, match="norm one of"):
        weight_norms(lm, "heads", norm="l1")  # type: ignore[arg-type]


# -- activation statistics ----------------------------------------------------------------------------------------
def _hand_stats(lm, rows, site: str, fn, last_only: bool = False) -> torch.Tensor:
    """Run every row alone (no padding) and average ``fn`` over its tokens, one token at a time."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for row in rows:
        value = lm.run_with_cache([row], site)[site][0]
        for t in ([len(row) - 1] if last_only else range(len(row))):
            total = total + fn(value[t].double())
            count += 1
    return total / count


@pytest.mark.parametrize("stat, fn", [("mean_abs", torch.abs), ("mean", lambda v: v),
                                      ("frequency", lambda v: (v > 0).double())])
def test_activation_stats_match_token_loop_for_any_padding_and_batch_size(tiny_lm, stat, fn) -> None:
    lm = tiny_lm("llama")
    hand = _hand_stats(lm, ROWS, "blocks.1.mlp.post", fn)
    for side, batch_size in (("right", 2), ("left", 3), ("left", 1)):
        data = lm.to_batch(ROWS, padding_side=side)
        r = activation_stats(lm, data, "blocks.1.mlp.post", stat=stat, batch_size=batch_size)
        assert r.labels[3] == "blocks.1.mlp.post[3]" and r.settings["n_tokens"] == 11
        torch.testing.assert_close(r.scores.double(), hand, atol=1e-6, rtol=1e-5)


def test_activation_stats_of_residual_sites_and_chosen_positions(tiny_lm) -> None:
    lm = tiny_lm("gpt2")
    r = activation_stats(lm, ROWS, "blocks.*.resid_post", stat="mean", positions="last")
    assert r.axes[0] == ("site", ("blocks.0.resid_post", "blocks.1.resid_post")) and r.shape == (2, lm.dims.d_model)
    assert r.labels[lm.dims.d_model + 4] == "blocks.1.resid_post@4"
    hand = _hand_stats(lm, ROWS, "blocks.1.resid_post", lambda v: v, last_only=True)
    torch.testing.assert_close(r.scores[1].double(), hand, atol=1e-6, rtol=1e-5)
    picked = activation_stats(lm, ROWS, "blocks.0.mlp.post[3,7]", stat="mean_abs")
    full = activation_stats(lm, ROWS, "blocks.0.mlp.post", stat="mean_abs")
    assert picked.labels == ["blocks.0.mlp.post[3]", "blocks.0.mlp.post[7]"]
    assert picked.scores.tolist() == pytest.approx(full.scores[[3, 7]].tolist())


def test_activation_contrast_is_the_difference_of_stats(tiny_lm) -> None:
    lm = tiny_lm("gpt_neox")
    other = [[11, 12, 13], [14, 15, 16, 17, 18, 19]]
    c = activation_contrast(lm, ROWS, other, "blocks.*.mlp.post", stat="frequency")
    a, b = (activation_stats(lm, x, "blocks.*.mlp.post", stat="frequency") for x in (ROWS, other))
    torch.testing.assert_close(c.scores, a.scores - b.scores)
    assert c.settings["n_tokens_a"] == 11 and c.settings["n_tokens_b"] == 9 and c.method == "activation_contrast"


def test_activation_stats_bad_input(tiny_lm) -> None:
    lm = tiny_lm("gpt2")
    with pytest.raises(InputError, match="at least one input"):
        activation_stats(lm, [], "blocks.0.mlp.post")
    with pytest.raises(InputError, match="one value per token and unit"):
        activation_stats(lm, ROWS, "blocks.0.attn.z")
    with pytest.raises(InputError, match="one width"):
        activation_stats(lm, ROWS, ["blocks.0.mlp.post", "blocks.0.resid_post"])
    with pytest.raises(InputError, match="stat one of"):
        activation_stats(lm, ROWS, "blocks.0.mlp.post", stat="max")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="batch_size"):
        activation_stats(lm, ROWS, "blocks.0.mlp.post", batch_size=0)


# -- LAPE ---------------------------------------------------------------------------------------------------------
NEURONS = tuple(f"blocks.0.mlp.post[{j}]" for j in range(6))
P = torch.tensor([[0.9, 0.0],    # n0: only A, entropy 0
                  [0.0, 0.8],    # n1: only B, entropy 0
                  [0.5, 0.5],    # n2: both alike, entropy log 2
                  [0.6, 0.2],    # n3: q = (3/4, 1/4)
                  [0.1, 0.05],   # n4: rarely active (max p not above the filter quantile)
                  [0.0, 0.0]])   # n5: dead
H3 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))


@pytest.fixture
def probs() -> LocateResult:
    return LocateResult(P, (("neuron", NEURONS), ("language", ("A", "B"))), method="activation_probability")


def test_lape_scores_on_a_hand_computed_example(probs) -> None:
    # sorted p: 0 0 0 0 .05 .1 .2 .5 .5 .6 .8 .9; filter_rate 0.5 -> 6th smallest = 0.1: n4 and n5 are dropped
    floor = -math.log(2) - 1
    r = lape_scores(probs, filter_rate=0.5)
    assert r.scores.tolist() == pytest.approx([0.0, 0.0, -math.log(2), -H3, floor, floor])
    # for language A with activation_bar 0.75 (9th smallest = 0.5): only n0 (0.9) and n3 (0.6) keep a score
    a = lape_scores(probs, filter_rate=0.5, language="A", activation_bar=0.75)
    assert a.scores.tolist() == pytest.approx([0.0, floor, floor, -H3, floor, floor])
    assert a.settings == {"filter_rate": 0.5, "language": "A", "activation_bar": 0.75}


def test_lape_neurons_on_a_hand_computed_example(probs) -> None:
    # top_rate 0.5 of 6 neurons -> the 3 lowest-entropy kept neurons: n0, n1 (0), n3 (H3)
    chosen = lape_neurons(probs, filter_rate=0.5, top_rate=0.5, activation_bar=0.75)  # bar 0.5
    assert chosen == {"A": [NEURONS[0], NEURONS[3]], "B": [NEURONS[1]]}
    # a lower bar (6th smallest = 0.1) gives n3 to both languages: a neuron may belong to several
    both = lape_neurons(probs, filter_rate=0.5, top_rate=0.5, activation_bar=0.5)
    assert both == {"A": [NEURONS[0], NEURONS[3]], "B": [NEURONS[1], NEURONS[3]]}
    # the filter outranks entropy: the dead n5 (entropy 0) is never selected
    everything = lape_neurons(probs, filter_rate=0.5, top_rate=1.0)
    assert NEURONS[5] not in {n for chosen in everything.values() for n in chosen}


def test_activation_probability_is_the_frequency_per_language(tiny_lm) -> None:
    lm = tiny_lm("llama")
    other = [[11, 12, 13], [14, 15, 16, 17]]
    p = activation_probability(lm, {"x": ROWS, "y": other})
    assert p.axes[1] == ("language", ("x", "y")) and p.labels[:2] == ["blocks.0.mlp.post[0]@x",
                                                                       "blocks.0.mlp.post[0]@y"]
    for k, data in enumerate((ROWS, other)):
        freq = activation_stats(lm, data, "blocks.*.mlp.post", stat="frequency")
        torch.testing.assert_close(p.scores[:, k], freq.scores)
    chosen = lape_neurons(p, top_rate=0.1)
    assert any(chosen.values())
    for language, neurons in chosen.items():  # LAPE's selection heads the language's lape_scores ranking
        assert neurons == [label for label, _ in lape_scores(p, language=language).top(len(neurons))]


def test_lape_bad_input(tiny_lm, probs) -> None:
    lm = tiny_lm("gpt2")
    with pytest.raises(InputError, match="at least two languages"):
        activation_probability(lm, {"only": ROWS})
    with pytest.raises(InputError, match="neuron sites"):
        activation_probability(lm, {"a": ROWS, "b": ROWS}, sites="blocks.*.resid_post")
    flat = LocateResult.over(NEURONS, P[:, 0], method="x")
    with pytest.raises(InputError, match="neuron × language grid"):
        lape_scores(flat)
    with pytest.raises(InputError, match="a language from"):
        lape_scores(probs, language="C")
    with pytest.raises(InputError, match="top_rate in"):
        lape_neurons(probs, top_rate=0.0)
    with pytest.raises(InputError, match="filter_rate in"):
        lape_scores(probs, filter_rate=1.5)


def test_lape_finds_the_reserved_neurons_of_two_languages() -> None:
    from lsi.bench.registry import get_locate_methods
    from lsi.evaluation.ranking import r_precision
    from lsi.organisms.registry import get_organism, ground_truth, load_organism

    lm, truth = load_organism("two_languages"), ground_truth("two_languages")
    (lape,) = get_locate_methods(["lape"])[2:]
    tasks = get_organism("two_languages").locate_tasks(lm, truth)
    for task in tasks:  # the benchmark method: −LAPE of the neurons LAPE assigns to the target language
        assert r_precision(lape.run(lm, task, 0), set(task.planted)) >= 0.7  # the GROUND_TRUTH.md threshold
    data = tasks[0].dev.datasets  # language A's task: target = A, other = B
    assert data is not None
    chosen = lape_neurons(activation_probability(lm, {"A": data["target"], "B": data["other"]}), top_rate=0.05)
    for lang in "AB":  # 5% of 512 neurons = 26 selected; 12 reserved per language
        assert set(truth["neurons"][lang]) <= set(chosen[lang])
        assert len(set(chosen[lang]) & set(truth["neurons"][lang])) / len(chosen[lang]) >= 0.7
