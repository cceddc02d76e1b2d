"""Steering vectors from a feature dictionary (an SAE or any dictionary with a decoder and an encoder).

A :class:`FeatureDictionary` has ``W_dec`` (``[n_features, d]``: row ``j`` is feature ``j``'s direction ``f_j``)
and ``encode(x) -> a`` (``[..., d] -> [..., n_features]``). Then, at one site of width ``d``:

* :func:`feature_deltas`: ``δ_j = E⁺[a_j] − E⁻[a_j]``, the feature activations averaged over every selected real
  token of the positive inputs minus the same over the negative inputs (token-weighted, like
  :func:`lsi.steer.directions.diff_in_means`);
* :func:`feature_vector`: ``v = Σ_{j∈J} δ_j f_j`` over the ``top`` features ``J`` of largest ``|δ_j|``;
* :class:`FeatureSteering`: both, returned as an :class:`~lsi.core.interventions.Add` at the site with the
  chosen feature ids.

For a linear encoder ``a = x W_decᵀ`` whose ``W_dec`` is an orthonormal basis, ``v`` with every feature kept is
exactly the difference in means of the site.

Example:
    >>> import lsi, torch
    >>> from lsi.testing import tiny_model
    >>> lm = lsi.LanguageModel(tiny_model("llama"))
    >>> class Identity:
    ...     W_dec = torch.eye(32)
    ...     def encode(self, x): return x
    >>> found = FeatureSteering.fit(lm, Identity(), [[3, 10]], [[3, 11]], "blocks.0.resid_pre", top=4)
    >>> len(found.features), str(found.steering.site)
    (4, 'blocks.0.resid_pre')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from lsi.core.interventions import Add
from lsi.core.positions import PositionSpec, as_positions
from lsi.core.sites import Site
from lsi.core.steering import Scope, check_finite
from lsi.errors import InputError, ShapeMismatchError
from lsi.steer.directions import one_site

if TYPE_CHECKING:
    from lsi.core.inputs import Batch, Inputs
    from lsi.core.model import LanguageModel


@runtime_checkable
class FeatureDictionary(Protocol):
    """What feature steering needs of a sparse autoencoder or any other feature dictionary."""

    @property
    def W_dec(self) -> torch.Tensor:
        """Decoder ``[n_features, d]``: row ``j`` is feature ``j``'s direction."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``[..., n_features]`` of site values ``[..., d]``."""


def _decoder(sae: FeatureDictionary) -> torch.Tensor:
    w = torch.as_tensor(sae.W_dec).detach()
    if w.dim() != 2:
        raise ShapeMismatchError("a decoder W_dec of shape [n_features, d]", f"shape {tuple(w.shape)}",
                                 "store one feature direction per row")
    return w


def feature_deltas(lm: LanguageModel, sae: FeatureDictionary, positive: Inputs | Batch, negative: Inputs | Batch,
                   site: str | Site, *, positions: PositionSpec = "last", batch_size: int = 64) -> torch.Tensor:
    """``δ = E⁺[a] − E⁻[a]`` ``[n_features]`` (float32, CPU): each feature's activation on the site's value, averaged
    over every selected real token of the positive inputs, minus the same over the negative inputs.

    The site must hold one ``d``-wide vector per position (``d = W_dec.shape[1]``), e.g. a residual site.
    """
    s = one_site(lm, site)
    w = _decoder(sae)
    width = lm.site_shape(s)[-1]
    if w.shape[1] != width:
        raise ShapeMismatchError(f"a dictionary of width {width} for {s} (W_dec [n_features, {width}])",
                                 f"W_dec of shape {tuple(w.shape)}", "train or load the dictionary for this site")
    selector = as_positions(positions)

    def mean(inputs: Inputs | Batch) -> torch.Tensor:
        total, count = torch.zeros(w.shape[0], dtype=torch.float64), 0
        for batch in lm.batches(inputs, batch_size):
            value = lm.run_with_cache(batch, sites=[s])[s]
            tokens = value[selector.mask(batch.input_ids, batch.attention_mask).to(value.device)]  # [n, d]
            a = sae.encode(tokens)
            if tuple(a.shape) != (tokens.shape[0], w.shape[0]):
                raise ShapeMismatchError(f"encode to return [tokens, n_features={w.shape[0]}]",
                                         f"shape {tuple(a.shape)} for input {tuple(tokens.shape)}",
                                         "make encode map [..., d] to [..., n_features]")
            total += a.detach().double().sum(0).cpu()
            count += tokens.shape[0]
        if count == 0:
            raise InputError(f"positions={selector} to select at least one real token", "none",
                             "choose positions the inputs have")
        return total / count

    deltas = (mean(positive) - mean(negative)).float()
    check_finite(deltas, "feature deltas", "check the dictionary's encoder on these activations")
    return deltas


def feature_vector(sae: FeatureDictionary, deltas: torch.Tensor, *,
                   top: int | None = None) -> tuple[torch.Tensor, list[int]]:
    """``(v, J)``: ``v = Σ_{j∈J} δ_j f_j`` ``[d]`` (float32) over the ``top`` features of largest ``|δ_j|``
    (every feature for ``top=None``), and ``J``, largest first.

    Example:
        >>> class Toy:
        ...     W_dec = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
        ...     def encode(self, x): return x @ self.W_dec.T
        >>> feature_vector(Toy(), torch.tensor([0.5, -3.0, 0.1]), top=2)
        (tensor([ 0.5000, -6.0000]), [1, 0])
    """
    w = _decoder(sae)
    d = torch.as_tensor(deltas).detach().cpu()
    if d.shape != (w.shape[0],):
        raise ShapeMismatchError(f"one delta per feature ([{w.shape[0]}])", f"shape {tuple(d.shape)}",
                                 "compute them with feature_deltas(lm, sae, ...)")
    n = w.shape[0] if top is None else top
    if not 1 <= n <= w.shape[0]:
        raise InputError(f"top in [1, {w.shape[0]}] (the number of features)", str(top), "e.g. top=10")
    chosen = torch.argsort(d.abs(), descending=True, stable=True)[:n]
    vector = d[chosen].double() @ w[chosen].double().cpu()
    return vector.float(), chosen.tolist()


@dataclass(frozen=True)
class FeatureSteering:
    """A feature-dictionary steering vector: ``steering`` adds ``alpha · Σ_{j∈J} δ_j f_j`` at the site (an
    :class:`~lsi.core.interventions.Add`), ``features`` is ``J`` (largest ``|δ_j|`` first) and ``deltas`` every
    ``δ_j``."""

    steering: Add
    features: list[int]
    deltas: torch.Tensor

    @classmethod
    def fit(cls, lm: LanguageModel, sae: FeatureDictionary, positive: Inputs | Batch, negative: Inputs | Batch,
            site: str | Site, *, top: int | None = None, alpha: float = 1.0, positions: PositionSpec = "last",
            scope: Scope = "all", batch_size: int = 64) -> FeatureSteering:
        """:func:`feature_deltas` read at ``positions``, then :func:`feature_vector`, added at every position of
        ``site`` (in ``scope``) with strength ``alpha``."""
        deltas = feature_deltas(lm, sae, positive, negative, site, positions=positions, batch_size=batch_size)
        vector, chosen = feature_vector(sae, deltas, top=top)
        return cls(Add(site, vector, alpha, scope=scope, model=lm), chosen, deltas)
