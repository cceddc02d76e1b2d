"""Built-in persona traits: their data and exact measures, and the whole study on binary_attribute (fast) and on
stories260k (acceptance), whose results must be plain JSON and internally consistent."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lsi.improve.traits import Reading, binary_attribute_trait, cheerful_trait, persona_study, word_counts
from lsi.organisms.binary_attribute import ADJ, ADV
from lsi.organisms.registry import ground_truth, load_organism

MARKED = set(ADJ["marked"] + ADV["marked"])


@pytest.fixture(scope="module")
def organism():
    lm = load_organism("binary_attribute")
    return lm, binary_attribute_trait(lm, ground_truth("binary_attribute"))


@pytest.fixture(scope="module")
def study(organism) -> dict:
    lm, trait = organism
    calls: list[tuple[str, int, int]] = []
    results = persona_study(lm, trait, tau=0.1, progress=lambda *args: calls.append(args))
    return {"results": results, "calls": calls}


def _words(lm, ids) -> list[str]:
    return lm.tokenizer.convert_ids_to_tokens(list(ids))


@pytest.mark.unit
def test_word_counts_count_whole_words_case_insensitively() -> None:
    assert word_counts("Happy! She was HAPPY, not unhappy. They cried.") == (2, 1, 8)
    assert word_counts("") == (0, 0, 0)


@pytest.mark.unit
def test_reading_pools_counts_and_bootstraps_whole_continuations() -> None:
    reading = Reading(((1.0, 4.0), (0.0, 0.0), (3.0, 4.0)), None, {})
    assert reading.rate == 0.5 and reading.per_prompt == (0.25, 0.0, 0.75)
    counts = np.array(reading.counts)
    picks = np.random.default_rng(0).integers(0, 3, size=(1000, 3))
    num, den = counts[picks, 0].sum(1), counts[picks, 1].sum(1)
    rates = [n / d if d else 0.0 for n, d in zip(num, den, strict=True)]
    assert reading.interval() == pytest.approx(tuple(np.percentile(rates, [2.5, 97.5])))


@pytest.mark.integration
def test_binary_attribute_exchanges_and_candidate_sets_mix_marked_responses_as_named(organism) -> None:
    lm, trait = organism
    for split in (trait.dev, trait.test):
        assert [p for p, _ in split.expressing] == [p for p, _ in split.neutral]  # the same prompts, both kinds
        marked = [sum(w in MARKED for w in _words(lm, r)) for _, r in split.expressing]
        plain = [sum(w in MARKED for w in _words(lm, r)) for _, r in split.neutral]
        assert sum(marked) > 5 * sum(plain)
        assert all(sum(w in MARKED for w in _words(lm, p)) >= 2 for p in split.prompted)
    assert list(trait.candidates) == [f"{share}% expressing" for share in (0, 25, 50, 75, 100)]
    marks = [sum(w in MARKED for _, r in exchanges for w in _words(lm, r)) / len(exchanges)
             for exchanges in trait.candidates.values()]
    assert all(len(exchanges) == 32 for exchanges in trait.candidates.values())
    assert marks == sorted(marks) and marks[0] < 0.5 < 2 < marks[-1]  # marked words per response rise with the share


@pytest.mark.integration
def test_binary_attribute_measure_is_seeded_and_exact(organism) -> None:
    lm, trait = organism
    first, again = trait.measure(lm, "dev"), trait.measure(lm, "dev")
    assert first == again
    assert 0.0 <= first.rate <= 1.0 and first.fluency == 1.0  # the organism writes grammatical text
    assert trait.measure(lm, "dev", prompted=True).rate > first.rate + 0.1  # asking in context works here


@pytest.mark.integration
def test_study_results_are_json_and_consistent(study, organism) -> None:
    lm = organism[0]
    r = study["results"]
    assert json.loads(json.dumps(r, allow_nan=False)) == r
    assert list(r["vectors"]) == [f"blocks.{layer}.resid_post" for layer in range(lm.dims.n_layers)]
    chosen = r["selection"]["chosen"]
    assert chosen is not None and chosen["kl"] <= r["tau"]
    points = [p for curve in r["selection"]["per_site"].values() for p in curve]
    assert len(points) + len(r["selection"]["skipped"]) == lm.dims.n_layers * 6
    assert chosen in points and max(p["success"] for p in points if p["kl"] <= r["tau"]) == chosen["success"]
    test = r["test"]
    assert test["unsteered"]["kl"] == 0.0 and test["prompting"]["kl"] is None
    rates = {k: test[k]["rate"] for k in ("unsteered", "prompting", "persona", "random")}
    assert test["verdict"]["best"] == max(rates, key=rates.__getitem__)
    assert test["verdict"]["persona_beats_random"] == (rates["persona"] > rates["random"])
    assert set(r["monitor"]["per_site"]) == set(r["vectors"])
    assert all(0.0 <= m["auroc"] <= 1.0 and 0.0 <= m["context_auroc"] <= 1.0 for m in r["monitor"]["per_site"].values())
    assert all(low <= test[k]["rate"] <= high for k in rates for low, high in [test[k]["interval"]])
    screening = r["screening"]
    assert screening["site"] == chosen["settings"]["site"] and len(screening["sets"]) == 5
    assert {step for step, _, _ in study["calls"]} == {"select", "monitor", "screen"}
    assert all(done <= total for _, done, total in study["calls"])


@pytest.mark.integration
def test_binary_attribute_study_figures(study) -> None:
    """Measured (torch 2.13 CPU): marked rate 0.40 [0.31, 0.50] unsteered, 0.86 [0.79, 0.92] steered (layer 0,
    alpha 4, KL 0.08, fluency 0.72), 0.44 with a random direction, 0.67 prompted (fluency 1.0); monitor AUROC 0.95 /
    0.90; screening Pearson 0.96, Spearman 1.0."""
    r = study["results"]
    rates = {k: v["rate"] for k, v in r["test"].items() if k != "verdict"}
    assert rates["persona"] > rates["unsteered"] + 0.2 and rates["persona"] > rates["random"] + 0.2
    assert r["test"]["verdict"]["persona_interval_above_unsteered"]
    assert max(m["auroc"] for m in r["monitor"]["per_site"].values()) > 0.8
    assert all(v["test_auroc"] > 0.9 for v in r["vectors"].values())  # held-out responses separate at every layer
    assert r["screening"]["spearman"] > 0.8
    assert r["seconds"]["total"] < 90


@pytest.mark.integration
def test_study_without_a_steering_within_the_budget_says_so(organism) -> None:
    lm, trait = organism
    r = persona_study(lm, trait, tau=1e-12)
    assert r["selection"]["chosen"] is None and set(r["test"]) == {"unsteered", "prompting", "verdict"}
    assert r["test"]["verdict"]["persona"].startswith("no steering within KL <= 1e-12")
    best_monitor = max(r["monitor"]["per_site"], key=lambda s: r["monitor"]["per_site"][s]["auroc"])
    assert r["screening"]["site"] == best_monitor


@pytest.mark.acceptance
@pytest.mark.slow
def test_cheerful_trait_study_on_stories260k(stories_lm) -> None:
    """Measured (torch 2.13 CPU): happy minus sad words per 100 words 1.39 [0.89, 1.93] unsteered, 2.31 [1.81, 2.81]
    steered (layer 2, alpha 1, KL 0.07), 1.31 with a random direction, 0.91 prompted (the tiny model does not follow
    the request); monitor AUROC at most 0.57 against sampled responses, 0.998 between happy and sad contexts (layer
    3); screening Pearson 0.93, Spearman 1.0."""
    trait = cheerful_trait(stories_lm)
    r = persona_study(stories_lm, trait, tau=0.1)
    assert json.loads(json.dumps(r, allow_nan=False)) == r
    test = r["test"]
    assert test["persona"]["kl"] <= 0.1 + 0.05 and math.isfinite(test["random"]["kl"])
    assert test["persona"]["rate"] > test["unsteered"]["rate"]
    assert test["persona"]["sad_per_100_words"] < test["unsteered"]["sad_per_100_words"]
    shifts = {s["name"]: s["trait_shift"] for s in r["screening"]["sets"]}
    assert shifts["100% happy"] > 0 > shifts["0% happy"]
    assert r["screening"]["spearman"] > 0.8
    assert r["seconds"]["total"] < 90
