"""Persona vectors against brute-force references: response-token means read one exchange at a time, projections
and correlations by hand (numpy), the projection shift against a hand-written greedy loop, the fine-tuning loss
against per-exchange log-likelihoods, and screening leaving the model's weights bit-identical."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lsi.errors import InputError
from lsi.evaluation.ranking import auroc
from lsi.steer.finetune import masked_finetune
from lsi.steer.persona import (
    monitor_trait,
    own_responses,
    persona_vectors,
    projection_shift,
    projections,
    response_loss,
    response_projections,
    screen_datasets,
)

EXPRESSING = [([1, 5, 6], [10, 11, 12]), ([1, 7], [13, 14]), ([1, 5, 6], [15]), ([1, 8, 9, 20], [16, 17, 18, 19])]
NEUTRAL = [([1, 5, 6], [30, 31]), ([1, 7], [32, 33, 34, 35]), ([1, 40, 41, 42, 43], [36])]
SITES = ["blocks.0.resid_post", "blocks.1.resid_post"]


def _response_mean(lm, prompt, response, site):
    """One exchange run alone (no padding): the mean of ``site`` over its response positions."""
    value = lm.run_with_cache([prompt + response], sites=[site])[site][0].double()
    return value[len(prompt):].mean(0)


def _reference_vector(lm, expressing, neutral, site):
    def mean(exchanges):
        return torch.stack([_response_mean(lm, p, r, site) for p, r in exchanges]).mean(0)

    return mean(expressing) - mean(neutral)


def _unit(v):
    return v.double() / v.double().norm()


@pytest.mark.unit
@pytest.mark.parametrize("batch_size", [1, 2, 64])
def test_persona_vectors_match_per_exchange_response_means(tiny_lm, batch_size):
    lm = tiny_lm("llama")
    got = persona_vectors(lm, EXPRESSING, NEUTRAL, "blocks.*.resid_post", batch_size=batch_size)
    assert list(got) == SITES
    for site in SITES:
        torch.testing.assert_close(got[site].double(), _reference_vector(lm, EXPRESSING, NEUTRAL, site),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.unit
def test_persona_vectors_read_text_exchanges_as_prompt_then_response(fresh_lm, char_tokenizer):
    lm = fresh_lm("llama", tokenizer=char_tokenizer)
    texts = [("ab", "cde"), ("xyz", "q")], [("ab", "fg"), ("w", "hij")]
    ids = [[([3 + ord(c) % 90 for c in p], [3 + ord(c) % 90 for c in r]) for p, r in part] for part in texts]
    from_text = persona_vectors(lm, *texts, SITES[1])[SITES[1]]
    torch.testing.assert_close(from_text, persona_vectors(lm, *ids, SITES[1])[SITES[1]])


@pytest.mark.unit
def test_projections_are_the_last_token_state_on_the_unit_vector(tiny_lm):
    lm = tiny_lm("llama")
    v = torch.randn(32, generator=torch.Generator().manual_seed(1))
    rows = [[1, 5, 6, 7], [1, 8], [1, 9, 10]]
    got = projections(lm, rows, SITES[0], v)
    want = [float(lm.run_with_cache([r], sites=[SITES[0]])[SITES[0]][0, -1].double() @ _unit(v)) for r in rows]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.unit
def test_response_projections_are_response_means_on_the_unit_vector(tiny_lm):
    lm = tiny_lm("llama")
    v = torch.randn(32, generator=torch.Generator().manual_seed(4))
    got = response_projections(lm, EXPRESSING, SITES[1], v, batch_size=2)
    want = [float(_response_mean(lm, p, r, SITES[1]) @ _unit(v)) for p, r in EXPRESSING]
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.unit
def test_monitor_scores_the_projection_against_labels_as_numpy_does(tiny_lm):
    lm = tiny_lm("llama")
    v = torch.randn(32, generator=torch.Generator().manual_seed(2))
    prompts = [[1, 5 + i, 6 + 2 * i] for i in range(10)]
    x = projections(lm, prompts, SITES[1], v).double().numpy()
    labels = [1, 0, 1, 1, 0, 0, 1, 0, 1, 0]
    m = monitor_trait(lm, prompts, labels, SITES[1], v)
    y = np.asarray(labels, dtype=float)
    assert m.auroc == pytest.approx(auroc(x[y == 1], x[y == 0]))
    assert m.pearson == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-5)
    scores = np.linspace(0.0, 1.0, 10)[::-1] ** 2
    continuous = monitor_trait(lm, prompts, scores.tolist(), SITES[1], v)
    ranks = lambda a: np.argsort(np.argsort(a)).astype(float)  # noqa: E731  (no ties here)
    assert continuous.auroc is None
    assert continuous.spearman == pytest.approx(np.corrcoef(ranks(x), ranks(scores))[0, 1])
    assert continuous.pearson == pytest.approx(np.corrcoef(x, scores)[0, 1], rel=1e-5)
    assert continuous.to_json()["n"] == 10


def _greedy(lm, prompt, new_tokens, eos):
    ids = list(prompt)
    for _ in range(new_tokens):
        token = int(lm.forward([ids])[0, -1].argmax())
        ids.append(token)
        if token == eos:
            break
    return ids[len(prompt):]


@pytest.mark.unit
def test_projection_shift_is_data_minus_own_greedy_responses(tiny_lm):
    lm = tiny_lm("llama")
    v = torch.randn(32, generator=torch.Generator().manual_seed(3))
    dataset = [([1, 5, 6], [10, 11, 12]), ([4, 7], [13, 14]), ([4, 9, 9], [15])]
    eos = lm.model.generation_config.eos_token_id
    own = [(p, _greedy(lm, p, 3, eos)) for p, _ in dataset]
    assert [r for _, r in own_responses(lm, [p for p, _ in dataset], max_new_tokens=3)] == [r for _, r in own]

    def mean_projection(exchanges):
        return np.mean([float(_response_mean(lm, p, r, SITES[1]) @ _unit(v)) for p, r in exchanges])

    got = projection_shift(lm, dataset, SITES[1], v)
    assert got == pytest.approx(mean_projection(dataset) - mean_projection(own), rel=1e-5, abs=1e-6)


@pytest.mark.unit
def test_response_loss_is_the_token_mean_nll_of_the_responses(tiny_lm):
    lm = tiny_lm("llama")
    nll = []
    for p, r in EXPRESSING:
        logprobs = lm.forward([p + r])[0].double().log_softmax(-1)
        nll += [-float(logprobs[len(p) - 1 + i, t]) for i, t in enumerate(r)]
    with torch.no_grad():
        got = float(response_loss(lm, EXPRESSING)(lm))
    assert got == pytest.approx(np.mean(nll), rel=1e-5)


@pytest.mark.unit
def test_screening_measures_each_finetune_and_leaves_the_weights_untouched(fresh_lm):
    lm = fresh_lm("llama")
    before = {n: p.detach().clone() for n, p in lm.model.state_dict().items()}
    v = persona_vectors(lm, EXPRESSING, NEUTRAL, SITES[1])[SITES[1]]

    def measure(model):  # log-probability of the first expressing response token after its prompt
        return float(model.forward([[1, 5, 6]])[0, -1].log_softmax(-1)[10])

    candidates = {"expressing": EXPRESSING, "neutral": NEUTRAL, "mixed": EXPRESSING[:2] + NEUTRAL[:1]}
    screening = screen_datasets(lm, candidates, SITES[1], v, measure=measure, steps=5, lr=1e-2)
    after = lm.model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert screening.trait_before == measure(lm)
    for item in screening.sets:
        edit = masked_finetune(lm, response_loss(lm, candidates[item.name]), None, steps=5, lr=1e-2).edit
        with lm.intervene(edit):
            assert item.trait_after == pytest.approx(measure(lm), abs=1e-6)
        assert item.trait_shift == pytest.approx(item.trait_after - screening.trait_before)
        assert item.projection_shift == pytest.approx(projection_shift(lm, candidates[item.name], SITES[1], v, seed=0))
    by_name = {s.name: s for s in screening.sets}
    assert by_name["expressing"].trait_shift > 0 > by_name["neutral"].trait_shift  # trained towards token 10 or not
    x, y = [s.projection_shift for s in screening.sets], [s.trait_shift for s in screening.sets]
    assert screening.pearson == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert set(screening.to_json()) >= {"pearson", "spearman", "sets", "trait_before"}


@pytest.mark.unit
def test_bad_input_is_refused(tiny_lm):
    lm = tiny_lm("llama")
    with pytest.raises(InputError, match="non-empty prompt and response"):
        persona_vectors(lm, [([1, 2], [])], NEUTRAL, SITES[0])
    with pytest.raises(InputError, match="at least one"):
        persona_vectors(lm, [], NEUTRAL, SITES[0])
    with pytest.raises(InputError, match="non-zero direction"):
        projections(lm, [[1, 2]], SITES[0], torch.zeros(32))
    with pytest.raises(InputError, match="one label per prompt"):
        monitor_trait(lm, [[1, 2], [1, 3]], [1.0], SITES[0], torch.ones(32))
    with pytest.raises(InputError, match="at least two candidate sets"):
        screen_datasets(lm, {"one": EXPRESSING}, SITES[0], torch.ones(32), measure=lambda m: 0.0)
