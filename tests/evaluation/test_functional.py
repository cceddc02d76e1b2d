"""The shared functional helpers against brute-force formulas: KL from explicit probabilities, next-token NLL by a
Python loop over a padded batch, masked means and the last real index on either padding side."""

import math

import pytest
import torch

from lsi.evaluation.functional import (
    kl_divergence,
    last_positions,
    last_token_logits,
    masked_mean,
    next_token_logprobs,
    next_token_nll,
)

pytestmark = pytest.mark.unit


def _log_softmax(row: list[float]) -> list[float]:
    norm = math.log(sum(math.exp(z) for z in row))
    return [z - norm for z in row]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_matches_the_sum_over_explicit_probabilities(dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(3, 5, generator=gen, dtype=torch.float64) + 0.1
    q = torch.rand(3, 5, generator=gen, dtype=torch.float64) + 0.1
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    got = kl_divergence(p.log().to(dtype), q.log().to(dtype))
    for row in range(3):
        want = sum(float(a) * math.log(float(a) / float(b)) for a, b in zip(p[row], q[row], strict=True))
        assert float(got[row]) == pytest.approx(want, rel=1e-5 if dtype == torch.float32 else 1e-12)
    assert got.dtype == dtype
    assert float(kl_divergence(p.log(), p.log()).abs().max()) == 0.0


def test_next_token_nll_matches_a_loop_over_a_padded_batch() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 6, generator=gen, dtype=torch.float64)
    ids = torch.tensor([[1, 4, 2, 0], [3, 5, 1, 2]])  # row 0 right-padded after 3 tokens
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    nll = next_token_nll(logits, ids, dtype=torch.float64)
    total, count = 0.0, 0
    for row in range(2):
        for t in range(3):
            want = -_log_softmax([float(z) for z in logits[row, t]])[int(ids[row, t + 1])]
            assert float(nll[row, t]) == pytest.approx(want, abs=1e-12)
            if mask[row, t + 1]:
                total, count = total + want, count + 1
    assert float(masked_mean(nll, mask[:, 1:])) == pytest.approx(total / count, abs=1e-12)
    assert next_token_nll(logits, ids).dtype == torch.float32  # the default precision
    assert next_token_logprobs(logits, dtype=torch.float64).shape == (2, 3, 6)


def test_masked_mean_of_nothing_is_zero() -> None:
    assert float(masked_mean(torch.ones(2, 3), torch.zeros(2, 3))) == 0.0


def test_last_real_index_on_either_padding_side() -> None:
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert last_positions(right).tolist() == [2, 3]
    assert last_positions(left).tolist() == [3, 3]
    logits = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    assert last_token_logits(logits, right).tolist() == [logits[0, 2].tolist(), logits[1, 3].tolist()]
