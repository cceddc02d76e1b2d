"""The two_languages organism: reserved language neurons re-derived by group and single-neuron ablation."""

from __future__ import annotations

import random

import pytest

from lsi.organisms import two_languages as tl
from lsi.organisms.registry import get_organism, ground_truth, load_organism


@pytest.fixture(scope="module")
def truth() -> dict:
    return ground_truth("two_languages")


@pytest.fixture(scope="module")
def report(truth: dict):
    return get_organism("two_languages").verify(load_organism("two_languages"), truth)


@pytest.mark.slow
@pytest.mark.integration
def test_committed_two_languages_organism_verifies(report) -> None:
    assert report.passed, [f"{c.name}: {c.value}" for c in report.checks if not c.passed]


@pytest.mark.slow
@pytest.mark.integration
def test_zeroing_a_language_block_hurts_only_that_language(report) -> None:
    v = {c.name: c.value for c in report.checks}
    assert v["ppl_ratio_A_when_A_zeroed"] >= 3.0 and v["ppl_ratio_B_when_B_zeroed"] >= 3.0
    assert v["ppl_change_B_when_A_zeroed"] <= 0.10 and v["ppl_change_A_when_B_zeroed"] <= 0.10
    assert all(ppl < 3.5 for ppl in report.details["ppl"].values())  # near the grammar's entropy (~3.1)


@pytest.mark.slow
@pytest.mark.integration
def test_single_neuron_oracle_ranks_the_reserved_block_first(report, truth: dict) -> None:
    for lang in ("A", "B"):
        top = report.details[f"oracle_top_{lang}"]
        assert len(set(top) & set(truth["neurons"][lang])) >= 0.9 * len(truth["neurons"][lang])


@pytest.mark.unit
def test_one_content_two_word_orders_disjoint_lexicons() -> None:
    content = ("cat", "big", "see", "dog", None)
    assert tl.render(content, "A") == ["the", "big", "cat", "sees", "the", "dog", "."]
    assert tl.render(content, "B") == ["nuru", "bim", "ga", "kelo", "wo", "tesa", "po"]
    assert not set(tl.language_words("A")) & set(tl.language_words("B"))
    doc = tl.make_doc(random.Random(0), "B")
    assert doc[0] == "<bos>" and doc[-1] == "<eos>" and doc.count("po") == tl.SENTENCES_PER_DOC


@pytest.mark.unit
def test_ground_truth_names_disjoint_neuron_sites(truth: dict) -> None:
    a, b = set(truth["neurons"]["A"]), set(truth["neurons"]["B"])
    assert len(a) == len(b) == tl.N_LAYERS * tl.BLOCK_PER_LAYER and not a & b
    assert all(s.startswith("blocks.") and ".mlp.post[" in s for s in a | b)
    assert len(truth["splits"]["test"]["A"]) == len(truth["splits"]["dev"]["B"]) == 200


@pytest.mark.slow
@pytest.mark.integration
def test_retraining_with_the_default_seed_reproduces_a_verified_organism(tmp_path) -> None:
    import lsi

    organism = get_organism("two_languages")
    figures = organism.train(tmp_path, organism.seed)
    assert figures["seed"] == organism.seed and figures["steps"] > 0
    report = organism.verify(lsi.load(tmp_path), ground_truth("two_languages", tmp_path))
    assert report.passed, [f"{c.name}: {c.value}" for c in report.checks if not c.passed]
