"""Interventions: what to do to a site's value while the model runs, one name per act.

``Zero``, ``Scale``, ``Add``, ``Set``, ``Mean``, ``Patch`` and ``Apply`` are steering leaves
(:mod:`lsi.core.steering`): usable in ``lm.intervene(...)``, composed with ``+`` and, all but ``Patch`` (holds a
cache) and ``Apply`` (holds a function), saved and loaded. Each names a site (patterns and head/neuron indices
allowed), the positions it touches and its scope during generation: ``"prompt"`` (the prompt's forward pass),
``"generated"`` (every generated token) or ``"all"``. ``positions`` selects among prompt tokens; generated tokens
are touched whole when in scope. ``model=lm`` records the model the values were made for (needed to save).

Values are checked finite when built (``factor``, ``alpha``, ``vector`` and ``alpha * vector`` in float32,
``value``) and again in the model's dtype when applied, where their shapes are checked against the site: a stored
value broadcasts against one position of the site's value (``lm.site_shape(site)[2:]``, e.g. ``[d_model]`` for
``attn.head_out[2]``, ``[]`` for ``mlp.post[17]``, ``[2]`` for ``mlp.post[3,17]``), or has the site's full shape.
While an ``Add`` is applied, every forward pass checks that the logits stay finite. Interventions never modify a
tensor in place: they return new values.

Example:
    >>> import torch
    >>> op = Scale("blocks.0.attn.head_out[1]", 0.0, positions="last")
    >>> str(op.site), op.scope
    ('blocks.0.attn.head_out[1]', 'all')
    >>> Add("blocks.0.resid_post", torch.ones(4)).transform(torch.zeros(1, 2, 4), None).sum().item()
    8.0
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from lsi.core.folding import Folding, add_to_stream, check_everywhere, scale_units, unit_layers, writer_name
from lsi.core.identity import ModelIdentity, as_identity
from lsi.core.positions import Positions, PositionSpec, as_positions
from lsi.core.sites import Site
from lsi.core.steering import (
    Scope,
    Steering,
    check_finite,
    check_number,
    check_scaled,
    check_scope,
    compose,
    positions_from_json,
    positions_json,
)
from lsi.errors import NotFoldableError, NotSerializableError, ShapeMismatchError

if TYPE_CHECKING:
    from lsi.core.cache import ActivationCache
    from lsi.core.inputs import Batch, Inputs
    from lsi.core.model import LanguageModel


@dataclass(frozen=True)
class OpContext:
    """What an intervention may need besides the value: the concrete site, the head/neuron selection and the
    attention mask of the tokens in this forward pass."""

    site: Site
    select: Callable[[torch.Tensor], torch.Tensor]
    attention_mask: torch.Tensor | None = None


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Intervention(Steering):
    """Base class: ``site``, ``positions``, ``scope`` and ``model``; subclasses define :meth:`transform`."""

    site: Site
    positions: Positions = field(default_factory=lambda: as_positions(None))
    scope: Scope = "all"
    model: ModelIdentity | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "site", Site.parse(self.site))
        object.__setattr__(self, "positions", as_positions(self.positions))
        object.__setattr__(self, "model", as_identity(self.model))
        check_scope(self.scope)

    def transform(self, x: torch.Tensor, ctx: OpContext | None) -> torch.Tensor:
        raise NotImplementedError

    def _check(self, lm: LanguageModel) -> None:
        """Refuse values that do not fit ``lm`` (shapes, finiteness in its dtype)."""

    def _ops(self, lm: LanguageModel) -> list[Intervention]:
        self._check(lm)
        return [self]

    def _values(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """JSON fields and tensors of this operation besides site, positions and scope."""
        return {}, {}

    def _record(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        meta, tensors = self._values()
        return {"site": str(self.site), "positions": positions_json(self.positions), "scope": self.scope,
                **meta}, tensors

    @classmethod
    def _where(cls, meta: dict[str, Any], model: ModelIdentity) -> dict[str, Any]:
        return {"positions": positions_from_json(meta["positions"]), "scope": meta["scope"], "model": model}

    def _details(self) -> str:
        return ""

    def __repr__(self) -> str:
        where = "" if str(self.positions) == "all" else f", positions={self.positions}"
        where += "" if self.scope == "all" else f", scope={self.scope}"
        return f"{type(self).__name__}({self.site}{self._details()}{where})"


def _to(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return value.to(device=like.device, dtype=like.dtype)


def _check_broadcast(value: torch.Tensor, x: torch.Tensor, what: str, site: Site) -> None:
    if value.shape == x.shape[-1:]:  # the common case (one vector) needs no broadcast check
        return
    try:
        torch.broadcast_shapes(value.shape, x.shape)
    except RuntimeError:
        raise ShapeMismatchError(f"a {what} broadcastable to {tuple(x.shape)} at {site}",
                                 f"shape {tuple(value.shape)}",
                                 f"give a tensor of shape {tuple(x.shape[-1:])} (one vector) or {tuple(x.shape)}",
                                 ) from None


def _check_fits(lm: LanguageModel, site: Site, value: torch.Tensor, what: str) -> None:
    """A stored value must broadcast to one position of every concrete site's value (a value with more dimensions
    than one position covers batch and positions too, and is checked against the value in the forward pass)."""
    for s in lm.resolve_sites(site):
        one = lm.site_shape(s)[2:]
        if value.dim() > len(one):
            continue
        try:
            fits = torch.broadcast_shapes(value.shape, one) == one
        except RuntimeError:
            fits = False
        if not fits:
            raise ShapeMismatchError(f"a {what} of shape {one} for {s} (its value at one position)",
                                     f"shape {tuple(value.shape)}",
                                     "give one position's value: [d_model] for a residual state or a head's output, "
                                     "[d_head] for attn.z[h], [] for one neuron, [k] for k neurons")


def _stored(value: Any, what: str) -> torch.Tensor:
    """``value`` as a tensor (integers as float32), checked finite; kept as given otherwise (gradients flow)."""
    v = torch.as_tensor(value)
    if not (v.is_floating_point() or v.is_complex()):
        v = v.float()
    check_finite(v, what, "pass finite values (e.g. a mean over reference inputs with real tokens)")
    return v


class Zero(Intervention):
    """Zero ablation: ``x <- 0``."""

    def __init__(self, site: str | Site, *, positions: PositionSpec = None, scope: Scope = "all",
                 model: LanguageModel | ModelIdentity | None = None) -> None:
        super().__init__(site=site, positions=positions, scope=scope, model=model)  # type: ignore[arg-type]

    def transform(self, x: torch.Tensor, ctx: OpContext | None) -> torch.Tensor:
        return torch.zeros_like(x)

    def folding(self, lm: LanguageModel) -> Folding:
        """Heads or neurons zeroed at every position: their projection columns times 0."""
        layers = unit_layers(lm, self)
        return Folding(lambda target: scale_units(target, self.site, 0.0), layers=layers, rewrites=layers)

    @classmethod
    def _restore(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], model: ModelIdentity) -> Zero:
        return cls(meta["site"], **cls._where(meta, model))


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Scale(Intervention):
    """``x <- factor * x`` (``factor=0`` zeroes, ``2`` doubles)."""

    factor: float

    def __init__(self, site: str | Site, factor: float, *, positions: PositionSpec = None, scope: Scope = "all",
                 model: LanguageModel | ModelIdentity | None = None) -> None:
        object.__setattr__(self, "factor", check_number(factor, "factor"))
        super().__init__(site=site, positions=positions, scope=scope, model=model)  # type: ignore[arg-type]

    def transform(self, x: torch.Tensor, ctx: OpContext | None) -> torch.Tensor:
        return x * self.factor

    def _check(self, lm: LanguageModel) -> None:
        check_scaled(self.factor, torch.ones(()), lm.weights.W_E.dtype, f"factor at {self.site}")

    def folding(self, lm: LanguageModel) -> Folding:
        """Heads or neurons scaled at every position: their projection columns times ``factor``."""
        layers = unit_layers(lm, self)
        return Folding(lambda target: scale_units(target, self.site, self.factor), layers=layers, rewrites=layers)

    def _values(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"factor": self.factor}, {}

    @classmethod
    def _restore(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], model: ModelIdentity) -> Scale:
        return cls(meta["site"], meta["factor"], **cls._where(meta, model))

    def _details(self) -> str:
        return f", factor={self.factor:g}"


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Add(Intervention):
    """``x <- x + alpha * vector`` (``vector`` broadcasts against the site's value, e.g. shape ``[d_model]``); a
    site pattern such as ``blocks.*.resid_pre`` adds at every matching layer.

    Example:
        >>> import torch
        >>> Add("blocks.2.resid_pre", torch.ones(8), 4.0, positions="last")
        Add(blocks.2.resid_pre, alpha=4, |vector|=2.83, positions=last)
    """

    vector: torch.Tensor
    alpha: float = 1.0

    def __init__(self, site: str | Site, vector: torch.Tensor, alpha: float = 1.0, *,
                 positions: PositionSpec = None, scope: Scope = "all",
                 model: LanguageModel | ModelIdentity | None = None) -> None:
        object.__setattr__(self, "vector", _stored(vector, "vector"))
        object.__setattr__(self, "alpha", check_number(alpha, "alpha"))
        super().__init__(site=site, positions=positions, scope=scope, model=model)  # type: ignore[arg-type]
        check_scaled(self.alpha, self.vector, torch.float32, f"vector at {self.site}")

    def transform(self, x: torch.Tensor, ctx: OpContext | None) -> torch.Tensor:
        _check_broadcast(self.vector, x, "vector", self.site)
        return x + self.alpha * _to(self.vector, x)

    def _check(self, lm: LanguageModel) -> None:
        _check_fits(lm, self.site, self.vector, "vector")
        check_scaled(self.alpha, self.vector, lm.weights.W_E.dtype, f"vector at {self.site}")

    def folding(self, lm: LanguageModel) -> Folding:
        """A vector added at every position of a residual-stream site: a bias on the module that writes just
        before it (``resid_pre`` (l > 0), ``resid_post`` / ``mlp.out`` -> the layer's MLP down projection;
        ``resid_mid`` / ``attn.out`` -> its attention output projection; ``embed`` / ``blocks.0.resid_pre`` ->
        every row of the token embedding), see :func:`~lsi.core.folding.add_to_stream`."""
        check_everywhere(self, "an addition")
        if self.vector.dim() != 1:
            raise NotFoldableError("an addition of one vector [d_model]", f"{self!r} of shape "
                                   f"{tuple(self.vector.shape)}", "apply it with hooks instead of exporting it")
        sites = lm.resolve_sites(self.site)
        layers = frozenset(int(n.split(".")[1]) for n in {writer_name(s) for s in sites} - {"embed"})
        vector = self.vector.detach().double().cpu()
        return Folding(lambda target: add_to_stream(target, sites, self.alpha * vector), layers=layers,
                       adds=vector)

    def _values(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"alpha": self.alpha}, {"vector": self.vector}

    @classmethod
    def _restore(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], model: ModelIdentity) -> Add:
        return cls(meta["site"], tensors["vector"], meta["alpha"], **cls._where(meta, model))

    def _details(self) -> str:
        return f", alpha={self.alpha:g}, |vector|={float(self.vector.detach().norm()):.3g}"


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Set(Intervention):
    """``x <- value`` (broadcast); :class:`Mean` is the same with a mean over reference data."""

    value: torch.Tensor

    def __init__(self, site: str | Site, value: torch.Tensor, *, positions: PositionSpec = None,
                 scope: Scope = "all", model: LanguageModel | ModelIdentity | None = None) -> None:
        object.__setattr__(self, "value", _stored(value, "value"))
        super().__init__(site=site, positions=positions, scope=scope, model=model)  # type: ignore[arg-type]

    def transform(self, x: torch.Tensor, ctx: OpContext | None) -> torch.Tensor:
        _check_broadcast(self.value, x, "value", self.site)
        return _to(self.value, x).expand_as(x)

    def _check(self, lm: LanguageModel) -> None:
        _check_fits(lm, self.site, self.value, "value")
        check_scaled(1.0, self.value, lm.weights.W_E.dtype, f"value at {self.site}")

    def _values(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {}, {"value": self.value}

    @classmethod
    def _restore(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], model: ModelIdentity) -> Set:
        return cls(meta["site"], tensors["value"], **cls._where(meta, model))

    def _details(self) -> str:
        return f", value shape {tuple(self.value.shape)}"


class Mean(Set):
    """Mean ablation: ``x <- E[x]`` from given statistics (e.g. ``cache.mean(site)`` over a reference set), or
    computed over reference inputs by :meth:`Mean.of`."""

    @classmethod
    def of(cls, lm: LanguageModel, sites: str | Site | Sequence[str | Site], reference: Inputs | Batch, *,
           positions: PositionSpec = None, scope: Scope = "all", batch_size: int = 32) -> Steering:
        """Mean ablation of every site (patterns expanded to one site per layer): each set, at ``positions``, to
        its mean over the real tokens of ``reference``, computed once here (:func:`reference_means`).

        Example:
            >>> import lsi
            >>> from lsi.testing import tiny_model
            >>> lm = lsi.LanguageModel(tiny_model("gpt2"))
            >>> Mean.of(lm, ["blocks.*.mlp.post[3]"], [[5, 6], [7]])
            Mean(blocks.0.mlp.post[3], value shape ()) + Mean(blocks.1.mlp.post[3], value shape ())
        """
        concrete = lm.resolve_sites([sites] if isinstance(sites, (str, Site)) else list(sites))
        means = reference_means(lm, reference, concrete, batch_size=batch_size)
        return compose(cls(s, m, positions=positions, scope=scope, model=lm) for s, m in zip(concrete, means,
                                                                                              strict=True))


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Patch(Intervention):
    """``x <- source[site]``: the same site's value from another run (same batch size and sequence length).

    ``source`` is an :class:`ActivationCache` holding the full site (run without ``positions=``), or a tensor
    with the site's full shape. Patches apply to the prompt (scope ``"prompt"``) by default. In memory only.
    """

    source: Any

    def __init__(self, site: str | Site, source: ActivationCache | torch.Tensor, *, positions: PositionSpec = None,
                 scope: Scope = "prompt", model: LanguageModel | ModelIdentity | None = None) -> None:
        object.__setattr__(self, "source", source)
        super().__init__(site=site, positions=positions, scope=scope, model=model)  # type: ignore[arg-type]

    def transform(self, x: torch.Tensor, ctx: OpContext | None) -> torch.Tensor:
        assert ctx is not None
        if isinstance(self.source, torch.Tensor):
            full = self.source
        else:
            full = self.source.full(ctx.site)
            _check_same_padding(self.source.attention_mask, ctx.attention_mask, ctx.site)
        src = ctx.select(full)
        if src.shape != x.shape:
            raise ShapeMismatchError(
                f"a patch source shaped like the site {tuple(x.shape)} at {ctx.site}", f"{tuple(src.shape)}",
                "run the source with the same batch size and token length (pad or align the prompts), "
                "and cache it without positions=")
        return _to(src, x)

    def _values(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        raise NotSerializableError("saveable leaves", f"{self!r}: a patch holds another run's activations",
                                   "keep it in memory, or save a Set of the values instead")

    def _details(self) -> str:
        return f", source={type(self.source).__name__}"


def _check_same_padding(source: torch.Tensor | None, current: torch.Tensor | None, site: Site) -> None:
    if source is None or current is None or source.shape != current.shape:
        return  # shape mismatches are reported with the values' shapes
    if not torch.equal(source.to(current.device).bool(), current.bool()):
        raise ShapeMismatchError(
            f"a patch source whose real tokens sit at the same positions as this run's (at {site})",
            "a different padding layout (e.g. right-padded source, left-padded generate)",
            "run the source with the same inputs and padding side (lm.to_batch(..., padding_side='left') "
            "matches generate), or pass an aligned tensor as source")


@dataclass(frozen=True, kw_only=True, eq=False, repr=False)
class Apply(Intervention):
    """``x <- fn(x)`` for any function returning a tensor of the same shape. In memory only."""

    fn: Callable[[torch.Tensor], torch.Tensor]

    def __init__(self, site: str | Site, fn: Callable[[torch.Tensor], torch.Tensor], *,
                 positions: PositionSpec = None, scope: Scope = "all",
                 model: LanguageModel | ModelIdentity | None = None) -> None:
        object.__setattr__(self, "fn", fn)
        super().__init__(site=site, positions=positions, scope=scope, model=model)  # type: ignore[arg-type]

    def transform(self, x: torch.Tensor, ctx: OpContext | None) -> torch.Tensor:
        out = self.fn(x)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            found = type(out).__name__ if not isinstance(out, torch.Tensor) else f"shape {tuple(out.shape)}"
            raise ShapeMismatchError(f"fn to return a tensor of shape {tuple(x.shape)} at {self.site}", found,
                                     "return a tensor shaped like the input")
        return out

    def _values(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        raise NotSerializableError("saveable leaves", f"{self!r}: a Python function has no saved form",
                                   "keep it in memory, or express it with Zero / Scale / Add / Set / Mean")

    def _details(self) -> str:
        return f", fn={getattr(self.fn, '__name__', type(self.fn).__name__)}"


def reference_means(lm: LanguageModel, inputs: Inputs | Batch, sites: str | Site | Sequence[str | Site], *,
                    batch_size: int = 32) -> list[torch.Tensor]:
    """The mean of each concrete site's value over every real token of ``inputs`` (streamed ``batch_size`` rows
    at a time), shaped like one position of the site (``lm.site_shape(site)[2:]``), float32 on the CPU.

    Example:
        >>> import lsi
        >>> from lsi.testing import tiny_model
        >>> lm = lsi.LanguageModel(tiny_model("gpt2"))
        >>> [tuple(m.shape) for m in reference_means(lm, [[5, 6], [7]], ["blocks.0.mlp.post[3]", "embed"])]
        [(), (32,)]
    """
    concrete = lm.resolve_sites([sites] if isinstance(sites, (str, Site)) else list(sites))
    keys = sorted({str(s.without_index()) for s in concrete})
    totals = [torch.zeros((), dtype=torch.float64) for _ in concrete]
    count = 0
    for batch in lm.batches(inputs, batch_size):
        cache = lm.run_with_cache(batch, keys)
        real = batch.attention_mask.bool()
        for i, s in enumerate(concrete):
            value = cache[s]
            totals[i] = totals[i] + value[real.to(value.device)].double().sum(0).cpu()
        count += int(real.sum())
    return [(t / count).float() for t in totals]
