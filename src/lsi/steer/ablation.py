"""Steering objects (directional ablation, vector addition) and weight orthogonalization.

A :class:`Steering` is reversible and serializable: ``steer.interventions(lm)`` gives core interventions,
``with steer.apply(lm): ...`` applies them to every forward pass and to ``lm.generate``, ``steer.save(path)`` writes
a JSON + safetensors bundle (never a pickle) and ``Steering.load(path, lm)`` reads it back for a model of the same
family, depth and width. ``a + b`` (or ``apply_all(lm, a, b)``) composes steerings; at a shared site their
interventions run in that order.

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
import functools
import operator
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, get_args

import torch
from torch import nn

from lsi.arch.dims import get_module, linear_weight
from lsi.core.bundle import load_bundle, save_bundle
from lsi.core.interventions import Add, Apply, Intervention, Scope
from lsi.core.positions import All, Index, Last, Match, Positions, PositionSpec, Span, as_positions
from lsi.core.sites import Site
from lsi.errors import InputError, ModelMismatchError, NonFiniteSteeringError, NotFoldableError, ShapeMismatchError

if TYPE_CHECKING:
    from lsi.core.hooks import HookSession
    from lsi.core.model import LanguageModel

FORMAT = 1
DEFAULT_ABLATION_SITES = ("blocks.*.resid_pre", "blocks.*.attn.out", "blocks.*.mlp.out")
S = TypeVar("S", bound="Steering")


# -- model signature ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSignature:
    """What a steering must match in a model: family, number of layers and residual width."""

    family: str
    n_layers: int
    d_model: int

    @classmethod
    def of(cls, lm: LanguageModel) -> ModelSignature:
        return cls(lm.family, lm.dims.n_layers, lm.dims.d_model)

    def check(self, lm: LanguageModel, what: str) -> None:
        found = ModelSignature.of(lm)
        if found != self:
            raise ModelMismatchError(f"{what} a {self}", f"a {found}",
                                     "derive the steering again on this model (directions do not transfer across "
                                     "models), or load the model it was made for")

    def __str__(self) -> str:
        return f"{self.family} model with n_layers={self.n_layers}, d_model={self.d_model}"


def _signature(model: LanguageModel | ModelSignature | None) -> ModelSignature | None:
    return model if model is None or isinstance(model, ModelSignature) else ModelSignature.of(model)


def _vector(value: Any, what: str) -> torch.Tensor:
    """A finite 1-D float32 CPU copy of ``value``."""
    v = torch.as_tensor(value).detach().float().cpu()
    if v.dim() != 1 or v.numel() == 0:
        raise ShapeMismatchError(f"{what} of shape [d] (one vector)", f"shape {tuple(v.shape)}",
                                 "pass a single vector, e.g. diff_in_means(...)")
    if not bool(torch.isfinite(v).all()):
        raise NonFiniteSteeringError(f"a finite {what}", f"{int((~torch.isfinite(v)).sum())} NaN/inf entries",
                                     "recompute it (check the inputs it was computed from)")
    return v.clone()


def _check_width(lm: LanguageModel, sites: Sequence[str | Site], size: int, what: str) -> None:
    """Every concrete site of ``sites`` must end in a dimension of ``size``."""
    for s in lm.resolve_sites(list(sites)):
        shape = lm.site_shape(s)
        if shape[-1] != size:
            raise ShapeMismatchError(f"{what} of size {shape[-1]} for {s} (value shape {shape})", f"size {size}",
                                     f"compute the vector at a site of this model with last dimension {shape[-1]} "
                                     "(residual sites have d_model)")


# -- steering objects -----------------------------------------------------------------------------------------------
class Steering:
    """Base class of steering objects (see the module docstring)."""

    model: ModelSignature | None = None

    def leaves(self) -> tuple[Steering, ...]:
        """The elementary steerings this one applies, in order."""
        return (self,)

    def _ops(self, lm: LanguageModel) -> list[Intervention]:
        raise NotImplementedError

    def _record(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        raise NotImplementedError

    def interventions(self, lm: LanguageModel) -> list[Intervention]:
        """Core interventions for ``lm`` (checked against the model the steering was made for)."""
        leaves = self.leaves()
        for leaf in leaves:
            if leaf.model is not None:
                leaf.model.check(lm, f"{type(leaf).__name__} made for")
        ops = [op for leaf in leaves for op in leaf._ops(lm)]
        added = [repr(leaf) for leaf in leaves if isinstance(leaf, AddVector)]
        if added:
            ops.append(Apply("logits", _finite_logits(", ".join(added))))
        return ops

    def apply(self, lm: LanguageModel) -> AbstractContextManager[HookSession]:
        """``with steer.apply(lm): ...``: steer every forward pass and ``generate`` call inside the block."""
        return lm.intervene(self.interventions(lm))

    def __add__(self, other: Steering) -> Steering:
        if not isinstance(other, Steering):
            return NotImplemented
        return Composed((*self.leaves(), *other.leaves()))

    def save(self, path: str | Path) -> Path:
        """Write ``path.json`` + ``path.safetensors``; returns the JSON path. Needs the model it was made for
        (``model=lm`` when building it)."""
        signatures = {leaf.model for leaf in self.leaves()}
        if None in signatures or len(signatures) != 1:
            raise InputError("a steering that knows its model (build it with model=lm)",
                             f"models {sorted(str(s) for s in signatures)}",
                             "pass model=lm to every steering object before saving")
        parts, tensors = [], {}
        for i, leaf in enumerate(self.leaves()):
            meta, own = leaf._record()
            parts.append({"type": type(leaf).__name__, **meta})
            tensors.update({f"{i}.{k}": v for k, v in own.items()})
        model = dataclasses.asdict(signatures.pop())  # type: ignore[arg-type]
        return save_bundle(path, tensors, {"format": FORMAT, "kind": "lsi.steering", "model": model, "parts": parts})

    @classmethod
    def load(cls: type[S], path: str | Path, lm: LanguageModel) -> S:
        """Read a steering written by :meth:`save`; refuses one made for a model of another family, depth or
        width (:class:`ModelMismatchError`)."""
        tensors, meta = load_bundle(path, what="a steering written by Steering.save",
                                    fix="save one with steer.save(path)", format=FORMAT)
        if meta.get("kind") != "lsi.steering":
            raise InputError("a steering bundle (kind 'lsi.steering')", f"kind {meta.get('kind')!r}",
                             "load it with the loader of its own kind")
        signature = ModelSignature(**meta["model"])
        signature.check(lm, "a model matching the steering, saved for")
        leaves = [_leaf_from(part, {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".")[0] == str(i)},
                             signature) for i, part in enumerate(meta["parts"])]
        loaded = leaves[0] if len(leaves) == 1 else Composed(tuple(leaves))
        if not isinstance(loaded, cls):
            raise InputError(f"a saved {cls.__name__}", f"a saved {type(loaded).__name__}",
                             f"load it with {type(loaded).__name__}.load or Steering.load")
        return loaded


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
        r = _vector(direction, "direction")
        if float(r.norm()) == 0.0:
            raise InputError("a non-zero direction", "the zero vector", "check that the two sets differ")
        names = [sites] if isinstance(sites, (str, Site)) else list(sites)
        object.__setattr__(self, "direction", r)
        object.__setattr__(self, "sites", tuple(str(Site.parse(s)) for s in names))
        object.__setattr__(self, "model", _signature(model))

    @property
    def unit(self) -> torch.Tensor:
        """``r̂`` in float64 (normalized there, so float64 models get it exact)."""
        r = self.direction.double()
        return r / r.norm()

    def _ops(self, lm: LanguageModel) -> list[Intervention]:
        _check_width(lm, self.sites, self.direction.numel(), "a direction")
        r = self.unit

        def project(x: torch.Tensor) -> torch.Tensor:
            rr = r.to(device=x.device, dtype=x.dtype)
            return x - (x @ rr)[..., None] * rr

        return [Apply(s, project) for s in self.sites]

    def _record(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"sites": list(self.sites)}, {"direction": self.direction}

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

    def __init__(self, site: str | Site, vector: torch.Tensor, alpha: float = 1.0, *,
                 positions: PositionSpec = "all", scope: Scope = "all",
                 model: LanguageModel | ModelSignature | None = None) -> None:
        v = _vector(vector, "vector")
        if scope not in get_args(Scope):
            raise InputError(f"scope in {get_args(Scope)}", repr(scope), "e.g. scope='generated'")
        object.__setattr__(self, "site", str(Site.parse(site)))
        object.__setattr__(self, "vector", v)
        object.__setattr__(self, "alpha", float(alpha))
        object.__setattr__(self, "positions", as_positions(positions))
        object.__setattr__(self, "scope", scope)
        object.__setattr__(self, "model", _signature(model))
        self._check_strength(torch.float32)

    def _check_strength(self, dtype: torch.dtype) -> None:
        scaled = self.alpha * self.vector.to(dtype)
        if not bool(torch.isfinite(scaled).all()):
            raise NonFiniteSteeringError(f"alpha * vector finite in {dtype} at {self.site}",
                                         f"alpha={self.alpha:g} with |vector|={float(self.vector.norm()):.4g} "
                                         f"({int((~torch.isfinite(scaled)).sum())} non-finite entries)",
                                         "lower alpha (or run the model in float32)")

    def _ops(self, lm: LanguageModel) -> list[Intervention]:
        _check_width(lm, [self.site], self.vector.numel(), "a vector")
        self._check_strength(lm.weights.W_E.dtype)
        return [Add(self.site, self.vector, self.alpha, positions=self.positions, scope=self.scope)]

    def _record(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return ({"site": self.site, "alpha": self.alpha, "positions": _positions_json(self.positions),
                 "scope": self.scope}, {"vector": self.vector})

    def __repr__(self) -> str:
        return (f"AddVector({self.site}, alpha={self.alpha:g}, |vector|={float(self.vector.norm()):.3g}, "
                f"positions={self.positions}, scope={self.scope})")


@dataclass(frozen=True, eq=False)
class Composed(Steering):
    """Several steerings applied together, in order (build it with ``a + b``)."""

    parts: tuple[Steering, ...]

    def leaves(self) -> tuple[Steering, ...]:
        return self.parts


def apply_all(lm: LanguageModel, *steerings: Steering) -> AbstractContextManager[HookSession]:
    """``with apply_all(lm, a, b): ...`` is ``with (a + b).apply(lm): ...``."""
    if not steerings:
        raise InputError("at least one steering", "none", "pass the steering objects to apply")
    return functools.reduce(operator.add, steerings).apply(lm)


def _finite_logits(label: str) -> Callable[[torch.Tensor], torch.Tensor]:
    def check(logits: torch.Tensor) -> torch.Tensor:
        finite = torch.isfinite(logits)
        if not bool(finite.all()):
            raise NonFiniteSteeringError(f"finite logits under {label}",
                                         f"{int((~finite).sum())} NaN/inf of {logits.numel()} logits",
                                         "lower alpha (strengths that overflow the residual stream break its "
                                         "norms), or run the model in float32")
        return logits

    return check


# -- serialization helpers ------------------------------------------------------------------------------------------
_POSITION_TYPES: dict[str, type[Positions]] = {c.__name__: c for c in (All, Last, Index, Span, Match)}


def _positions_json(positions: Positions) -> dict[str, Any]:
    name = type(positions).__name__
    if _POSITION_TYPES.get(name) is not type(positions):
        raise InputError(f"positions of a built-in selector {sorted(_POSITION_TYPES)} to save",
                         name, "use one of those selectors, or keep this steering in memory")
    return {"type": name, **dataclasses.asdict(positions)}  # type: ignore[call-overload]


def _leaf_from(part: dict[str, Any], tensors: dict[str, torch.Tensor], model: ModelSignature) -> Steering:
    kind = part.get("type")
    if kind == "DirectionalAblation":
        return DirectionalAblation(tensors["direction"], part["sites"], model=model)
    if kind == "AddVector":
        fields = dict(part["positions"])
        positions = _POSITION_TYPES[fields.pop("type")](**fields)
        return AddVector(part["site"], tensors["vector"], part["alpha"], positions=positions, scope=part["scope"],
                         model=model)
    raise InputError("a steering part of type DirectionalAblation or AddVector", repr(kind),
                     "save it again with this version of lsi")


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
    r = _vector(direction, "direction").double()
    if r.numel() != lm.dims.d_model:
        raise ShapeMismatchError(f"a direction of size d_model={lm.dims.d_model}", f"size {r.numel()}",
                                 "compute it at a residual site of this model")
    if float(r.norm()) == 0.0:
        raise InputError("a non-zero direction", "the zero vector", "check that the two sets differ")
    r = r / r.norm()
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
