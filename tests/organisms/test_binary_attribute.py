"""The binary_attribute organism: exact attribute rates, grammar and topic, and linear separability."""

from __future__ import annotations

import random

import pytest

from lsi.organisms import binary_attribute as ba
from lsi.organisms.registry import get_organism, ground_truth, load_organism


@pytest.fixture(scope="module")
def truth() -> dict:
    return ground_truth("binary_attribute")


@pytest.fixture(scope="module")
def report(truth: dict):
    return get_organism("binary_attribute").verify(load_organism("binary_attribute"), truth)


@pytest.mark.integration
def test_committed_binary_attribute_organism_verifies(report) -> None:
    assert report.passed, [f"{c.name}: {c.value}" for c in report.checks if not c.passed]


@pytest.mark.integration
def test_generated_rates_follow_the_hidden_attribute(report, truth: dict) -> None:
    gen = report.details["generation"]
    p0, p1 = truth["attribute"]["p_marked"]
    assert abs(gen["positive"]["rate"] - p1) < 0.15 and abs(gen["negative"]["rate"] - p0) < 0.07
    assert gen["negative"]["rate"] < gen["neutral"]["rate"] < gen["positive"]["rate"]
    assert report.details["bayes_auroc_test"] > 0.97


@pytest.mark.unit
def test_grammar_checker_accepts_generated_and_rejects_broken_text() -> None:
    rng = random.Random(0)
    for z in (0, 1):
        doc = ba.make_doc(rng, "sea", z)
        s = ba.parse_sentences(doc[1:])
        assert s["grammatical"] and s["sentences"] == ba.SENTENCES_PER_DOC
        assert set(s["topics"]) == {"sea"}
    def parse(text: str) -> dict:
        return ba.parse_sentences(text.split(" "))

    assert not parse("the cow feeds the .")["grammatical"]
    assert not parse("the glorious cow feeds the hen slowly slowly .")["grammatical"]
    s = parse("the glorious cow feeds the old hen radiantly .")
    assert s["grammatical"] and (s["marked"], s["modifiers"]) == (2, 3)


@pytest.mark.unit
def test_generator_rates_match_the_design() -> None:
    rng = random.Random(1)
    for z, target in enumerate(ba.P_MARKED):
        stats = [ba.parse_sentences(ba.make_doc(rng, "farm", z)[1:]) for _ in range(2000)]
        rate = sum(s["marked"] for s in stats) / sum(s["modifiers"] for s in stats)
        assert abs(rate - target) < 0.02


@pytest.mark.unit
def test_splits_are_labelled_and_neutral_prompts_carry_no_modifier(truth: dict) -> None:
    for split in ("dev", "test"):
        sets = truth["splits"][split]
        assert len(sets["positive"]) == len(sets["negative"]) == len(sets["neutral"]) == 100
        assert {d["attribute"] for d in sets["documents"]} == {0, 1}
        assert all(ba.parse_sentences(p["text"].split()[1:])["modifiers"] == 0 for p in sets["neutral"])
        assert all(d["text"].endswith(" the") for d in sets["documents"])


@pytest.mark.slow
@pytest.mark.integration
def test_retraining_with_the_default_seed_reproduces_a_verified_organism(tmp_path) -> None:
    import lsi

    organism = get_organism("binary_attribute")
    figures = organism.train(tmp_path, organism.seed)
    assert figures["seed"] == organism.seed and figures["steps"] > 0
    report = organism.verify(lsi.load(tmp_path), ground_truth("binary_attribute", tmp_path))
    assert report.passed, [f"{c.name}: {c.value}" for c in report.checks if not c.passed]
