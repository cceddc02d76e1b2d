"""Refusal-direction selection: the refusal score against a per-prompt softmax, the protocol's table against its
filters and a by-hand recomputation on a tiny model (template tokens at the embedding give zero directions), typed
errors, and the refusal_gate organism (the chosen direction's ablation removes refusal and keeps the task; weight
orthogonalization gives the hooks' logits)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import lsi
from lsi.core.interventions import Add
from lsi.errors import InputError
from lsi.organisms import refusal_gate as rg
from lsi.organisms.registry import ground_truth, load_organism
from lsi.steer.directional import DirectionalAblation, orthogonalize
from lsi.steer.directions import diff_in_means
from lsi.steer.refusal import refusal_score, select_refusal_direction
from lsi.testing import tiny_model

REFUSAL = [3, 4]
TEMPLATE = [50, 51]  # the "post-instruction" tokens every prompt ends with
HARMFUL = [[5, 6, 7, *TEMPLATE], [5, 8, *TEMPLATE], [9, 5, 7, 10, *TEMPLATE], [5, 11, *TEMPLATE],
           [12, 5, 13, *TEMPLATE]]
HARMLESS = [[20, 6, 7, *TEMPLATE], [21, 8, 12, *TEMPLATE], [22, 9, *TEMPLATE], [23, 13, 14, *TEMPLATE],
            [24, 15, *TEMPLATE]]


def _score_by_hand(lm, prompt) -> float:
    """log p(R) - log(1 - p(R)) from the softmax of one unpadded prompt's last logits."""
    probs = lm.forward([prompt])[0, -1].double().softmax(-1)
    p = float(probs[REFUSAL].sum())
    return math.log(p) - math.log(1 - p)


@pytest.mark.unit
def test_refusal_score_matches_a_per_prompt_softmax_with_padding(tiny_lm):
    lm = tiny_lm("llama")
    got = refusal_score(lm, HARMFUL, REFUSAL, batch_size=3)  # padded batches of different widths
    want = torch.tensor([_score_by_hand(lm, p) for p in HARMFUL], dtype=torch.float64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    left = lm.to_batch(HARMFUL, padding_side="left")
    torch.testing.assert_close(refusal_score(lm, left, REFUSAL), want, atol=1e-5, rtol=0)
    for bad in ([], [97], [-1]):
        with pytest.raises(InputError, match="refusal token ids"):
            refusal_score(lm, HARMFUL, bad)


@pytest.fixture(scope="module")
def tiny_result():
    """A 4-layer random model whose refusal tokens' unembedding rows are moved along a random direction, so that
    p(R) is near 1/2 and every filter both keeps and discards some candidate."""
    lm = lsi.LanguageModel(tiny_model("llama", num_hidden_layers=4))
    d = torch.randn(32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lm.model.lm_head.weight[REFUSAL] += 5 * d / d.norm()
    return lm, select_refusal_direction(lm, HARMFUL, HARMLESS, refusal_tokens=REFUSAL, positions=len(TEMPLATE),
                                        max_layer_fraction=0.7, kl_max=0.07)


@pytest.mark.unit
def test_every_candidate_is_scored_and_filtered_as_the_protocol_says(tiny_result):
    lm, result = tiny_result
    cands = result.candidates
    assert [(c.layer, c.position) for c in cands] == [(layer, p) for layer in range(4) for p in ("-2", "-1")]
    for c in cands:
        assert torch.equal(c.direction, diff_in_means(lm, HARMFUL, HARMLESS, c.site, positions=int(c.position)))
        if c.layer == 0:  # the input of layer 0 is the template token's embedding in every prompt: no direction
            assert c.filters[0] == "zero" and c.bypass is None and float(c.direction.norm()) == 0.0
            continue
        want = {"layer"} if c.layer >= 0.7 * 4 else set()
        want |= {"kl"} if c.kl > 0.07 else set()
        want |= {"induce"} if c.induce < 0 else set()
        assert set(c.filters) == want, c.as_dict()
    assert {f for c in cands for f in c.filters} == {"zero", "layer", "kl", "induce"}
    kept = [c for c in cands if c.kept]
    assert kept and len(kept) < len(cands)
    assert result.chosen is min(kept, key=lambda c: c.bypass)
    assert result.pick() is result.chosen and result.direction is result.chosen.direction
    assert sum(row["chosen"] for row in result.rows()) == 1 and "*" in result.table()


@pytest.mark.unit
def test_a_candidates_scores_equal_a_by_hand_recomputation(tiny_result):
    lm, result = tiny_result
    c = result.chosen
    layer, position = c.layer, int(c.position)
    site = f"blocks.{layer}.resid_pre"
    mean = lambda rows: torch.stack([lm.run_with_cache([r], sites=[site])[site][0, position] for r in rows]).mean(0)  # noqa: E731
    torch.testing.assert_close(c.direction, mean(HARMFUL) - mean(HARMLESS), atol=1e-6, rtol=0)
    base = [lm.forward([p])[0, -1].double().log_softmax(-1) for p in HARMLESS]
    with DirectionalAblation(c.direction).apply(lm):
        bypass = sum(_score_by_hand(lm, p) for p in HARMFUL) / len(HARMFUL)
        ablated = [lm.forward([p])[0, -1].double().log_softmax(-1) for p in HARMLESS]
    with Add(site, c.direction).apply(lm):
        induce = sum(_score_by_hand(lm, p) for p in HARMLESS) / len(HARMLESS)
    kl = sum(float((b.exp() * (b - a)).sum()) for b, a in zip(base, ablated, strict=True)) / len(HARMLESS)
    assert c.bypass == pytest.approx(bypass, abs=1e-5) and c.induce == pytest.approx(induce, abs=1e-5)
    assert c.kl == pytest.approx(kl, abs=1e-6)
    addition = result.addition(2.0)
    assert (str(addition.site), addition.alpha, addition.model) == (site, 2.0, result.model)
    assert result.ablation(model=lm).model == result.model


@pytest.mark.unit
def test_no_candidate_left_and_bad_settings_are_typed_errors(tiny_result):
    lm, _ = tiny_result
    result = select_refusal_direction(lm, HARMFUL, HARMLESS, refusal_tokens=REFUSAL, positions=[-1], layers=[1, 3],
                                      max_layer_fraction=0.5)  # layers 2 and 3 are too late: layer 1 alone is left
    assert [c.layer for c in result.candidates] == [1, 3] and "layer" in result.candidates[1].filters
    strict = select_refusal_direction(lm, HARMFUL, HARMLESS, refusal_tokens=REFUSAL, positions=[-1], layers=[1, 3],
                                      max_layer_fraction=0.5, kl_max=0.0)
    assert strict.chosen is None and "none kept" in repr(strict)
    with pytest.raises(InputError, match="all 2 candidates discarded") as err:
        strict.ablation()
    assert "'kl': 2" in err.value.found and "'layer': 1" in err.value.found
    with pytest.raises(InputError, match="post-instruction tokens >= 1"):
        select_refusal_direction(lm, HARMFUL, HARMLESS, refusal_tokens=REFUSAL, positions=0)
    with pytest.raises(InputError, match=r"layers in \[0, 4\)"):
        select_refusal_direction(lm, HARMFUL, HARMLESS, refusal_tokens=REFUSAL, layers=[4])


@pytest.mark.unit
def test_the_induce_score_adds_induce_alpha_times_r(tiny_result):
    lm, _ = tiny_result
    zero = select_refusal_direction(lm, HARMFUL, HARMLESS, refusal_tokens=REFUSAL, positions=[-1], layers=[1],
                                    kl_max=10.0, induce_alpha=0.0)  # adding 0 · r changes nothing
    assert zero.candidates[0].induce == pytest.approx(zero.baseline["harmless"], abs=1e-9)
    assert zero.settings["induce_alpha"] == 0.0
    twice = select_refusal_direction(lm, HARMFUL, HARMLESS, refusal_tokens=REFUSAL, positions=[-1], layers=[1],
                                     kl_max=10.0, induce_alpha=2.0)
    c = twice.candidates[0]
    with lsi.Add(c.site, 2.0 * c.direction).apply(lm):
        by_hand = sum(_score_by_hand(lm, p) for p in HARMLESS) / len(HARMLESS)
    assert c.induce == pytest.approx(by_hand, abs=1e-5)
    with pytest.raises(InputError, match="induce_alpha"):
        select_refusal_direction(lm, HARMFUL, HARMLESS, refusal_tokens=REFUSAL, positions=[-1], layers=[1],
                                 kl_max=0.0).pick()


# -- the refusal_gate organism --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gate():
    lm = load_organism("refusal_gate")
    splits = ground_truth("refusal_gate")["splits"]
    dev = splits["dev"]
    sorry = lm.tokenizer.get_vocab()[rg.REFUSAL[0]]
    result = select_refusal_direction(lm, dev["harmful"], dev["harmless"], refusal_tokens=[sorry],
                                      positions=len(rg.POST_INSTRUCTION))
    return lm, splits, result


@pytest.mark.integration
def test_refusal_tokens_may_be_strings_of_one_token(gate):
    lm, splits, _ = gate
    prompts = splits["dev"]["harmful"][:8]
    sorry = lm.tokenizer.get_vocab()[rg.REFUSAL[0]]
    assert torch.equal(refusal_score(lm, prompts, ["sorry"]), refusal_score(lm, prompts, [sorry]))
    with pytest.raises(InputError, match="one token each"):
        refusal_score(lm, prompts, ["sorry i"])


@pytest.mark.slow
@pytest.mark.integration
def test_refusal_gate_chosen_direction_removes_refusal_and_keeps_the_task(gate):
    lm, splits, result = gate
    assert result.chosen is not None and result.chosen.induce > 0 and result.chosen.kl <= 0.1
    assert result.baseline["harmful"] > 0 > result.baseline["harmless"]
    test = splits["test"]
    base = rg._rates(lm, test, [])
    with result.ablation(model=lm).apply(lm):
        ablated = rg._rates(lm, test, [])
    assert base["harmful_refusal"] >= 0.95
    assert ablated["harmful_refusal"] <= 0.05, ablated
    assert ablated["harmless_accuracy"] >= 0.98 * base["harmless_accuracy"], ablated


@pytest.mark.slow
@pytest.mark.integration
def test_refusal_gate_orthogonalized_weights_give_the_hooks_logits(gate):
    # float64: in float32 this trained model's logits (up to ~20) differ between the two routes by float rounding
    lm, splits, result = gate
    texts = splits["test"]["harmful"][:50] + splits["test"]["harmless"][:50]
    wide = lsi.LanguageModel(copy.deepcopy(lm.model).double(), lm.tokenizer, spec=lm.spec)
    batch = wide.to_batch(texts)
    real = batch.attention_mask.bool()
    with result.ablation().apply(wide):
        hooked = wide.forward(batch)
    assert float((hooked - wide.forward(batch))[real].abs().max()) > 1.0  # the ablation matters ...
    assert float((orthogonalize(wide, result.direction).forward(batch) - hooked)[real].abs().max()) < 1e-5  # ... same
