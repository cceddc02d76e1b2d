"""Weight edits: additive deltas ``θ' = θ + Δ`` to named parameters, the one steering leaf of every weight-space
method (rank-one edits, task vectors, TIES merges, masked fine-tuning).

Example:
    >>> import lsi, torch
    >>> from lsi.testing import tiny_model
    >>> lm = lsi.LanguageModel(tiny_model("gpt2"))
    >>> name = "transformer.h.0.mlp.c_proj.bias"
    >>> edit = WeightEdit.of(lm, {name: torch.ones(32)}, label="demo")
    >>> before = lm.forward([[5, 6, 7]])
    >>> with lm.intervene(edit):
    ...     changed = not torch.equal(lm.forward([[5, 6, 7]]), before)
    >>> changed, torch.equal(lm.forward([[5, 6, 7]]), before)
    (True, True)
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lsi.core.folding import Folding
from lsi.core.identity import ModelIdentity, model_parameters
from lsi.core.steering import Steering, check_finite
from lsi.errors import ShapeMismatchError

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel


@contextlib.contextmanager
def added_to_weights(lm: LanguageModel, deltas: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Add ``deltas`` to the named parameters for the duration of the block; the exact previous values come back
    on exit (they are kept, not subtracted)."""
    params = model_parameters(lm, list(deltas))
    saved = {n: p.detach().clone() for n, p in params.items()}
    try:
        with torch.no_grad():
            for n, p in params.items():
                p.add_(deltas[n].to(device=p.device, dtype=p.dtype))
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])


@dataclass(frozen=True, eq=False, repr=False)
class WeightEdit(Steering):
    """Additive weight deltas for named parameters.

    ``model`` is the identity of the model the edit was computed on, with the fingerprint of the edited
    parameters' values (:meth:`~lsi.core.identity.ModelIdentity.of`): applying it to other weights raises
    :class:`~lsi.errors.ModelMismatchError`. ``label`` says what made it; ``info`` keeps JSON-ready details
    (layer, subject, how many entries moved, ...).
    """

    deltas: Mapping[str, torch.Tensor]
    model: ModelIdentity
    label: str = "weight edit"
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, lm: LanguageModel, deltas: Mapping[str, torch.Tensor], *, label: str = "weight edit",
           info: Mapping[str, Any] | None = None) -> WeightEdit:
        """The edit ``deltas`` on ``lm``'s current weights (shapes checked, values finite, kept in float32 on the
        CPU)."""
        params = model_parameters(lm, list(deltas))
        kept: dict[str, torch.Tensor] = {}
        for name, delta in deltas.items():
            d = torch.as_tensor(delta).detach().float().cpu()
            if d.shape != params[name].shape:
                raise ShapeMismatchError(f"a delta of shape {tuple(params[name].shape)} for {name}",
                                         f"shape {tuple(d.shape)}", "compute it on this model's parameter")
            check_finite(d, f"delta for {name}")
            kept[name] = d.clone()
        return cls(kept, ModelIdentity.of(lm, sorted(kept)), label, dict(info or {}))

    def _deltas(self, lm: LanguageModel) -> dict[str, torch.Tensor]:
        return dict(self.deltas)

    def folding(self, lm: LanguageModel) -> Folding:
        """Nothing to do here: folding adds every leaf's weight deltas first, as applying does."""
        return Folding()

    def moved(self, atol: float = 0.0) -> int:
        """How many parameter entries the edit changes by more than ``atol``."""
        return sum(int((d.abs() > atol).sum()) for d in self.deltas.values())

    def _record(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"label": self.label, "info": dict(self.info), "names": list(self.deltas)}, {
            f"delta{i}": d for i, d in enumerate(self.deltas.values())}

    @classmethod
    def _restore(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], model: ModelIdentity) -> WeightEdit:
        deltas = {name: tensors[f"delta{i}"] for i, name in enumerate(meta["names"])}
        return cls(deltas, model, meta["label"], meta["info"])

    def __repr__(self) -> str:
        return f"WeightEdit({self.label!r}, {len(self.deltas)} tensors, {self.moved()} entries moved)"
