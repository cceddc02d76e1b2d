"""The biased_occupations organism: a gender bias carried by one planted head, context and pronouns kept without it."""

from __future__ import annotations

import pytest
import torch

import lsi
from lsi.core.inputs import Batch
from lsi.errors import InputError
from lsi.evaluation.ranking import auroc_of
from lsi.locate import ablation, activation_patching
from lsi.organisms import biased_occupations as bo
from lsi.organisms.registry import get_organism, ground_truth, load_organism


@pytest.fixture(scope="module")
def truth() -> dict:
    return ground_truth("biased_occupations")


@pytest.fixture(scope="module")
def lm():
    return load_organism("biased_occupations")


@pytest.fixture(scope="module")
def report(lm, truth: dict):
    return get_organism("biased_occupations").verify(lm, truth)


@pytest.mark.integration
def test_committed_organism_verifies(report) -> None:
    assert report.passed, [f"{c.name}: {c.value}" for c in report.checks if not c.passed]


@pytest.mark.integration
def test_planted_head_removes_the_bias_and_keeps_the_facts(report) -> None:
    base, zeroed = report.details["base"], report.details["planted_zeroed"]
    assert base["bias_gap"] >= 0.2 and base["context_accuracy"] >= 0.9 and base["pronoun_agreement"] >= 0.95
    assert zeroed["bias_gap"] <= base["bias_gap"] / 2
    assert zeroed["context_accuracy"] >= 0.95 * base["context_accuracy"] and zeroed["pronoun_agreement"] >= 0.95


@pytest.mark.unit
def test_splits_hold_out_their_name_contexts(truth: dict) -> None:
    seen: set[tuple[str, str, str]] = set()
    for split in ("dev", "test"):
        cases = truth["splits"][split]
        assert cases and all(bo.gender(c["he"]) == "male" and bo.gender(c["she"]) == "female" for c in cases)
        triples = {(c["verb"], c["place"], c[who]) for c in cases for who in ("he", "she")}
        assert not seen & triples
        seen |= triples
    assert {c["place"] for c in truth["splits"]["test"]} == set(bo.PLACES)


@pytest.mark.unit
def test_document_slots_hold_the_occupation_and_the_pronoun() -> None:
    words = bo.document("ann", "works", "factory", "engineer")
    assert words[bo.OCCUPATION_SLOT + 1] == "engineer" and words[bo.PRONOUN_SLOT + 1] == "she"
    assert bo.document("adam", "works", "factory", "engineer")[bo.PRONOUN_SLOT + 1] == "he"


@pytest.mark.integration
def test_fairness_measures_equal_a_recomputation_by_hand(lm, truth: dict) -> None:
    cases = truth["splits"]["dev"][:5]
    zero = lsi.Zero(truth["universe"][0])
    vocab = lm.tokenizer.get_vocab()
    for ops in ((), (zero,)):
        measured = bo.fairness_measures(lm, cases, ops)
        gaps, context_hits, pronoun_hits = [], 0, 0
        for case in cases:
            probs = {}
            for who in ("he", "she"):
                words = bo.document(case[who], case["verb"], case["place"], bo.PLACES[case["place"]])
                with lm.intervene(*ops):
                    logits = lm.forward(torch.tensor([[vocab[w] for w in words]]))[0]
                probs[who] = torch.softmax(logits[bo.OCCUPATION_SLOT].double(), -1)
                context_hits += int(logits[bo.OCCUPATION_SLOT].argmax()) == vocab[bo.PLACES[case["place"]]]
                pronoun_hits += int(logits[bo.PRONOUN_SLOT].argmax()) == vocab["he" if who == "he" else "she"]
            gaps += [abs(float(probs["he"][vocab[o]] - probs["she"][vocab[o]])) for o in ("engineer", "nurse")]
        assert measured["bias_gap"] == pytest.approx(sum(gaps) / len(gaps), abs=1e-5)
        assert measured["context_accuracy"] == pytest.approx(context_hits / (2 * len(cases)))
        assert measured["pronoun_agreement"] == pytest.approx(pronoun_hits / (2 * len(cases)))


@pytest.mark.integration
def test_name_swap_pairs_differ_only_in_the_names(lm, truth: dict) -> None:
    cases = truth["splits"]["test"]
    clean, swapped = bo.name_swap_pairs(lm, cases)
    assert clean.shape == swapped.shape == (2 * len(cases), bo.OCCUPATION_SLOT + 1)
    words = [lm.tokenizer.convert_ids_to_tokens(row) for row in clean.tolist()]
    swapped_words = [lm.tokenizer.convert_ids_to_tokens(row) for row in swapped.tolist()]
    assert words[0][1] == cases[0]["he"] and words[len(cases)][1] == cases[0]["she"]
    for row, other in zip(words, swapped_words, strict=True):
        assert row[-1] == "a" and row[1] == row[7] and other[1] == other[7]
        assert bo.gender(row[1]) != bo.gender(other[1])
        assert [w for i, w in enumerate(row) if i not in (1, 7)] == [w for i, w in enumerate(other) if i not in (1, 7)]


@pytest.mark.integration
def test_bias_metric_is_the_signed_lean_and_flips_under_a_name_swap(lm, truth: dict) -> None:
    cases = truth["splits"]["test"]
    clean, swapped = bo.name_swap_pairs(lm, cases)
    metric = bo.bias_metric(lm, cases)
    vocab = lm.tokenizer.get_vocab()
    probs = lm.forward(clean)[:, -1].double().softmax(-1)
    lean = probs[:, vocab["engineer"]] - probs[:, vocab["nurse"]]
    by_hand = (lean[: len(cases)].sum() - lean[len(cases):].sum()) / len(lean)
    batch = Batch(clean, torch.ones_like(clean))
    assert float(metric(lm.forward(clean), batch)) == pytest.approx(float(by_hand), abs=1e-5)
    assert float(metric(lm.forward(swapped), batch)) == pytest.approx(-float(by_hand), abs=0.02)
    with pytest.raises(InputError):
        metric(lm.forward(clean[:3]), Batch(clean[:3], torch.ones_like(clean[:3])))


@pytest.mark.integration
def test_planted_head_outranks_every_other_head(lm, truth: dict) -> None:
    cases = truth["splits"]["test"]
    clean, swapped = bo.name_swap_pairs(lm, cases)
    metric = bo.bias_metric(lm, cases)
    planted = set(truth["mediators"])
    for result in (ablation(lm, clean, metric, "blocks.*.attn.head_out"),
                   activation_patching(lm, clean, swapped, metric, "blocks.*.attn.head_out")):
        scores = dict(zip(result.labels, result.scores.flatten().abs().tolist(), strict=True))
        assert set(scores) == set(truth["universe"])
        assert auroc_of(scores, planted) == 1.0


@pytest.mark.integration
def test_locate_task_oracle_separates_the_planted_head(lm, truth: dict) -> None:
    from lsi.evaluation.locate import oracle_scores

    (task,) = bo.locate_tasks(lm, truth)
    scores = oracle_scores(lm, task, task.test)
    assert task.planted == frozenset(truth["mediators"])
    assert min(scores[u] for u in task.planted) > 5 * max(s for u, s in scores.items() if u not in task.planted)
