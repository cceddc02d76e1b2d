"""The toy-superposition organism: the embed site is exactly the linear map of known sparse codes."""

from __future__ import annotations

import pytest
import torch

from lsi.organisms import toy_superposition as toy
from lsi.organisms.registry import get_organism, ground_truth, load_organism


@pytest.fixture(scope="module")
def truth() -> dict:
    return ground_truth("toy_superposition")


@pytest.mark.integration
def test_committed_toy_superposition_organism_verifies(truth: dict) -> None:
    report = get_organism("toy_superposition").verify(load_organism("toy_superposition"), truth)
    assert report.passed, [f"{c.name}: {c.value}" for c in report.checks if not c.passed]


@pytest.mark.unit
def test_codes_are_sparse_hierarchical_and_superposed(truth: dict) -> None:
    directions, codes = toy.feature_tensors(truth)
    assert directions.shape == (truth["n_features"], truth["d_model"]) and truth["n_features"] > truth["d_model"]
    assert torch.allclose(directions.norm(dim=-1), torch.ones(len(directions)))
    data_codes = codes[truth["data"]["first_data_id"] : truth["data"]["first_name_id"]]
    active = data_codes > 0
    assert int(active.sum(-1).min()) >= 1 and int(active.sum(-1).max()) <= 6
    for child, parent in truth["hierarchy"]["parent_of"].items():
        assert bool(active[:, int(parent)][active[:, int(child)]].all())
        assert int(active[:, int(child)].sum()) > 0


@pytest.mark.unit
def test_name_token_follows_one_of_its_data_tokens_features(truth: dict) -> None:
    _, codes = toy.feature_tensors(truth)
    ids, mask = toy.sample_batch(truth["data"], codes, 8, torch.Generator().manual_seed(0))
    names = ids[mask] - truth["data"]["first_name_id"]
    data_tokens = ids[:, :-1][mask[:, 1:]]
    assert bool((codes[data_tokens, names] > 0).all())


@pytest.mark.slow
@pytest.mark.integration
def test_retraining_from_scratch_reproduces_a_verified_organism(tmp_path, truth: dict) -> None:
    organism = get_organism("toy_superposition")
    figures = organism.train(tmp_path, organism.seed)
    assert figures["seed"] == organism.seed and figures["steps"] > 0
    retrained = ground_truth("toy_superposition", tmp_path)
    assert retrained["directions"] == truth["directions"] and retrained["data_codes"] == truth["data_codes"]
    report = organism.verify(load_organism("toy_superposition", tmp_path), retrained)
    assert report.passed, [f"{c.name}: {c.value}" for c in report.checks if not c.passed]
