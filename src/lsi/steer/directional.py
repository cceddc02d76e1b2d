"""Directional ablation (a steering leaf) and weight orthogonalization: removing one direction from the residual
stream, with hooks or in the weights.

* :class:`DirectionalAblation` (Arditi et al. 2024): ``x <- x - r̂ r̂ᵀ x`` at every layer's input (``resid_pre``)
  and every ``attn.out`` and ``mlp.out``, at all positions; applied, composed, saved and loaded like every
  steering (:mod:`lsi.core.steering`). Directions must be finite and non-zero.
* :func:`orthogonalize`: ``W <- W - r̂ r̂ᵀ W`` (and ``b <- b - r̂ r̂ᵀ b``) for every module that writes to the
  residual stream; the resulting model equals :class:`DirectionalAblation` hooks up to float rounding.

Example:
    >>> import lsi, torch
    >>> from lsi.testing import tiny_model
    >>> lm = lsi.LanguageModel(tiny_model("llama"))
    >>> r = torch.randn(32, generator=torch.Generator().manual_seed(0))
    >>> with DirectionalAblation(r).apply(lm):
    ...     hooked = lm.forward([[5, 6, 7]])
    >>> torch.allclose(orthogonalize(lm, r).forward([[5, 6, 7]]), hooked, atol=1e-5)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lsi.core.folding import Folding, residual_writers
from lsi.core.identity import ModelIdentity, as_identity
from lsi.core.interventions import Apply, Intervention
from lsi.core.model_copy import copy_model, untie_embeddings
from lsi.core.sites import Site
from lsi.core.steering import Steering, check_width, finite_vector
from lsi.errors import InputError, NotFoldableError, ShapeMismatchError

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel

DEFAULT_ABLATION_SITES = ("blocks.*.resid_pre", "blocks.*.attn.out", "blocks.*.mlp.out")


# -- the steering leaf ------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False, repr=False)
class DirectionalAblation(Steering):
    """Project the unit direction ``r̂ = direction / |direction|`` out of ``sites`` at every position:
    ``x <- x - (x · r̂) r̂``.

    ``sites`` default to every layer's input and every attention and MLP output (Arditi et al. 2024).
    ``direction`` is kept as given (float32; its norm does not matter), ``unit`` is ``r̂``.

    Example:
        >>> import torch
        >>> steer = DirectionalAblation(torch.tensor([3.0, 4.0]))
        >>> steer.unit.tolist(), steer.sites
        ([0.6, 0.8], ('blocks.*.resid_pre', 'blocks.*.attn.out', 'blocks.*.mlp.out'))
    """

    direction: torch.Tensor
    sites: tuple[str, ...] = DEFAULT_ABLATION_SITES
    model: ModelIdentity | None = None

    def __init__(self, direction: torch.Tensor, sites: str | Sequence[str | Site] = DEFAULT_ABLATION_SITES, *,
                 model: LanguageModel | ModelIdentity | None = None) -> None:
        r = finite_vector(direction, "direction")
        if float(r.norm()) == 0.0:
            raise InputError("a non-zero direction", "the zero vector", "check that the two sets differ")
        names = [sites] if isinstance(sites, (str, Site)) else list(sites)
        object.__setattr__(self, "direction", r)
        object.__setattr__(self, "sites", tuple(str(Site.parse(s)) for s in names))
        object.__setattr__(self, "model", as_identity(model))

    @property
    def unit(self) -> torch.Tensor:
        """``r̂`` in float64 (normalized there, so float64 models get it exact)."""
        r = self.direction.double()
        return r / r.norm()

    def _ops(self, lm: LanguageModel) -> list[Intervention]:
        check_width(lm, self.sites, self.direction.numel(), "a direction")
        r = self.unit
        converted: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

        def project(x: torch.Tensor) -> torch.Tensor:
            key = (x.device, x.dtype)
            if key not in converted:
                converted[key] = r.to(device=x.device, dtype=x.dtype)
            rr = converted[key]
            return x - (x @ rr)[..., None] * rr

        return [Apply(s, project) for s in self.sites]

    def folding(self, lm: LanguageModel) -> Folding:
        """At the default sites: :func:`orthogonalize` (after additions, which it projects too)."""
        if set(lm.resolve_sites(list(self.sites))) != set(lm.resolve_sites(list(DEFAULT_ABLATION_SITES))):
            raise NotFoldableError(f"an ablation at the default sites {list(DEFAULT_ABLATION_SITES)}",
                                   f"sites {list(self.sites)}", "apply it with hooks instead of exporting it")
        return Folding(lambda target: orthogonalize(target, self.direction, copy=False), stage=2, removes=self.unit)

    def _record(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"sites": list(self.sites)}, {"direction": self.direction}

    @classmethod
    def _restore(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                 model: ModelIdentity) -> DirectionalAblation:
        return cls(tensors["direction"], meta["sites"], model=model)

    def __repr__(self) -> str:
        return f"DirectionalAblation(d={self.direction.numel()}, sites={list(self.sites)})"


def orthogonalize(lm: LanguageModel, direction: torch.Tensor, *, copy: bool = True) -> LanguageModel:
    """Weight orthogonalization: ``W <- W - r̂ r̂ᵀ W`` and ``b <- b - r̂ r̂ᵀ b`` for every residual writer
    (:func:`residual_writers`), computed in float64.

    Returns a new model over a deep copy of the weights (``copy=True``, the default) or edits ``lm`` in place
    and returns it. A tied unembedding is untied first (it keeps the original matrix), so the result equals
    :class:`DirectionalAblation` hooks with the default sites. Families with post-norms raise
    :class:`NotFoldableError`.

    Example:
        >>> import lsi, torch
        >>> from lsi.testing import tiny_model
        >>> lm = lsi.LanguageModel(tiny_model("gpt2"))
        >>> r = torch.randn(32)
        >>> edited = orthogonalize(lm, r)
        >>> float((edited.weights.W_E @ r).abs().max()) < 1e-5
        True
    """
    r = DirectionalAblation(direction).unit  # checked finite, one vector, non-zero
    if r.numel() != lm.dims.d_model:
        raise ShapeMismatchError(f"a direction of size d_model={lm.dims.d_model}", f"size {r.numel()}",
                                 "compute it at a residual site of this model")
    residual_writers(lm)  # refuses post-norm families before any copy
    target = copy_model(lm) if copy else lm
    untie_embeddings(target)
    with torch.no_grad():
        for writer in residual_writers(target):
            for tensor in (writer.weight, writer.bias):
                if tensor is None:
                    continue
                t = tensor.double()
                rr = r.to(t.device)
                projected = t - torch.outer(rr, rr @ t) if t.dim() == 2 else t - rr * (rr @ t)
                tensor.copy_(projected.to(tensor.dtype))
    return target
