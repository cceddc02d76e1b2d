"""Ready-made metrics against hand computation, padding-aware positions, and bad input."""

import pytest
import torch

from lsi.core.inputs import Batch
from lsi.core.model import evaluate
from lsi.errors import InputError
from lsi.locate import metrics

pytestmark = pytest.mark.unit


@pytest.fixture
def padded() -> tuple[torch.Tensor, Batch, Batch]:
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    right = Batch(torch.tensor([[1, 2, 3, 0], [4, 5, 6, 2]]), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
    left = Batch(torch.tensor([[0, 1, 2, 3], [4, 5, 6, 2]]), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))
    return logits, right, left


def test_logit_metrics_read_the_last_real_token(padded) -> None:
    logits, right, _ = padded
    expected = (logits[0, 2, 5] + logits[1, 3, 6]) / 2
    assert metrics.logit([5, 6])(logits, right).item() == pytest.approx(expected.item())
    diff = ((logits[0, 2, 5] - logits[0, 2, 1]) + (logits[1, 3, 5] - logits[1, 3, 1])) / 2
    assert metrics.logit_diff(5, 1)(logits, right).item() == pytest.approx(diff.item())


def test_prob_diff_sums_token_sets(padded) -> None:
    logits, right, _ = padded
    p = torch.stack([logits[0, 2], logits[1, 3]]).softmax(-1)
    expected = (p[:, [1, 2]].sum(-1) - p[:, 4]).mean()
    assert metrics.prob_diff([1, 2], [4])(logits, right).item() == pytest.approx(expected.item(), abs=1e-6)


def test_target_logprob_scores_only_the_appended_target() -> None:
    rows, metric = metrics.append_targets([[1, 2], [3]], [[4, 5], [6]])
    assert rows == [[1, 2, 4, 5], [3, 6]]
    batch = Batch(torch.tensor([[1, 2, 4, 5], [3, 6, 0, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    logits = torch.randn(2, 4, 7)
    logp = logits.log_softmax(-1)
    expected = ((logp[0, 1, 4] + logp[0, 2, 5]) + logp[1, 0, 6]) / 2
    assert metric(logits, batch).item() == pytest.approx(expected.item(), abs=1e-6)


def test_loss_ignores_padding_and_kl_to_self_is_zero(padded) -> None:
    logits, right, _ = padded
    logp = logits.log_softmax(-1)
    nll = [-logp[0, 0, 2], -logp[0, 1, 3], -logp[1, 0, 5], -logp[1, 1, 6], -logp[1, 2, 2]]
    assert metrics.loss()(logits, right).item() == pytest.approx(torch.stack(nll).mean().item(), abs=1e-6)
    assert metrics.kl_to(logits)(logits, right).item() == pytest.approx(0.0, abs=1e-6)
    other = logits + torch.randn_like(logits)
    assert metrics.kl_to(logits, positions="all")(other, right).item() > 0


def test_metrics_are_differentiable(padded) -> None:
    logits, right, _ = padded
    logits = logits.clone().requires_grad_(True)
    metrics.logit_diff(5, 1)(logits, right).backward()
    assert logits.grad is not None and logits.grad[0, 2, 5] == pytest.approx(0.5)


def test_bad_input_is_typed(padded) -> None:
    logits, right, _ = padded
    with pytest.raises(InputError, match="one target id, or one per row"):
        metrics.logit([1, 2, 3])(logits, right)
    with pytest.raises(InputError, match="a metric returning a scalar tensor"):
        evaluate(lambda lg, b: lg[:, -1, 0], logits, right)
    with pytest.raises(InputError, match="targets of at least one token"):
        metrics.append_targets([[1]], [[]])
    with pytest.raises(InputError, match="non-empty token set"):
        metrics.prob_diff([], [1])
    with pytest.raises(InputError, match="positions 'last' or 'all'"):
        metrics.kl_to(logits, positions="first")
