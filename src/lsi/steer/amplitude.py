"""Amplitude manipulation: set located objects to zero, their mean, a target value, or a multiple of themselves.

One :class:`Amplitude` applies one operation to a list of sites (residual states, ``attn.head_out[h]``,
``attn.z[h]``, neurons ``mlp.post[j]``, any writable site; patterns such as ``blocks.*.mlp.post[3]`` allowed):

* ``"zero"``: ``õ = 0``; ``"scale"``: ``õ = α·o``;
* ``"mean"``: ``õ = E[o]``, the mean over the real tokens of reference inputs (:meth:`Amplitude.mean`);
* ``"set"``: ``õ = o_target``, a stored value per site (:meth:`Amplitude.set`).

Stored values hold one position of the site's value: ``lm.site_shape(site)[2:]``, e.g. ``[d_model]`` for
``attn.head_out[2]``, ``[]`` for ``mlp.post[17]``, ``[2]`` for ``mlp.post[3,17]``. They are checked finite when
built and against the model's shapes when applied. ``positions`` and ``scope`` work as in
:mod:`lsi.core.interventions`. :meth:`Amplitude.from_locate` targets the top objects of a
:class:`~lsi.locate.result.LocateResult`.

Example:
    >>> import lsi, torch
    >>> from lsi.testing import tiny_model
    >>> lm = lsi.LanguageModel(tiny_model("llama"))
    >>> off = Amplitude.zero(["blocks.0.mlp.post[3,17]", "blocks.1.attn.head_out[2]"], positions="last")
    >>> off
    Amplitude(zero, sites=['blocks.0.mlp.post[3,17]', 'blocks.1.attn.head_out[2]'], positions=last, scope=all)
    >>> with off.apply(lm):
    ...     cache = lm.run_with_cache([[5, 6, 7]], sites=["blocks.0.mlp.post"])
    >>> cache["blocks.0.mlp.post"][0, -1, [3, 17]].tolist()
    [0.0, 0.0]
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch

from lsi.core.interventions import Intervention, Mean, Scale, Scope, Set, Zero
from lsi.core.positions import All, Positions, PositionSpec, as_positions
from lsi.core.sites import SITE_KINDS, Site
from lsi.errors import InputError, NonFiniteSteeringError, ReadOnlySiteError, ShapeMismatchError, SiteError
from lsi.steer.base import (
    ModelSignature,
    Steering,
    as_signature,
    check_finite,
    check_scope,
    positions_from_json,
    positions_json,
)

if TYPE_CHECKING:
    from lsi.core.inputs import Batch, Inputs
    from lsi.core.model import LanguageModel
    from lsi.locate.result import By, LocateResult

Operation = Literal["zero", "scale", "mean", "set"]
VALUE_OPERATIONS = ("mean", "set")
SiteList = str | Site | Sequence[str | Site]


@dataclass(frozen=True, eq=False, repr=False)
class Amplitude(Steering):
    """``õ = 0`` / ``α·o`` / ``E[o]`` / ``o_target`` at ``sites`` (see the module docstring).

    ``values`` (``"mean"`` and ``"set"`` only) holds one tensor per entry of ``sites``; a pattern entry uses its
    tensor at every layer it names. ``alpha`` is the factor of ``"scale"``.
    """

    operation: Operation
    sites: tuple[str, ...]
    values: tuple[torch.Tensor, ...] = ()
    alpha: float | None = None
    positions: Positions = dataclasses.field(default_factory=All)
    scope: Scope = "all"
    model: ModelSignature | None = None

    def __init__(self, operation: Operation, sites: SiteList, *, values: Sequence[Any] | None = None,
                 alpha: float | None = None, positions: PositionSpec = "all", scope: Scope = "all",
                 model: LanguageModel | ModelSignature | None = None) -> None:
        if operation not in get_args(Operation):
            raise InputError(f"an operation in {get_args(Operation)}", repr(operation), "e.g. Amplitude.zero(sites)")
        names = _site_names(sites)
        if (values is not None) != (operation in VALUE_OPERATIONS):
            raise InputError(f"values exactly for the operations {VALUE_OPERATIONS}",
                             f"operation {operation!r} with values={'given' if values is not None else None}",
                             "use Amplitude.mean(lm, ...) or Amplitude.set(sites, values)")
        if values is not None and len(values) != len(names):
            raise InputError("one value per site", f"{len(values)} values for {len(names)} sites",
                             "pass a list of values aligned with the sites")
        stored = tuple(_finite_value(v, f"value for {s}") for s, v in zip(names, values or (), strict=False))
        if (alpha is not None) != (operation == "scale"):
            raise InputError("alpha exactly for operation 'scale'", f"operation {operation!r} with alpha={alpha}",
                             "use Amplitude.scale(sites, alpha)")
        if alpha is not None and not math.isfinite(float(alpha)):
            raise NonFiniteSteeringError("a finite alpha", repr(alpha), "pass a finite factor, e.g. alpha=0.5")
        check_scope(scope)
        object.__setattr__(self, "operation", operation)
        object.__setattr__(self, "sites", names)
        object.__setattr__(self, "values", stored)
        object.__setattr__(self, "alpha", None if alpha is None else float(alpha))
        object.__setattr__(self, "positions", as_positions(positions))
        object.__setattr__(self, "scope", scope)
        object.__setattr__(self, "model", as_signature(model))

    # -- constructors ------------------------------------------------------------------------------------------
    @classmethod
    def zero(cls, sites: SiteList, *, positions: PositionSpec = "all", scope: Scope = "all",
             model: LanguageModel | ModelSignature | None = None) -> Amplitude:
        """Zero ablation ``õ = 0`` of every site."""
        return cls("zero", sites, positions=positions, scope=scope, model=model)

    @classmethod
    def scale(cls, sites: SiteList, alpha: float, *, positions: PositionSpec = "all", scope: Scope = "all",
              model: LanguageModel | ModelSignature | None = None) -> Amplitude:
        """``õ = alpha · o`` (``alpha=0`` zeroes, ``alpha=2`` doubles)."""
        return cls("scale", sites, alpha=alpha, positions=positions, scope=scope, model=model)

    @classmethod
    def set(cls, sites: SiteList, values: Any, *, positions: PositionSpec = "all", scope: Scope = "all",
            model: LanguageModel | ModelSignature | None = None) -> Amplitude:
        """``õ = o_target``: ``values`` is one tensor (one site) or one tensor per site, each shaped like one
        position of the site's value (``lm.site_shape(site)[2:]``)."""
        single = isinstance(sites, (str, Site))
        return cls("set", sites, values=[values] if single else list(values), positions=positions, scope=scope,
                   model=model)

    @classmethod
    def mean(cls, lm: LanguageModel, sites: SiteList, reference: Inputs | Batch, *, positions: PositionSpec = "all",
             scope: Scope = "all", batch_size: int = 32) -> Amplitude:
        """Mean ablation ``õ = E[o]``: every site (patterns expanded to one site per layer) set, at ``positions``,
        to its mean over the real tokens of ``reference``, computed once here (:func:`reference_means`)."""
        concrete = [str(s) for s in lm.resolve_sites(list(_site_names(sites)))]
        return cls("mean", concrete, values=reference_means(lm, reference, concrete, batch_size=batch_size),
                   positions=positions, scope=scope, model=lm)

    @classmethod
    def from_locate(cls, result: LocateResult, k: int, operation: Operation = "zero", *, alpha: float | None = None,
                    lm: LanguageModel | None = None, reference: Inputs | Batch | None = None, by: By = "signed",
                    head_site: str = "attn.head_out", positions: PositionSpec = "all", scope: Scope = "all",
                    model: LanguageModel | ModelSignature | None = None) -> Amplitude:
        """``operation`` on the top ``k`` objects of a locate result (see :func:`located_sites`): ``"zero"``,
        ``"scale"`` (with ``alpha``) or ``"mean"`` (with ``lm`` and ``reference`` inputs).

        Example:
            >>> from lsi.locate.result import LocateResult
            >>> r = LocateResult.over(["blocks.0.mlp.post[4]", "blocks.1.mlp.post[2]", "blocks.0.mlp.post[1]"],
            ...                       [0.9, 0.1, 0.5], method="demo")
            >>> Amplitude.from_locate(r, 2).sites
            ('blocks.0.mlp.post[1,4]',)
        """
        sites = located_sites(result, k, by=by, head_site=head_site)
        if operation == "mean":
            if lm is None or reference is None:
                raise InputError("lm= and reference= inputs for operation 'mean'",
                                 f"lm={'given' if lm is not None else None}, "
                                 f"reference={'given' if reference is not None else None}",
                                 "pass the model and the inputs whose mean replaces the objects")
            return cls.mean(lm, sites, reference, positions=positions, scope=scope)
        if operation == "set":
            raise InputError("operation 'zero', 'scale' or 'mean' for located objects", "'set'",
                             "build Amplitude.set(located_sites(result, k), values) with values per site")
        return cls(operation, sites, alpha=alpha, positions=positions, scope=scope, model=model or lm)

    # -- steering contract -------------------------------------------------------------------------------------
    def _ops(self, lm: LanguageModel) -> list[Intervention]:
        ops: list[Intervention] = []
        for i, site in enumerate(self.sites):
            concrete = lm.resolve_sites(site)
            if self.operation == "zero":
                ops.append(Zero(site, positions=self.positions, scope=self.scope))
            elif self.operation == "scale":
                assert self.alpha is not None
                ops.append(Scale(site, self.alpha, positions=self.positions, scope=self.scope))
            else:
                for s in concrete:
                    _check_value_shape(lm, s, self.values[i])
                kind = Mean if self.operation == "mean" else Set
                ops.append(kind(site, self.values[i], positions=self.positions, scope=self.scope))
        return ops

    def _record(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        meta = {"operation": self.operation, "sites": list(self.sites), "alpha": self.alpha,
                "positions": positions_json(self.positions), "scope": self.scope}
        return meta, {f"value{i}": v for i, v in enumerate(self.values)}

    @classmethod
    def _restore(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], model: ModelSignature) -> Amplitude:
        values = [tensors[f"value{i}"] for i in range(len(meta["sites"]))] if meta["operation"] in \
            VALUE_OPERATIONS else None
        return cls(meta["operation"], meta["sites"], values=values, alpha=meta["alpha"],
                   positions=positions_from_json(meta["positions"]), scope=meta["scope"], model=model)

    def __repr__(self) -> str:
        factor = f", alpha={self.alpha:g}" if self.alpha is not None else ""
        return (f"Amplitude({self.operation}, sites={list(self.sites)}{factor}, positions={self.positions}, "
                f"scope={self.scope})")


# -- helpers --------------------------------------------------------------------------------------------------------
def _site_names(sites: SiteList) -> tuple[str, ...]:
    items = [sites] if isinstance(sites, (str, Site)) else list(sites)
    if not items:
        raise InputError("at least one site", "an empty list", "e.g. sites=['blocks.0.mlp.post[3,17]']")
    parsed = [Site.parse(s) for s in items]
    for s in parsed:
        if s.info.position_axis != 1:
            raise ReadOnlySiteError("writable sites with one value per position", f"{s} (read-only)",
                                    "intervene on attn.q / attn.k / attn.z instead of the pattern")
    return tuple(str(s) for s in parsed)


def _finite_value(value: Any, what: str) -> torch.Tensor:
    v = torch.as_tensor(value).detach().float().cpu().clone()
    check_finite(v, what, "pass finite values (a mean over reference inputs with real tokens)")
    return v


def _check_value_shape(lm: LanguageModel, site: Site, value: torch.Tensor) -> None:
    expected = lm.site_shape(site)[2:]
    if tuple(value.shape) != expected:
        raise ShapeMismatchError(f"a value of shape {expected} for {site} (its value at one position)",
                                 f"shape {tuple(value.shape)}",
                                 "give one position's value: [d_model] for a head's output or a residual state, "
                                 "[d_head] for attn.z[h], [] for one neuron, [k] for k neurons")


def reference_means(lm: LanguageModel, inputs: Inputs | Batch, sites: SiteList, *,
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
    concrete = lm.resolve_sites(list(_site_names(sites)))
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


def located_sites(result: LocateResult, k: int, *, by: By = "signed", head_site: str = "attn.head_out") -> list[str]:
    """Sites of the top ``k`` objects of ``result``, heads or neurons of one layer merged into one site
    (:func:`group_units`).

    Labels must name sites (``blocks.1.mlp.post[17]``, ``blocks.3.attn.head_out[2]``, ``blocks.0.mlp.out``: one
    axis of objects, as from LAPE, activation statistics, patching and probing), or the result is a
    ``layer × head`` grid (attention head scores, head weight norms), read as ``blocks.{layer}.{head_site}[head]``.

    Example:
        >>> from lsi.locate.result import LocateResult
        >>> grid = LocateResult(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), (("layer", ("0", "1")), ("head", ("0", "1"))),
        ...                     method="demo")
        >>> located_sites(grid, 2)
        ['blocks.0.attn.head_out[1]', 'blocks.1.attn.head_out[0]']
    """
    if not 1 <= k <= result.scores.numel():
        raise InputError(f"k in [1, {result.scores.numel()}] (the number of scored objects)", str(k),
                         "choose how many of the located objects to target")
    kind = SITE_KINDS.get(head_site)
    if kind is None or kind.index_name != "n_heads":
        raise InputError("head_site naming a per-head kind (attn.head_out, attn.z, attn.q)", repr(head_site),
                         "e.g. head_site='attn.z'")
    axes = tuple(name for name, _ in result.axes)
    chosen = result.select(k=k, by=by)
    if axes == ("layer", "head"):
        return group_units([Site(head_site, int(layer), int(head)) for layer, head in
                            (label.split("@") for label in chosen)])
    if len(axes) != 1:
        raise InputError("a result over one axis of site labels, or a layer × head grid", f"axes {axes}",
                         "pick one slice of the result first (e.g. one position) and build a LocateResult.over it")
    return group_units([_label_site(label) for label in chosen])


def _label_site(label: str) -> Site:
    try:
        site = Site.parse(label)
    except SiteError:
        raise InputError("object labels that name sites, like 'blocks.1.mlp.post[17]'", repr(label),
                         "locate heads, neurons or sites (not layers, rows or edges) to target them") from None
    if site.is_pattern:
        raise InputError("labels of concrete sites", repr(label), "locate objects of one layer each")
    return site


def group_units(sites: Sequence[str | Site]) -> list[str]:
    """Indexed sites of one kind and layer merged into one site listing every index (sorted, first appearance
    order of the groups); sites without an index, and patterns, are kept as they are.

    Example:
        >>> group_units(["blocks.1.mlp.post[7]", "blocks.0.mlp.post[3]", "blocks.1.mlp.post[2]", "embed"])
        ['blocks.1.mlp.post[2,7]', 'blocks.0.mlp.post[3]', 'embed']
    """
    groups: dict[str, list[int] | None] = {}  # None: kept as it is
    for s in map(Site.parse, sites):
        indices = s.indices()
        if indices is None or s.is_pattern:
            groups.setdefault(str(s), None)
        else:
            merged = groups.setdefault(f"{s.without_index()}[]", [])
            assert merged is not None
            merged.extend(indices)
    out = []
    for name, merged in groups.items():
        if merged is None:
            out.append(name)
            continue
        unique = sorted(set(merged))
        base = Site.parse(name[:-2])
        out.append(str(Site(base.kind, base.layer, unique[0] if len(unique) == 1 else tuple(unique))))
    return out
