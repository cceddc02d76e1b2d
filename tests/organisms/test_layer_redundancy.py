"""The committed layer-redundancy organism: the inserted layers change the loss least when removed."""

from __future__ import annotations

import pytest
import torch

from lsi.organisms import layer_redundancy
from lsi.organisms.registry import get_organism, ground_truth, load_organism


@pytest.fixture(scope="module")
def lm():
    return load_organism("layer_redundancy")


@pytest.mark.integration
def test_committed_layer_redundancy_organism_verifies(lm) -> None:
    truth = ground_truth("layer_redundancy")
    report = get_organism("layer_redundancy").verify(lm, truth)
    assert report.passed, [f"{c.name}: {c.value}" for c in report.checks if not c.passed]
    deltas = report.details["removal_delta_loss"]
    ranked = sorted(range(len(deltas)), key=deltas.__getitem__)
    assert sorted(ranked[: len(truth["redundant_layers"])]) == sorted(truth["redundant_layers"])


@pytest.mark.integration
def test_skipping_a_layer_is_undone_on_exit(lm) -> None:
    ids = layer_redundancy.sample_batch(ground_truth("layer_redundancy")["data"], 4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = lm.forward(ids)
        with layer_redundancy.skipped([lm.model.base_model.layers[0]]):
            skipped = lm.forward(ids)
        after = lm.forward(ids)
    assert torch.equal(before, after)
    assert not torch.allclose(before, skipped)


@pytest.mark.unit
def test_markov_sequences_follow_the_successor_table() -> None:
    data = ground_truth("layer_redundancy")["data"]
    ids = layer_redundancy.sample_batch(data, 16, torch.Generator().manual_seed(0)) - data["first_token_id"]
    table = torch.tensor(data["successors"])
    for row in ids:
        for t in range(3, len(row)):
            assert int(row[t]) in table[row[t - 2], row[t - 1]].tolist()
