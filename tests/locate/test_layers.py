"""Layer distances, Block Influence and angular distance against token loops; the inserted layers of the
layer_redundancy organism rank lowest."""

from __future__ import annotations

import math

import pytest
import torch

from lsi.errors import InputError
from lsi.locate.layers import angular_distance, block_influence, layer_distances

pytestmark = pytest.mark.unit

ROWS = [[5, 17, 42, 8, 63], [9, 33], [70, 12, 44, 21]]
OTHER = [[6, 18, 43], [10, 34, 11, 12], [71, 13]]


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm() * b.norm()))


def _hand_layer_means(lm, rows, n: int, fn) -> list[float]:
    """Each row alone; x^l = resid_pre of layer l, x^L = the last layer's resid_post; a loop over tokens."""
    layers = lm.dims.n_layers
    totals, count = [0.0] * (layers - n + 1), 0
    for row in rows:
        cache = lm.run_with_cache([row], ["blocks.*.resid_pre", "blocks.*.resid_post"])
        states = [cache[f"blocks.{layer}.resid_pre"][0] for layer in range(layers)]
        states.append(cache[f"blocks.{layers - 1}.resid_post"][0])
        for t in range(len(row)):
            for layer in range(layers - n + 1):
                totals[layer] += fn(_cos(states[layer][t], states[layer + n][t]))
            count += 1
    return [x / count for x in totals]


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_block_influence_matches_token_loop_for_any_padding(tiny_lm, family) -> None:
    lm = tiny_lm(family)
    hand = _hand_layer_means(lm, ROWS, 1, lambda c: 1 - c)
    for side, batch_size in (("right", 3), ("left", 2)):
        r = block_influence(lm, lm.to_batch(ROWS, padding_side=side), batch_size=batch_size)
        assert r.labels == ["blocks.0", "blocks.1"] and r.method == "block_influence"
        assert r.scores.tolist() == pytest.approx(hand, abs=1e-6)


def test_angular_distance_matches_token_loop(tiny_lm) -> None:
    lm = tiny_lm("qwen2", num_hidden_layers=3)
    for n in (1, 2, 3):
        hand = _hand_layer_means(lm, ROWS, n, lambda c: math.acos(max(-1.0, min(1.0, c))) / math.pi)
        r = angular_distance(lm, lm.to_batch(ROWS, padding_side="left"), n=n, batch_size=2)
        assert r.labels == [f"blocks.{i}" for i in range(4 - n)] and r.settings["n"] == n
        assert r.scores.tolist() == pytest.approx(hand, abs=1e-6)


def test_layer_distances_between_paired_rows(tiny_lm) -> None:
    lm = tiny_lm("gpt2")
    r = layer_distances(lm, ROWS, OTHER, "blocks.*.resid_post", batch_size=2)  # last real token of each row
    assert r.labels == ["blocks.0.resid_post", "blocks.1.resid_post"] and r.settings["n_tokens"] == 3
    hand = [0.0, 0.0]
    for a, b in zip(ROWS, OTHER, strict=True):
        ca, cb = (lm.run_with_cache([x], "blocks.*.resid_post") for x in (a, b))
        for layer in range(2):
            site = f"blocks.{layer}.resid_post"
            hand[layer] += float((ca[site][0, -1] - cb[site][0, -1]).double().norm()) / 3
    assert r.scores.tolist() == pytest.approx(hand, rel=1e-5)
    same = layer_distances(lm, ROWS, lm.to_batch(ROWS, padding_side="left"), "blocks.*.mlp.out", positions="all")
    assert same.scores.abs().max() < 1e-5 and same.settings["n_tokens"] == 11


def test_layer_scores_bad_input(tiny_lm) -> None:
    lm = tiny_lm("gpt2")
    with pytest.raises(InputError, match="the same number of rows"):
        layer_distances(lm, ROWS, OTHER[:2])
    with pytest.raises(InputError, match="the same number of selected tokens"):
        layer_distances(lm, ROWS, OTHER, positions="all")
    with pytest.raises(InputError, match="layer gap n"):
        angular_distance(lm, ROWS, n=3)
    with pytest.raises(InputError, match="at least one input"):
        block_influence(lm, [])
    with pytest.raises(InputError, match="at least one selected real token"):
        block_influence(lm, ROWS, positions=slice(9, None))


def test_inserted_layers_have_the_lowest_block_influence_and_angular_distance() -> None:
    from lsi.bench.registry import get_locate_methods
    from lsi.organisms.registry import get_organism, ground_truth, load_organism

    lm, truth = load_organism("layer_redundancy"), ground_truth("layer_redundancy")
    (task,) = get_organism("layer_redundancy").locate_tasks(lm, truth)
    inserted = set(truth["redundant_sites"])
    for method in get_locate_methods(["block_influence", "angular_distance"])[2:]:
        scores = method.run(lm, task, 0)
        assert set(sorted(scores, key=scores.__getitem__)[: len(inserted)]) == inserted, method.name
