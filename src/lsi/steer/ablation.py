"""Steering objects (directional ablation, vector addition) and weight orthogonalization.

Both are :class:`~lsi.steer.base.Steering` objects: applied in a ``with`` block, composed with ``+``, saved and
loaded with model checks (see :mod:`lsi.steer.base`).

* :class:`DirectionalAblation` (Arditi et al. 2024): ``x <- x - r̂ r̂ᵀ x`` at every layer's input (``resid_pre``)
  and every ``attn.out`` and ``mlp.out``, at all positions.
* :class:`AddVector` (contrastive activation addition): ``x <- x + alpha * v`` at one site.
* :func:`orthogonalize`: ``W <- W - r̂ r̂ᵀ W`` (and ``b <- b - r̂ r̂ᵀ b``) for every module that writes to the
  residual stream; the resulting model equals :class:`DirectionalAblation` hooks up to float rounding.

Non-finite values: directions, vectors and ``alpha`` must be finite (and ``alpha * v`` finite in the model's
dtype); while an :class:`AddVector` is applied, every forward pass checks that the logits stay finite and raises
:class:`NonFiniteSteeringError` naming the additions otherwise.

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

import copy as copy_module
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lsi.arch.dims import get_module, linear_weight
from lsi.core.interventions import Add, Apply, Intervention, Scope
from lsi.core.positions import All, Positions, PositionSpec, as_positions
from lsi.core.sites import Site
from lsi.errors import InputError, NotFoldableError, ShapeMismatchError
from lsi.steer.base import (
    ModelSignature,
    Steering,
    as_signature,
    check_scaled,
    check_scope,
    check_width,
    finite_vector,
    positions_from_json,
    positions_json,
)

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel

DEFAULT_ABLATION_SITES = ("blocks.*.resid_pre", "blocks.*.attn.out", "blocks.*.mlp.out")


# -- steering objects -----------------------------------------------------------------------------------------------
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
    model: ModelSignature | None = None

    def __init__(self, direction: torch.Tensor, sites: str | Sequence[str | Site] = DEFAULT_ABLATION_SITES, *,
                 model: LanguageModel | ModelSignature | None = None) -> None:
        r = finite_vector(direction, "direction")
        if float(r.norm()) == 0.0:
            raise InputError("a non-zero direction", "the zero vector", "check that the two sets differ")
        names = [sites] if isinstance(sites, (str, Site)) else list(sites)
        object.__setattr__(self, "direction", r)
        object.__setattr__(self, "sites", tuple(str(Site.parse(s)) for s in names))
        object.__setattr__(self, "model", as_signature(model))

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

    def _record(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"sites": list(self.sites)}, {"direction": self.direction}

    @classmethod
    def _restore(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor],
                 model: ModelSignature) -> DirectionalAblation:
        return cls(tensors["direction"], meta["sites"], model=model)

    def __repr__(self) -> str:
        return f"DirectionalAblation(d={self.direction.numel()}, sites={list(self.sites)})"


@dataclass(frozen=True, eq=False, repr=False)
class AddVector(Steering):
    """Contrastive activation addition: ``x <- x + alpha * vector`` at ``site`` (a site pattern such as
    ``blocks.*.resid_pre`` adds at every matching layer), at ``positions`` of the prompt, with ``scope``
    ``"all"`` / ``"prompt"`` / ``"generated"`` during generation (see :mod:`lsi.core.interventions`).

    Example:
        >>> import torch
        >>> AddVector("blocks.2.resid_pre", torch.ones(8), 4.0)
        AddVector(blocks.2.resid_pre, alpha=4, |vector|=2.83, positions=all, scope=all)
    """

    site: str
    vector: torch.Tensor
    alpha: float = 1.0
    positions: Positions = dataclasses.field(default_factory=All)
    scope: Scope = "all"
    model: ModelSignature | None = None
    checks_logits = True

    def __init__(self, site: str | Site, vector: torch.Tensor, alpha: float = 1.0, *,
                 positions: PositionSpec = "all", scope: Scope = "all",
                 model: LanguageModel | ModelSignature | None = None) -> None:
        v = finite_vector(vector, "vector")
        check_scope(scope)
        object.__setattr__(self, "site", str(Site.parse(site)))
        object.__setattr__(self, "vector", v)
        object.__setattr__(self, "alpha", float(alpha))
        object.__setattr__(self, "positions", as_positions(positions))
        object.__setattr__(self, "scope", scope)
        object.__setattr__(self, "model", as_signature(model))
        check_scaled(self.alpha, self.vector, torch.float32, f"vector at {self.site}")

    def _ops(self, lm: LanguageModel) -> list[Intervention]:
        check_width(lm, [self.site], self.vector.numel(), "a vector")
        check_scaled(self.alpha, self.vector, lm.weights.W_E.dtype, f"vector at {self.site}")
        return [Add(self.site, self.vector, self.alpha, positions=self.positions, scope=self.scope)]

    def _record(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return ({"site": self.site, "alpha": self.alpha, "positions": positions_json(self.positions),
                 "scope": self.scope}, {"vector": self.vector})

    @classmethod
    def _restore(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], model: ModelSignature) -> AddVector:
        return cls(meta["site"], tensors["vector"], meta["alpha"], positions=positions_from_json(meta["positions"]),
                   scope=meta["scope"], model=model)

    def __repr__(self) -> str:
        return (f"AddVector({self.site}, alpha={self.alpha:g}, |vector|={float(self.vector.norm()):.3g}, "
                f"positions={self.positions}, scope={self.scope})")


# -- weights that write to the residual stream ----------------------------------------------------------------------
@dataclass(frozen=True)
class Writer:
    """A module whose output is added to the residual stream as is (``name``: ``embed``, ``pos_embed``,
    ``blocks.{l}.attn.out`` or ``blocks.{l}.mlp.out``; ``path``: its dotted module path)."""

    name: str
    path: str
    module: Any
    conv1d: bool = False

    @property
    def weight(self) -> torch.Tensor:
        """``[d_model, inputs]`` view of the weight (edits write through): each column is written to the stream."""
        if isinstance(self.module, nn.Embedding):
            return self.module.weight.T
        return linear_weight(self.module, self.conv1d)

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)


def _passes_through(lm: LanguageModel, layer: int, out_path: str, container: str, proj: str) -> None:
    """Refuse a block whose output site is a transformation of the projection's output (a post-norm)."""
    module = get_module(lm.model, lm.spec.layer_path(layer, out_path))
    if out_path != container and not isinstance(module, (nn.Dropout, nn.Identity)):
        raise NotFoldableError(
            f"{proj} writing to the residual stream as is (in {lm.family})",
            f"{out_path} ({type(module).__name__}) between {proj} and the residual stream",
            "a norm after the projection rescales its output per token, so editing the projection's weights does not "
            "equal projecting the normed output; steer this model with hooks (steer.apply(lm)) instead")


def residual_writers(lm: LanguageModel) -> list[Writer]:
    """Every module whose output the residual stream adds as is: the token embedding, a learned positional
    embedding, and per layer the attention output projection and the MLP down projection.

    Raises :class:`NotFoldableError` for families with post-attention / post-MLP norms (gemma2, olmo2).
    """
    spec = lm.spec
    writers = [Writer("embed", spec.embed, get_module(lm.model, spec.embed))]
    if spec.pos_embed is not None:
        writers.append(Writer("pos_embed", spec.pos_embed, get_module(lm.model, spec.pos_embed)))
    for layer in range(lm.dims.n_layers):
        _passes_through(lm, layer, spec.attn_out, spec.attn, spec.o_proj)
        _passes_through(lm, layer, spec.mlp_out, spec.mlp_down.rsplit(".", 1)[0], spec.mlp_down)
        for name, path in (("attn.out", spec.o_proj), ("mlp.out", spec.mlp_down)):
            full = spec.layer_path(layer, path)
            writers.append(Writer(f"blocks.{layer}.{name}", full, get_module(lm.model, full), spec.conv1d))
    return writers


def untie_embeddings(lm: LanguageModel) -> bool:
    """Give the unembedding its own copy of a tied embedding matrix (so editing one leaves the other), and mark
    the config untied so a saved checkpoint keeps both. Returns whether they were tied."""
    embed = get_module(lm.model, lm.spec.embed)
    unembed = get_module(lm.model, lm.spec.unembed)
    if unembed.weight.data_ptr() != embed.weight.data_ptr():
        return False
    unembed.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=unembed.weight.requires_grad)
    lm.model.config.tie_word_embeddings = False
    return True


def copy_model(lm: LanguageModel) -> LanguageModel:
    """A :class:`LanguageModel` over a deep copy of ``lm``'s HF model (same tokenizer and spec)."""
    from lsi.core.model import LanguageModel

    return LanguageModel(copy_module.deepcopy(lm.model), lm.tokenizer, spec=lm.spec, verify=False)


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
