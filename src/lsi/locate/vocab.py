"""Vocabulary projection: the logit lens.

The logit lens reads each layer's residual stream through the model's own final norm and unembedding
(``lm.unembed``: final norm applied, then ``W_U``, then any final soft-capping). Row 0 is the embedding
(``blocks.0.resid_pre``); row ``i + 1`` is ``blocks.i.resid_post``; the last row equals the model's logits.

Example:
    >>> import lsi
    >>> from lsi.testing import tiny_model
    >>> lm = lsi.LanguageModel(tiny_model("gpt2"))
    >>> lens = logit_lens(lm, [[5, 6, 7]])
    >>> tuple(lens.logits.shape)  # [n_layers + 1, batch, positions, vocab]
    (3, 1, 1, 97)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from lsi.core.positions import PositionSpec

if TYPE_CHECKING:
    from lsi.core.inputs import Inputs
    from lsi.core.model import LanguageModel


@dataclass(frozen=True)
class LogitLensResult:
    """Lens logits per layer: ``logits[layer_row, batch, position, vocab]`` and the row labels."""

    logits: torch.Tensor
    labels: tuple[str, ...]

    def probs(self) -> torch.Tensor:
        return self.logits.float().softmax(-1)

    def target_probs(self, targets: torch.Tensor) -> torch.Tensor:
        """Probability of ``targets`` (``[batch, positions]`` token ids) at each layer: ``[layers+1, b, k]``."""
        idx = targets.to(self.logits.device)[None, ..., None].expand(self.logits.shape[0], -1, -1, 1)
        return self.probs().gather(-1, idx).squeeze(-1)


def logit_lens(lm: LanguageModel, inputs: Inputs, *, positions: PositionSpec = "last") -> LogitLensResult:
    """Decode every layer's residual stream at ``positions`` with the final norm and unembedding."""
    n = lm.dims.n_layers
    sites = ["blocks.0.resid_pre", *[f"blocks.{i}.resid_post" for i in range(n)]]
    cache = lm.run_with_cache(inputs, sites, positions=positions)
    with torch.no_grad():
        logits = torch.stack([lm.unembed(cache[s]) for s in sites])
    return LogitLensResult(logits, ("embed", *[f"blocks.{i}.resid_post" for i in range(n)]))
