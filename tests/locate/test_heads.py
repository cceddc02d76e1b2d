"""Attention-based head scores: exact values under uniform attention, loops over cached patterns, padding
invariance, the planted heads of the induction organism, bad input."""

from __future__ import annotations

import pytest
import torch

import lsi
from lsi.errors import InputError
from lsi.locate.heads import (
    attention_mass,
    attention_sink_scores,
    induction_scores,
    previous_token_scores,
    repeated_random_tokens,
)

pytestmark = pytest.mark.unit

ROWS = [[5, 17, 42, 17, 63, 5, 17], [9, 33, 9], [70, 12, 44, 70, 12]]  # repeats inside rows; padded batches
SCORES = {"previous": previous_token_scores, "induction": induction_scores, "sink": attention_sink_scores}


@pytest.fixture(scope="module")
def uniform_lm():
    """A tiny Llama whose queries are zero: every query attends uniformly to its real keys, 1 / (i + 1)."""
    from lsi.testing import tiny_model

    model = tiny_model("llama", attn_implementation="eager")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.zero_()
    return lsi.LanguageModel(model)


def test_scores_under_uniform_attention(uniform_lm) -> None:
    ids = repeated_random_tokens(3, 5, vocab=(3, 97), seed=1)  # R R, no bos: 10 tokens
    uniform = 1 / torch.arange(1, 11, dtype=torch.float64)  # attention of query i to each of its keys
    # previous token and sink: queries 1..9, one target key each
    for fn in (previous_token_scores, attention_sink_scores):
        r = fn(uniform_lm, ids)
        assert r.shape == (2, 4) and r.axes[1] == ("head", ("0", "1", "2", "3"))
        torch.testing.assert_close(r.scores.double(), uniform[1:].mean().expand(2, 4), atol=1e-6, rtol=0)
    # induction: queries 5..9 (the second copy), each with one target key (after the first occurrence)
    torch.testing.assert_close(induction_scores(uniform_lm, ids).scores.double(), uniform[5:].mean().expand(2, 4),
                               atol=1e-6, rtol=0)
    # mass on chosen tokens: token t at position j is seen by queries i >= j with weight 1 / (i + 1)
    token = int(ids[0, 2])
    hand = torch.stack([(ids[r, : i + 1] == token).sum() * uniform[i] for r in range(3) for i in range(10)]).mean()
    r = attention_mass(uniform_lm, ids, lsi.Match(token))
    torch.testing.assert_close(r.scores.double(), hand.expand(2, 4), atol=1e-6, rtol=0)
    assert r.settings["keys"] == f"match({token})" and r.settings["n_queries"] == 30


def _hand_scores(lm, rows, kind: str) -> torch.Tensor:
    """Each row alone (no padding), loops over queries and keys of the cached patterns."""
    total, count = torch.zeros(lm.dims.n_layers, lm.dims.n_heads, dtype=torch.float64), 0
    for row in rows:
        cache = lm.run_with_cache([row], "blocks.*.attn.pattern")
        pattern = cache.stack("blocks.*.attn.pattern")[:, 0].double()  # [layer, head, q, k]
        for q in range(1, len(row)):
            if kind == "previous":
                keys = [q - 1]
            elif kind == "sink":
                keys = [0]
            else:
                keys = [j + 1 for j in range(q) if row[j] == row[q]]
                if not keys:
                    continue
            total += pattern[:, :, q, keys].sum(-1)
            count += 1
    return total / count


@pytest.mark.parametrize("kind", sorted(SCORES))
def test_scores_match_loops_over_cached_patterns_for_any_padding(tiny_lm, kind) -> None:
    lm = tiny_lm("llama", attn_implementation="eager")
    hand = _hand_scores(lm, ROWS, kind)
    for side, batch_size in (("right", 3), ("left", 2)):
        r = SCORES[kind](lm, lm.to_batch(ROWS, padding_side=side), batch_size=batch_size)
        torch.testing.assert_close(r.scores.double(), hand, atol=1e-6, rtol=1e-5)


def test_attention_mass_from_the_last_token(tiny_lm) -> None:
    lm = tiny_lm("gpt2", attn_implementation="eager")
    r = attention_mass(lm, lm.to_batch(ROWS, padding_side="left"), lsi.Match(17), queries="last")
    hand = torch.zeros(2, 4, dtype=torch.float64)
    for row in ROWS:
        pattern = lm.run_with_cache([row], "blocks.*.attn.pattern").stack("blocks.*.attn.pattern")[:, 0].double()
        hand += pattern[:, :, -1, [j for j, t in enumerate(row) if t == 17]].sum(-1) / len(ROWS)
    torch.testing.assert_close(r.scores.double(), hand, atol=1e-6, rtol=1e-5)


def test_repeated_random_tokens() -> None:
    ids = repeated_random_tokens(4, 6, vocab=(10, 30), bos=1, seed=3)
    assert ids.shape == (4, 13) and (ids[:, 0] == 1).all()
    assert torch.equal(ids[:, 1:7], ids[:, 7:]) and ids[:, 1:].min() >= 10 and ids[:, 1:].max() < 30
    assert all(len(set(row[1:7].tolist())) == 6 for row in ids)  # no repeats inside R when the range allows
    assert torch.equal(ids, repeated_random_tokens(4, 6, vocab=(10, 30), bos=1, seed=3))
    assert repeated_random_tokens(2, 8, vocab=(3, 5)).shape == (2, 16)  # a small range: drawn with repeats


def test_induction_organism_heads_score_highest() -> None:
    from lsi.bench.registry import get_locate_methods
    from lsi.organisms.registry import get_organism, ground_truth, load_organism

    lm, truth = load_organism("induction", attn_implementation="eager"), ground_truth("induction")
    data = truth["data"]
    ids = repeated_random_tokens(64, 10, vocab=(data["first_content_id"], data["first_content_id"] + data["n_content"]),
                                 bos=data["bos_id"])
    previous, induction = previous_token_scores(lm, ids), induction_scores(lm, ids)
    assert {f"blocks.{label.replace('@', '.attn.head_out[')}]" for label, _ in previous.top(1)} == \
        set(truth["previous_token_heads"])
    assert {f"blocks.{label.replace('@', '.attn.head_out[')}]" for label, _ in induction.top(2)} == \
        set(truth["induction_heads"])
    (method,) = get_locate_methods(["attention_head_scores"])[2:]  # on the task's own inputs
    (task,) = get_organism("induction").locate_tasks(lm, truth)
    scores = method.run(lm, task, 0)
    assert set(sorted(scores, key=scores.__getitem__)[-len(task.planted):]) == task.planted


def test_head_scores_bad_input(tiny_lm) -> None:
    lm = tiny_lm("llama", attn_implementation="eager")
    with pytest.raises(InputError, match="at least one query position for induction_scores"):
        induction_scores(lm, [[5, 6, 7, 8]])  # no token occurs twice
    with pytest.raises(InputError, match="at least one input"):
        previous_token_scores(lm, [])
    with pytest.raises(InputError, match="vocab range"):
        repeated_random_tokens(2, 5, vocab=(7, 8))
