"""Small measurements shared by organism verifiers: masked next-token accuracy and loss.

Masks follow :func:`lsi.organisms.training.lm_loss`: ``mask[b, t]`` is True where token ``t`` is a target,
predicted from the logits at position ``t - 1``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def masked_accuracy(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Fraction of masked target tokens that are the argmax of the logits one position earlier."""
    hits = logits[:, :-1].argmax(-1) == input_ids[:, 1:]
    return hits[mask[:, 1:]].float().mean().item()


def masked_nll(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood (nats) over the masked target tokens."""
    from lsi.organisms.training import lm_loss

    return lm_loss(logits, input_ids, mask).item()
