"""The steering contract: reversible, composable, serializable interventions checked against their model.

A :class:`Steering` is an ordered composition of elementary *leaves*. A leaf contributes hook interventions
(:meth:`Steering._ops`: what happens to site values while the model runs) and / or additive weight deltas
(:meth:`Steering._deltas`: ``{parameter name: Δ}``, e.g. a rank-one edit or a merged task vector). The core leaves
are the interventions of :mod:`lsi.core.interventions` and :class:`~lsi.core.weight_edit.WeightEdit`; richer
leaves (e.g. in :mod:`lsi.steer`) subclass :class:`Steering` and register themselves by doing so.

* ``with lm.intervene(a, b): ...`` and ``with (a + b).apply(lm): ...`` are the same: weight deltas are added to
  the weights (restored bit-exactly on exit) and the hooks run in every forward pass and ``lm.generate`` call
  inside the block; at a shared site interventions run in composition order;
* ``steer.save(path)`` writes ``path.json`` + ``path.safetensors`` (never a pickle) and ``Steering.load(path, lm)``
  reads it back, refusing a model of another family or dimensions, and weight deltas computed on other weights
  (:class:`ModelMismatchError`). Leaves holding a function or a cache cannot be saved
  (:class:`NotSerializableError`).

A leaf implements ``_record`` (JSON metadata and tensors) and ``_restore`` (the inverse). A saved part names its
type and module; a type not yet registered is looked up by importing that module (``lsi.*`` modules only).

Example:
    >>> import lsi, torch, tempfile
    >>> from lsi.testing import tiny_model
    >>> lm = lsi.LanguageModel(tiny_model("gpt2"))
    >>> steer = lsi.Add("blocks.1.resid_pre", torch.ones(32), 2.0, model=lm) + lsi.Zero("blocks.0.mlp.post[3]",
    ...                                                                                   model=lm)
    >>> path = steer.save(tempfile.mkdtemp() + "/steer")
    >>> loaded = lsi.Steering.load(path, lm)
    >>> with steer.apply(lm):
    ...     a = lm.forward([[5, 6, 7]])
    >>> with lm.intervene(loaded):
    ...     b = lm.forward([[5, 6, 7]])
    >>> torch.equal(a, b), loaded
    (True, Add(blocks.1.resid_pre, alpha=2, |vector|=5.66) + Zero(blocks.0.mlp.post[3]))
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar, get_args

import torch

from lsi.core.bundle import load_bundle, save_bundle
from lsi.core.identity import ModelIdentity
from lsi.core.positions import All, Index, Last, Match, Positions, Span
from lsi.core.sites import Site
from lsi.errors import InputError, NonFiniteSteeringError, NotFoldableError, NotSerializableError, ShapeMismatchError

if TYPE_CHECKING:
    from lsi.core.folding import Folding
    from lsi.core.hooks import HookSession
    from lsi.core.interventions import Intervention
    from lsi.core.model import LanguageModel

FORMAT = 2  # 2: parts name their module; the model record holds every dimension
Scope = Literal["prompt", "generated", "all"]
S = TypeVar("S", bound="Steering")


# -- value checks ---------------------------------------------------------------------------------------------------
def check_finite(value: torch.Tensor, what: str, fix: str = "recompute it (check the inputs it was computed "
                                                            "from)") -> None:
    """Raise :class:`NonFiniteSteeringError` if ``value`` has a NaN or infinite entry."""
    finite = torch.isfinite(value.detach())
    if not bool(finite.all()):
        raise NonFiniteSteeringError(f"a finite {what}", f"{int((~finite).sum())} NaN/inf entries", fix)


def check_number(value: float, what: str) -> float:
    """``value`` as a float, refused if NaN or infinite."""
    number = float(value)
    if not math.isfinite(number):
        raise NonFiniteSteeringError(f"a finite {what}", f"{what}={value!r}", f"pass a finite {what}, e.g. 0.5")
    return number


def finite_vector(value: Any, what: str) -> torch.Tensor:
    """A finite 1-D float32 CPU copy of ``value``."""
    v = torch.as_tensor(value).detach().float().cpu()
    if v.dim() != 1 or v.numel() == 0:
        raise ShapeMismatchError(f"{what} of shape [d] (one vector)", f"shape {tuple(v.shape)}",
                                 "pass a single vector, e.g. diff_in_means(...)")
    check_finite(v, what)
    return v.clone()


def check_scope(scope: str) -> Scope:
    """``scope`` if it is one of ``"prompt"``, ``"generated"``, ``"all"``."""
    if scope not in get_args(Scope):
        raise InputError(f"scope in {get_args(Scope)}", repr(scope), "e.g. scope='generated'")
    return scope  # type: ignore[return-value]


def check_scaled(alpha: float, values: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Refuse a strength whose ``alpha * values`` is not finite in ``dtype`` (e.g. overflows float16)."""
    scaled = alpha * values.detach().to(dtype)
    if not bool(torch.isfinite(scaled).all()):
        raise NonFiniteSteeringError(f"alpha * {what} finite in {dtype}",
                                     f"alpha={alpha:g} with max |value|={float(values.detach().abs().max()):.4g} "
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


# -- positions in JSON ----------------------------------------------------------------------------------------------
_POSITION_TYPES: dict[str, type[Positions]] = {c.__name__: c for c in (All, Last, Index, Span, Match)}


def positions_json(positions: Positions) -> dict[str, Any]:
    """A built-in position selector as JSON (see :func:`positions_from_json`)."""
    name = type(positions).__name__
    if _POSITION_TYPES.get(name) is not type(positions):
        raise NotSerializableError(f"positions of a built-in selector {sorted(_POSITION_TYPES)} to save",
                                   name, "use one of those selectors, or keep this steering in memory")
    return {"type": name, **dataclasses.asdict(positions)}  # type: ignore[call-overload]


def positions_from_json(record: Mapping[str, Any]) -> Positions:
    fields = dict(record)
    return _POSITION_TYPES[fields.pop("type")](**fields)


# -- steering objects -----------------------------------------------------------------------------------------------
class Steering:
    """Base class of steering objects (see the module docstring)."""

    model: ModelIdentity | None = None
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
        raise NotSerializableError(f"a steering with a saved form to save, not {self!r}",
                                   f"{type(self).__name__}, which lives in memory only",
                                   "keep it in memory (apply it with lm.intervene), or build it from saveable leaves")

    @classmethod
    def _restore(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], model: ModelIdentity) -> Steering:
        raise NotImplementedError

    def folding(self, lm: LanguageModel) -> Folding:
        """How this leaf folds into ``lm``'s weights (used by :func:`lsi.steer.export.fold`); a leaf that cannot
        fold raises :class:`NotFoldableError` naming itself."""
        raise NotFoldableError("a steering that folds into weights", f"{self!r} (no folding into weights)",
                               "apply it with hooks (with lm.intervene(steering): ...) instead of exporting it")

    def prepare(self, lm: LanguageModel) -> tuple[list[Intervention], dict[str, torch.Tensor]]:
        """The hook interventions and the summed weight deltas (by parameter name) that apply this steering to
        ``lm``, after checking every leaf against the model it was made for."""
        leaves = self.leaves()
        for leaf in leaves:
            if leaf.model is not None:
                leaf.model.check(lm, f"{type(leaf).__name__} made for")
        ops = [op for leaf in leaves for op in leaf._ops(lm)]
        deltas: dict[str, torch.Tensor] = {}
        for leaf in leaves:
            for name, delta in leaf._deltas(lm).items():
                deltas[name] = deltas[name] + delta if name in deltas else delta
        return ops, deltas

    def interventions(self, lm: LanguageModel) -> list[Intervention]:
        """The hook interventions of :meth:`prepare`."""
        return self.prepare(lm)[0]

    def weight_deltas(self, lm: LanguageModel) -> dict[str, torch.Tensor]:
        """The summed weight deltas of :meth:`prepare`, by parameter name."""
        return self.prepare(lm)[1]

    def apply(self, lm: LanguageModel) -> AbstractContextManager[HookSession]:
        """``with steer.apply(lm): ...`` is ``with lm.intervene(steer): ...`` (checked against ``lm`` here, before
        the block)."""
        return lm.intervene(self)

    def __add__(self, other: Steering) -> Steering:
        if not isinstance(other, Steering):
            return NotImplemented
        return Composed((*self.leaves(), *other.leaves()))

    def save(self, path: str | Path) -> Path:
        """Write ``path.json`` + ``path.safetensors``; returns the JSON path. Every leaf must know the model it
        was made for (``model=lm`` when building it)."""
        identities = {None if leaf.model is None else leaf.model.shape for leaf in self.leaves()}
        if None in identities or len(identities) != 1:
            raise InputError("a steering that knows its model (build it with model=lm)",
                             f"models {sorted(str(s) for s in identities)}",
                             "pass model=lm to every steering object before saving")
        parts, tensors = [], {}
        for i, leaf in enumerate(self.leaves()):
            meta, own = leaf._record()
            assert leaf.model is not None
            fingerprint = leaf.model.to_json()
            del fingerprint["family"], fingerprint["dims"]
            parts.append({"type": type(leaf).__name__, "module": type(leaf).__module__, **fingerprint, **meta})
            tensors.update({f"{i}.{k}": v for k, v in own.items()})
        model = identities.pop()
        assert model is not None
        return save_bundle(path, tensors, {"format": FORMAT, "kind": "lsi.steering", "model": model.to_json(),
                                           "parts": parts})

    @classmethod
    def load(cls: type[S], path: str | Path, lm: LanguageModel) -> S:
        """Read a steering written by :meth:`save`; refuses one made for a model of another family or
        dimensions, or weight deltas computed on other weights (:class:`ModelMismatchError`)."""
        tensors, meta = load_bundle(path, what="a steering written by Steering.save",
                                    fix="save one with steer.save(path)", format=FORMAT)
        if meta.get("kind") != "lsi.steering":
            raise InputError("a steering bundle (kind 'lsi.steering')", f"kind {meta.get('kind')!r}",
                             "load it with the loader of its own kind")
        model = ModelIdentity.from_json(meta["model"])
        model.check(lm, "a model matching the steering, saved for")
        leaves = []
        for i, part in enumerate(meta["parts"]):
            own = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == str(i)}
            fields = {k: v for k, v in part.items() if k not in ("type", "module", "parameters", "fingerprint")}
            identity = dataclasses.replace(model, parameters=tuple(part.get("parameters", ())),
                                           fingerprint=part.get("fingerprint"))
            leaves.append(_leaf_type(part.get("type"), part.get("module"))._restore(fields, own, identity))
        loaded = leaves[0] if len(leaves) == 1 else Composed(tuple(leaves))
        if not isinstance(loaded, cls):
            raise InputError(f"a saved {cls.__name__}", f"a saved {type(loaded).__name__}",
                             f"load it with {type(loaded).__name__}.load or Steering.load")
        loaded.prepare(lm)  # weight deltas: refuse other weights now, not at first use
        return loaded


@dataclass(frozen=True, eq=False)
class Composed(Steering):
    """Several steerings applied together, in order (build it with ``a + b`` or :func:`compose`)."""

    parts: tuple[Steering, ...]

    def leaves(self) -> tuple[Steering, ...]:
        return self.parts

    def __repr__(self) -> str:
        return " + ".join(map(repr, self.parts)) if self.parts else "Composed(())"


def compose(*items: Steering | Iterable[Steering]) -> Steering:
    """One steering from steerings and iterables of steerings, in order (one leaf is returned as it is).

    Example:
        >>> import lsi
        >>> lsi.compose(lsi.Zero("blocks.0.mlp.out"), [lsi.Zero(f"blocks.{i}.attn.out") for i in (0, 1)])
        Zero(blocks.0.mlp.out) + Zero(blocks.0.attn.out) + Zero(blocks.1.attn.out)
    """
    leaves: list[Steering] = []
    for item in items:
        for s in [item] if isinstance(item, Steering) else item:
            if not isinstance(s, Steering):
                raise InputError("interventions or steerings (lsi.Zero, lsi.Add, a WeightEdit, ...) or lists of them",
                                 type(s).__name__, "build the intervention first, e.g. lsi.Zero('blocks.0.mlp.out')")
            leaves.extend(s.leaves())
    return leaves[0] if len(leaves) == 1 else Composed(tuple(leaves))


def _leaf_type(name: Any, module: Any) -> type[Steering]:
    if name not in Steering._types and isinstance(module, str) and module.split(".")[0] == "lsi":
        with contextlib.suppress(ImportError):  # an unknown module is reported below as an unknown type
            importlib.import_module(module)  # registers the leaf types it defines
    if name not in Steering._types:
        raise InputError(f"a steering part of a known type {sorted(Steering._types)}", f"{name!r} from {module!r}",
                         "import the module that defines it before loading, or save it again with this version")
    return Steering._types[name]
