"""The steering contract: reversible, composable, serializable interventions checked against their model.

A :class:`Steering` is built from elementary *leaves*. A leaf contributes hook interventions
(:meth:`Steering._ops`: what happens to site values while the model runs) and / or additive weight deltas
(:meth:`Steering._deltas`: ``{parameter name: Δ}``, e.g. a rank-one edit or a merged task vector).

* ``with steer.apply(lm): ...`` adds the deltas to the weights (restored bit-exactly on exit) and runs the hooks
  in every forward pass and ``lm.generate`` call inside the block;
* ``a + b`` (or :func:`apply_all`) composes steerings; at a shared site their interventions run in that order;
* ``steer.save(path)`` writes ``path.json`` + ``path.safetensors`` (never a pickle) and ``Steering.load(path, lm)``
  reads it back, refusing a model of another family, depth or width, and for weight deltas a model whose edited
  parameters are not the ones the deltas were computed on (:class:`ModelMismatchError`).

A leaf type registers itself by subclassing :class:`Steering` and implementing ``_record`` (JSON metadata and
tensors) and ``_restore`` (the inverse). :class:`WeightEdit` is the one leaf for every weight-space method.

Example:
    >>> import lsi, torch
    >>> from lsi.testing import tiny_model
    >>> lm = lsi.LanguageModel(tiny_model("gpt2"))
    >>> name = "transformer.h.0.mlp.c_proj.bias"
    >>> edit = WeightEdit.of(lm, {name: torch.ones(32)}, label="demo")
    >>> before = lm.forward([[5, 6, 7]])
    >>> with edit.apply(lm):
    ...     changed = not torch.equal(lm.forward([[5, 6, 7]]), before)
    >>> changed, torch.equal(lm.forward([[5, 6, 7]]), before)
    (True, True)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import operator
import pkgutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, get_args

import torch

from lsi.core.bundle import load_bundle, save_bundle
from lsi.core.interventions import Apply, Intervention, Scope
from lsi.core.positions import All, Index, Last, Match, Positions, Span
from lsi.core.sites import Site
from lsi.errors import InputError, ModelMismatchError, NonFiniteSteeringError, ShapeMismatchError

if TYPE_CHECKING:
    from lsi.core.hooks import HookSession
    from lsi.core.model import LanguageModel

FORMAT = 1
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


def as_signature(model: LanguageModel | ModelSignature | None) -> ModelSignature | None:
    """``None``, a signature as is, or the signature of a model."""
    return model if model is None or isinstance(model, ModelSignature) else ModelSignature.of(model)


# -- value checks ---------------------------------------------------------------------------------------------------
def finite_vector(value: Any, what: str) -> torch.Tensor:
    """A finite 1-D float32 CPU copy of ``value``."""
    v = torch.as_tensor(value).detach().float().cpu()
    if v.dim() != 1 or v.numel() == 0:
        raise ShapeMismatchError(f"{what} of shape [d] (one vector)", f"shape {tuple(v.shape)}",
                                 "pass a single vector, e.g. diff_in_means(...)")
    check_finite(v, what)
    return v.clone()


def check_finite(value: torch.Tensor, what: str, fix: str = "recompute it (check the inputs it was computed "
                                                            "from)") -> None:
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        raise NonFiniteSteeringError(f"a finite {what}", f"{int((~finite).sum())} NaN/inf entries", fix)


def check_scope(scope: str) -> Scope:
    """``scope`` if it is one of ``"prompt"``, ``"generated"``, ``"all"``."""
    if scope not in get_args(Scope):
        raise InputError(f"scope in {get_args(Scope)}", repr(scope), "e.g. scope='generated'")
    return scope  # type: ignore[return-value]


def check_scaled(alpha: float, values: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Refuse a strength whose ``alpha * values`` is not finite in ``dtype`` (e.g. overflows float16)."""
    scaled = alpha * values.to(dtype)
    if not bool(torch.isfinite(scaled).all()):
        raise NonFiniteSteeringError(f"alpha * {what} finite in {dtype}",
                                     f"alpha={alpha:g} with max |value|={float(values.abs().max()):.4g} "
                                     f"({int((~torch.isfinite(scaled)).sum())} non-finite entries)",
                                     "lower alpha (or run the model in float32)")


def check_width(lm: LanguageModel, sites: Sequence[str | Site], size: int, what: str) -> None:
    """Every concrete site of ``sites`` must end in a dimension of ``size``."""
    for s in lm.resolve_sites(list(sites)):
        shape = lm.site_shape(s)
        if shape[-1] != size:
            raise ShapeMismatchError(f"{what} of size {shape[-1]} for {s} (value shape {shape})", f"size {size}",
                                     f"compute the vector at a site of this model with last dimension {shape[-1]} "
                                     "(residual sites have d_model)")


def finite_logits(label: str) -> Intervention:
    """An intervention on the logits that raises :class:`NonFiniteSteeringError` naming ``label`` when any logit
    is NaN or infinite (added by steerings whose strength can overflow the residual stream)."""

    def check(logits: torch.Tensor) -> torch.Tensor:
        finite = torch.isfinite(logits)
        if not bool(finite.all()):
            raise NonFiniteSteeringError(f"finite logits under {label}",
                                         f"{int((~finite).sum())} NaN/inf of {logits.numel()} logits",
                                         "lower the strength (strengths that overflow the residual stream break "
                                         "its norms), or run the model in float32")
        return logits

    return Apply("logits", check)


# -- steering objects -----------------------------------------------------------------------------------------------
class Steering:
    """Base class of steering objects (see the module docstring)."""

    model: ModelSignature | None = None
    checks_logits: ClassVar[bool] = False  # True: a forward pass under this leaf checks the logits are finite
    _types: ClassVar[dict[str, type[Steering]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__name__ != "Composed":
            Steering._types[cls.__name__] = cls

    def leaves(self) -> tuple[Steering, ...]:
        """The elementary steerings this one applies, in order."""
        return (self,)

    def _ops(self, lm: LanguageModel) -> list[Intervention]:
        """Hook interventions of this leaf (checked against ``lm``)."""
        return []

    def _deltas(self, lm: LanguageModel) -> dict[str, torch.Tensor]:
        """Additive weight deltas of this leaf: ``{parameter name: Δ}`` (checked against ``lm``)."""
        return {}

    def _record(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        raise NotImplementedError

    @classmethod
    def _restore(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], model: ModelSignature) -> Steering:
        raise NotImplementedError

    def _checked_leaves(self, lm: LanguageModel) -> tuple[Steering, ...]:
        leaves = self.leaves()
        for leaf in leaves:
            if leaf.model is not None:
                leaf.model.check(lm, f"{type(leaf).__name__} made for")
        return leaves

    def interventions(self, lm: LanguageModel) -> list[Intervention]:
        """Core hook interventions for ``lm`` (checked against the model the steering was made for)."""
        leaves = self._checked_leaves(lm)
        ops = [op for leaf in leaves for op in leaf._ops(lm)]
        checked = [repr(leaf) for leaf in leaves if leaf.checks_logits]
        if checked:
            ops.append(finite_logits(", ".join(checked)))
        return ops

    def weight_deltas(self, lm: LanguageModel) -> dict[str, torch.Tensor]:
        """The summed weight deltas of every leaf, by parameter name (checked against ``lm``)."""
        total: dict[str, torch.Tensor] = {}
        for leaf in self._checked_leaves(lm):
            for name, delta in leaf._deltas(lm).items():
                total[name] = total[name] + delta if name in total else delta
        return total

    def apply(self, lm: LanguageModel) -> AbstractContextManager[HookSession]:
        """``with steer.apply(lm): ...``: steer every forward pass and ``generate`` call inside the block (checked
        against ``lm`` here, before the block)."""
        return _applied(lm, self.interventions(lm), self.weight_deltas(lm))

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
        width, or weight deltas computed on other weights (:class:`ModelMismatchError`)."""
        tensors, meta = load_bundle(path, what="a steering written by Steering.save",
                                    fix="save one with steer.save(path)", format=FORMAT)
        if meta.get("kind") != "lsi.steering":
            raise InputError("a steering bundle (kind 'lsi.steering')", f"kind {meta.get('kind')!r}",
                             "load it with the loader of its own kind")
        signature = ModelSignature(**meta["model"])
        signature.check(lm, "a model matching the steering, saved for")
        leaves = []
        for i, part in enumerate(meta["parts"]):
            own = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == str(i)}
            fields = {k: v for k, v in part.items() if k != "type"}
            leaves.append(_leaf_type(part.get("type"))._restore(fields, own, signature))
        loaded = leaves[0] if len(leaves) == 1 else Composed(tuple(leaves))
        if not isinstance(loaded, cls):
            raise InputError(f"a saved {cls.__name__}", f"a saved {type(loaded).__name__}",
                             f"load it with {type(loaded).__name__}.load or Steering.load")
        loaded.weight_deltas(lm)  # weight deltas: refuse other weights now, not at first use
        return loaded


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


@contextlib.contextmanager
def _applied(lm: LanguageModel, ops: list[Intervention], deltas: dict[str, torch.Tensor]) -> Iterator[HookSession]:
    with added_to_weights(lm, deltas), lm.intervene(ops) as session:
        yield session


def _leaf_type(name: Any) -> type[Steering]:
    if name not in Steering._types:  # defined in a steer module not imported yet
        import lsi.steer

        for info in pkgutil.iter_modules(lsi.steer.__path__):
            importlib.import_module(f"lsi.steer.{info.name}")
    if name not in Steering._types:
        raise InputError(f"a steering part of a known type {sorted(Steering._types)}", repr(name),
                         "save it again with this version of lsi")
    return Steering._types[name]


# -- weight deltas --------------------------------------------------------------------------------------------------
def _parameters(lm: LanguageModel, names: Sequence[str]) -> dict[str, torch.nn.Parameter]:
    params = dict(lm.model.named_parameters(remove_duplicate=False))
    missing = [n for n in names if n not in params]
    if missing:
        raise ModelMismatchError(f"parameters {missing[:3]} in the model", f"a {lm.family} model without them",
                                 "compute the edit on this model (parameter names come from model.named_parameters)")
    return {n: params[n] for n in names}


def weights_fingerprint(lm: LanguageModel, names: Sequence[str]) -> str:
    """A short hash of the named parameters' values (what a weight delta was computed on)."""
    h = hashlib.sha256()
    for name, param in sorted(_parameters(lm, names).items()):
        h.update(name.encode())
        h.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def added_to_weights(lm: LanguageModel, deltas: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Add ``deltas`` to the named parameters for the duration of the block; the exact previous values come back
    on exit (they are kept, not subtracted)."""
    params = _parameters(lm, list(deltas))
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
    """Additive weight deltas ``θ' = θ + Δ`` for named parameters, from any weight-space method (rank-one edits,
    task vectors, TIES merges, masked fine-tuning).

    ``base`` is :func:`weights_fingerprint` of the edited parameters before the edit: applying the edit to other
    weights raises :class:`ModelMismatchError`. ``label`` says what made it; ``info`` keeps JSON-ready details
    (layer, subject, how many entries moved, ...).
    """

    deltas: Mapping[str, torch.Tensor]
    base: str
    label: str = "weight edit"
    info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    model: ModelSignature | None = None

    @classmethod
    def of(cls, lm: LanguageModel, deltas: Mapping[str, torch.Tensor], *, label: str = "weight edit",
           info: Mapping[str, Any] | None = None) -> WeightEdit:
        """The edit ``deltas`` on ``lm``'s current weights (shapes checked, values finite, kept in float32 on the
        CPU)."""
        params = _parameters(lm, list(deltas))
        kept: dict[str, torch.Tensor] = {}
        for name, delta in deltas.items():
            d = torch.as_tensor(delta).detach().float().cpu()
            if d.shape != params[name].shape:
                raise ShapeMismatchError(f"a delta of shape {tuple(params[name].shape)} for {name}",
                                         f"shape {tuple(d.shape)}", "compute it on this model's parameter")
            check_finite(d, f"delta for {name}")
            kept[name] = d.clone()
        return cls(kept, weights_fingerprint(lm, list(kept)), label, dict(info or {}), ModelSignature.of(lm))

    def _deltas(self, lm: LanguageModel) -> dict[str, torch.Tensor]:
        found = weights_fingerprint(lm, list(self.deltas))
        if found != self.base:
            raise ModelMismatchError(f"the weights {self.label} was computed on (fingerprint {self.base})",
                                     f"weights with fingerprint {found}",
                                     "apply it to the model it was made from (not one already edited, fine-tuned "
                                     "or another checkpoint), or compute the edit again on this model")
        return dict(self.deltas)

    def moved(self, atol: float = 0.0) -> int:
        """How many parameter entries the edit changes by more than ``atol``."""
        return sum(int((d.abs() > atol).sum()) for d in self.deltas.values())

    def _record(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return {"base": self.base, "label": self.label, "info": dict(self.info), "names": list(self.deltas)}, {
            f"delta{i}": d for i, d in enumerate(self.deltas.values())}

    @classmethod
    def _restore(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], model: ModelSignature) -> WeightEdit:
        deltas = {name: tensors[f"delta{i}"] for i, name in enumerate(meta["names"])}
        return cls(deltas, meta["base"], meta["label"], meta["info"], model)

    def __repr__(self) -> str:
        return f"WeightEdit({self.label!r}, {len(self.deltas)} tensors, {self.moved()} entries moved)"


# -- positions in JSON ----------------------------------------------------------------------------------------------
_POSITION_TYPES: dict[str, type[Positions]] = {c.__name__: c for c in (All, Last, Index, Span, Match)}


def positions_json(positions: Positions) -> dict[str, Any]:
    """A built-in position selector as JSON (see :func:`positions_from_json`)."""
    name = type(positions).__name__
    if _POSITION_TYPES.get(name) is not type(positions):
        raise InputError(f"positions of a built-in selector {sorted(_POSITION_TYPES)} to save",
                         name, "use one of those selectors, or keep this steering in memory")
    return {"type": name, **dataclasses.asdict(positions)}  # type: ignore[call-overload]


def positions_from_json(record: Mapping[str, Any]) -> Positions:
    fields = dict(record)
    return _POSITION_TYPES[fields.pop("type")](**fields)

