"""The committed induction organism: its heads re-derived by attention scores and group ablation."""

from __future__ import annotations

import pytest
import torch

from lsi.organisms import induction
from lsi.organisms.registry import get_organism, ground_truth, load_organism


@pytest.fixture(scope="module")
def truth() -> dict:
    return ground_truth("induction")


@pytest.fixture(scope="module")
def report(truth: dict):
    return get_organism("induction").verify(load_organism("induction"), truth)


def _failures(report) -> list[str]:
    return [f"{c.name}: {c.value}" for c in report.checks if not c.passed]


@pytest.mark.integration
def test_committed_induction_organism_verifies(report) -> None:
    assert report.passed, _failures(report)


@pytest.mark.integration
def test_ground_truth_heads_are_the_top_attention_scorers(report, truth: dict) -> None:
    scores = report.details["attention_scores"]
    n_ind, n_prev = len(truth["induction_heads"]), len(truth["previous_token_heads"])
    top_ind = sorted(range(len(scores["induction"])), key=scores["induction"].__getitem__)[-n_ind:]
    top_prev = sorted(range(len(scores["previous_token"])), key=scores["previous_token"].__getitem__)[-n_prev:]
    assert {induction.head_site(1, h) for h in top_ind} == set(truth["induction_heads"])
    assert {induction.head_site(0, h) for h in top_prev} == set(truth["previous_token_heads"])


@pytest.mark.integration
def test_zeroing_induction_heads_kills_copying_but_not_the_rest(report) -> None:
    acc = report.details["copy_accuracy"]
    assert acc["full"] > 0.9
    assert acc["no_induction"] < 0.25 < 0.85 < acc["no_others"]


@pytest.mark.unit
def test_copy_mask_marks_exact_repeats(truth: dict) -> None:
    ids, lm_mask, copy_mask = induction.sample_batch(truth["data"], 64, torch.Generator().manual_seed(0))
    lo, hi = truth["data"]["periods"]
    for row, mask in zip(ids, copy_mask, strict=True):
        targets = mask.nonzero().flatten()
        periods = [p for p in range(lo, hi + 1) if bool((row[targets] == row[targets - p]).all())]
        assert periods and len(targets) == min(periods) - 1
    assert not bool((copy_mask & ~lm_mask).any())
