"""Interventions: what to do to a site's value while the model runs.

Each intervention names a site (patterns and head/neuron indices allowed), the positions it touches and its
scope during generation: ``"prompt"`` (the prompt's forward pass), ``"generated"`` (every generated token) or
``"all"``. ``positions`` selects among prompt tokens; generated tokens are touched whole when in scope.
Interventions never modify a tensor in place: they return new values.

Example:
    >>> import torch
    >>> op = Scale("blocks.0.attn.head_out[1]", 0.0, positions="last")
    >>> str(op.site), op.scope
    ('blocks.0.attn.head_out[1]', 'all')
    >>> Add("blocks.0.resid_post", torch.ones(4)).transform(torch.zeros(1, 2, 4), None).sum().item()
    8.0
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from lsi.core.positions import Positions, PositionSpec, as_positions
from lsi.core.sites import Site
from lsi.errors import InputError, ShapeMismatchError

if TYPE_CHECKING:
    from lsi.core.cache import ActivationCache

Scope = Literal["prompt", "generated", "all"]
_SCOPES = ("prompt", "generated", "all")


@dataclass(frozen=True)
class OpContext:
    """What an intervention may need besides the value: the concrete site, the head/neuron selection and the
    attention mask of the tokens in this forward pass."""

    site: Site
    select: Callable[[torch.Tensor], torch.Tensor]
    attention_mask: torch.Tensor | None = None


@dataclass(frozen=True, kw_only=True)
class Intervention:
    """Base class: ``site``, ``positions`` and ``scope``; subclasses define :meth:`transform`."""

    site: Site
    positions: Positions = field(default_factory=lambda: as_positions(None))
    scope: Scope = "all"

    def __post_init__(self) -> None:
        object.__setattr__(self, "site", Site.parse(self.site))
        object.__setattr__(self, "positions", as_positions(self.positions))
        if self.scope not in _SCOPES:
            raise InputError(f"scope in {_SCOPES}", repr(self.scope), "e.g. scope='generated'")

    def transform(self, x: torch.Tensor, ctx: OpContext | None) -> torch.Tensor:
        raise NotImplementedError


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


class Zero(Intervention):
    """Zero ablation: ``x <- 0``."""

    def __init__(self, site: str | Site, *, positions: PositionSpec = None, scope: Scope = "all") -> None:
        super().__init__(site=site, positions=positions, scope=scope)  # type: ignore[arg-type]

    def transform(self, x: torch.Tensor, ctx: OpContext | None) -> torch.Tensor:
        return torch.zeros_like(x)


@dataclass(frozen=True, kw_only=True)
class Scale(Intervention):
    """``x <- factor * x``."""

    factor: float

    def __init__(self, site: str | Site, factor: float, *, positions: PositionSpec = None,
                 scope: Scope = "all") -> None:
        object.__setattr__(self, "factor", float(factor))
        super().__init__(site=site, positions=positions, scope=scope)  # type: ignore[arg-type]

    def transform(self, x: torch.Tensor, ctx: OpContext | None) -> torch.Tensor:
        return x * self.factor


@dataclass(frozen=True, kw_only=True)
class Add(Intervention):
    """``x <- x + alpha * vector`` (``vector`` broadcasts against the site's value, e.g. shape ``[d_model]``)."""

    vector: torch.Tensor
    alpha: float = 1.0

    def __init__(self, site: str | Site, vector: torch.Tensor, alpha: float = 1.0, *,
                 positions: PositionSpec = None, scope: Scope = "all") -> None:
        object.__setattr__(self, "vector", torch.as_tensor(vector))
        object.__setattr__(self, "alpha", float(alpha))
        super().__init__(site=site, positions=positions, scope=scope)  # type: ignore[arg-type]

    def transform(self, x: torch.Tensor, ctx: OpContext | None) -> torch.Tensor:
        _check_broadcast(self.vector, x, "vector", self.site)
        return x + self.alpha * _to(self.vector, x)


@dataclass(frozen=True, kw_only=True)
class Set(Intervention):
    """``x <- value`` (broadcast); ``Mean`` is the same with a mean computed over reference data."""

    value: torch.Tensor

    def __init__(self, site: str | Site, value: torch.Tensor, *, positions: PositionSpec = None,
                 scope: Scope = "all") -> None:
        object.__setattr__(self, "value", torch.as_tensor(value))
        super().__init__(site=site, positions=positions, scope=scope)  # type: ignore[arg-type]

    def transform(self, x: torch.Tensor, ctx: OpContext | None) -> torch.Tensor:
        _check_broadcast(self.value, x, "value", self.site)
        return _to(self.value, x).expand_as(x)


class Mean(Set):
    """Mean ablation: ``x <- E[x]`` from given statistics (e.g. ``cache.mean(site)`` over a reference set)."""


@dataclass(frozen=True, kw_only=True)
class Patch(Intervention):
    """``x <- source[site]``: the same site's value from another run (same batch size and sequence length).

    ``source`` is an :class:`ActivationCache` holding the full site (run without ``positions=``), or a tensor
    with the site's full shape. Patches apply to the prompt (scope ``"prompt"``) by default.
    """

    source: Any

    def __init__(self, site: str | Site, source: ActivationCache | torch.Tensor, *, positions: PositionSpec = None,
                 scope: Scope = "prompt") -> None:
        object.__setattr__(self, "source", source)
        super().__init__(site=site, positions=positions, scope=scope)  # type: ignore[arg-type]

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


def _check_same_padding(source: torch.Tensor | None, current: torch.Tensor | None, site: Site) -> None:
    if source is None or current is None or source.shape != current.shape:
        return  # shape mismatches are reported with the values' shapes
    if not torch.equal(source.to(current.device).bool(), current.bool()):
        raise ShapeMismatchError(
            f"a patch source whose real tokens sit at the same positions as this run's (at {site})",
            "a different padding layout (e.g. right-padded source, left-padded generate)",
            "run the source with the same inputs and padding side (lm.to_batch(..., padding_side='left') "
            "matches generate), or pass an aligned tensor as source")


@dataclass(frozen=True, kw_only=True)
class Apply(Intervention):
    """``x <- fn(x)`` for any function returning a tensor of the same shape."""

    fn: Callable[[torch.Tensor], torch.Tensor]

    def __init__(self, site: str | Site, fn: Callable[[torch.Tensor], torch.Tensor], *,
                 positions: PositionSpec = None, scope: Scope = "all") -> None:
        object.__setattr__(self, "fn", fn)
        super().__init__(site=site, positions=positions, scope=scope)  # type: ignore[arg-type]

    def transform(self, x: torch.Tensor, ctx: OpContext | None) -> torch.Tensor:
        out = self.fn(x)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            found = type(out).__name__ if not isinstance(out, torch.Tensor) else f"shape {tuple(out.shape)}"
            raise ShapeMismatchError(f"fn to return a tensor of shape {tuple(x.shape)} at {self.site}", found,
                                     "return a tensor shaped like the input")
        return out
