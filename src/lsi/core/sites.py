"""Sites: the canonical names of interpretable objects, as selector objects whose string form round-trips.

A site is a kind (``resid_pre``, ``attn.head_out``, ...) plus, for per-layer kinds, a layer selector and, for
kinds with a head or unit axis, an optional index. Layer selectors may be patterns: ``*`` (every layer),
``a:b`` (half-open range, negatives allowed) or ``a,b,c``; :meth:`Site.expand` turns a pattern into concrete
sites for a model.

Kinds are open: :func:`register_site_kind` adds a :class:`SiteKind` (its shape, definition and binding rule),
and every registered kind parses, caches, patches and takes gradients like the built-in ones (which register
through the same function, from :data:`lsi.core.bindings.BUILT_IN_KINDS`). A kind name is dot-separated words,
each optionally parameterised in brackets, ending in a word: ``resid_post.sae[res-16k].acts`` is one kind, so
``blocks.3.resid_post.sae[res-16k].acts[7]`` is unit 7 of it at layer 3. A *derived* kind reads its value from
a parent site and writes a new value back into it (:class:`Derived`).

Example:
    >>> s = Site.parse("blocks.*.attn.head_out[3]")
    >>> [str(x) for x in s.expand(n_layers=2)]
    ['blocks.0.attn.head_out[3]', 'blocks.1.attn.head_out[3]']
    >>> str(Site("resid_post", layer=-1).expand(n_layers=4)[0])
    'blocks.3.resid_post'
    >>> double = SiteKind("resid_post.double", ("batch", "pos", "d_model"), "2 x resid_post",
    ...                   Derived("resid_post", read=lambda x: 2 * x, write=lambda x, old, new: new / 2))
    >>> with registered_site_kind(double):
    ...     print(Site.parse("blocks.1.resid_post.double").info.definition)
    2 x resid_post
    >>> "resid_post.double" in SITE_KINDS
    False
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from lsi.errors import IndexOutOfRangeError, InputError, SiteError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lsi.arch.dims import ModelDims
    from lsi.arch.spec import ArchSpec
    from lsi.core.bindings import Binding


class BindingRule(Protocol):
    """How a kind binds to a model: the :class:`~lsi.core.bindings.Binding` of a concrete, index-free site.

    A rule raises :class:`~lsi.errors.SiteUnavailableError` where the model has no such site.
    """

    def __call__(self, site: Site, model: nn.Module, spec: ArchSpec, dims: ModelDims, /) -> Binding: ...


@dataclass(frozen=True)
class Derived:
    """A kind computed from a parent site: ``read(parent) -> value``, ``write(parent, old, new) -> new parent``.

    The engine binds it where the parent is bound (same layer). ``write`` gets the parent's current value, the
    derived value the model uses now and the new one; it typically adds a delta (a decoder applied to
    ``new - old``). Without ``write`` the kind is read-only. A kind that exists on some layers only, or whose
    functions depend on the layer, uses a :class:`BindingRule` that calls :func:`lsi.core.bindings.bind_derived`.
    """

    parent: str
    read: Callable[[torch.Tensor], torch.Tensor]
    write: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None


@dataclass(frozen=True)
class SiteKind:
    """What a kind of site is: its shape (by dimension name), which axes select positions and units, and how it
    binds to a model (a :class:`BindingRule` or a :class:`Derived`).

    Dimension names are model dimensions (``d_model``, ``n_heads``, ...), positions (``batch``, ``pos``,
    ``q_pos``, ``k_pos``) or the kind's own, sized in ``sizes`` (e.g. ``{"d_sae": 16384}``).
    """

    name: str
    shape: tuple[str, ...]
    definition: str
    binding: BindingRule | Derived
    per_layer: bool = True
    index_axis: int | None = None  # axis addressed by ``[i]``: a head, a neuron or a feature
    position_axis: int = 1
    sizes: Mapping[str, int] = field(default_factory=dict, hash=False)
    transformer_lens: str | None = None  # hook name (per-layer kinds: the part after ``blocks.{i}.``)

    @property
    def index_name(self) -> str | None:
        return None if self.index_axis is None else self.shape[self.index_axis]

    @property
    def parent(self) -> str | None:
        """The kind a derived kind is read from; ``None`` for kinds bound directly."""
        return self.binding.parent if isinstance(self.binding, Derived) else None

    def dim_size(self, name: str, dims: ModelDims) -> int:
        """Size of a named (non-position) dimension of this kind on a model with ``dims``."""
        size = self.sizes[name] if name in self.sizes else dims.size(name)
        if size is None:
            raise SiteError(f"a size for dimension {name!r} of {self.name!r}", "none",
                            f"register the kind with sizes={{{name!r}: ...}} or use a model dimension name")
        return size


_HEAD_AXES = ("n_heads", "n_kv_heads")
_WORD = r"[a-z_][a-z0-9_]*"
_PARAM = r"\[[^\[\]\s]+\]"
_KIND = rf"(?:{_WORD}(?:{_PARAM})?\.)*{_WORD}"
_KIND_RE = re.compile(rf"^{_KIND}$")
_SITE_RE = re.compile(rf"^(?:blocks\.(?P<layer>[^.\[\]]+)\.)?(?P<kind>{_KIND})(?:\[(?P<index>[^\]]*)\])?$")
_LAYER_PATTERN_RE = re.compile(r"^(\*|-?\d+:-?\d+|-?\d*:-?\d*|-?\d+(,-?\d+)+)$")

LayerSpec = int | str  # an index, or a pattern: "*", "a:b", "a,b,c"
IndexSpec = int | tuple[int, ...] | None


class SiteKindRegistry(Mapping[str, SiteKind]):
    """The registered site kinds by name, built-in kinds first; read-only (see :func:`register_site_kind`)."""

    def __init__(self, builtins: str) -> None:
        self._kinds: dict[str, SiteKind] = {}
        self._builtins: str | None = builtins  # the module defining BUILT_IN_KINDS, until they are registered

    def _all(self) -> dict[str, SiteKind]:
        if self._builtins is not None:  # on first use: the built-in kinds' rules need torch, so load them late
            module, self._builtins = self._builtins, None
            for kind in importlib.import_module(module).BUILT_IN_KINDS:
                register_site_kind(kind)
        return self._kinds

    def __getitem__(self, name: str) -> SiteKind:
        return self._all()[name]

    def __contains__(self, name: object) -> bool:
        return name in self._all()

    def get(self, name: str, default: SiteKind | None = None) -> SiteKind | None:  # type: ignore[override]
        return self._all().get(name, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


SITE_KINDS = SiteKindRegistry("lsi.core.bindings")


def register_site_kind(kind: SiteKind) -> SiteKind:
    """Add a site kind; from then on sites of that kind parse, cache, patch and take gradients.

    Raises :class:`~lsi.errors.SiteError` for a malformed or taken name, a kind whose axes do not fit its shape,
    or a derived kind whose parent is not registered (or differs in having layers).
    """
    kinds = SITE_KINDS._all()
    name = kind.name
    if not _KIND_RE.match(name) or name.split(".")[0] == "blocks":
        raise SiteError("a kind name of dot-separated lowercase words, each optionally with a [parameter], "
                        "ending in a word (e.g. 'resid_post.sae[res-16k].acts')", repr(name), "rename the kind")
    if name in kinds:
        raise SiteError("a site kind name not registered yet", repr(name),
                        f"choose another name, or unregister_site_kind({name!r}) first")
    axes = [a for a in (kind.index_axis, kind.position_axis) if a is not None]
    if any(not 0 <= a < len(kind.shape) for a in axes):
        raise SiteError(f"index and position axes within the shape {kind.shape}", f"axes {axes} of {name!r}",
                        "count axes from 0 in the shape tuple")
    parent = kind.parent
    if parent is not None:
        if parent not in kinds:
            raise SiteError(f"a registered parent kind for {name!r}", repr(parent),
                            "register the parent first; " + _suggest(parent))
        if kinds[parent].per_layer != kind.per_layer:
            raise SiteError(f"per_layer={kinds[parent].per_layer} like its parent {parent!r}",
                            f"per_layer={kind.per_layer}", f"pass per_layer={kinds[parent].per_layer}")
    kinds[name] = kind
    return kind


def unregister_site_kind(name: str) -> SiteKind:
    """Remove a registered kind (e.g. a detached SAE's); refused while a derived kind still reads from it."""
    kinds = SITE_KINDS._all()
    if name not in kinds:
        raise SiteError("a registered site kind", repr(name), _suggest(name))
    children = [k.name for k in kinds.values() if k.parent == name]
    if children:
        raise SiteError(f"no derived kind reading from {name!r}", f"{children} still do",
                        "unregister those kinds first")
    return kinds.pop(name)


@contextmanager
def registered_site_kind(kind: SiteKind) -> Iterator[SiteKind]:
    """Register ``kind`` for the ``with`` block only (tests, scoped extensions)."""
    register_site_kind(kind)
    try:
        yield kind
    finally:
        unregister_site_kind(kind.name)


def _kinds_with_index(heads: bool) -> str:
    """The kinds whose ``[i]`` addresses a head (``heads``) or a neuron / feature (not ``heads``)."""
    names = [k.name for k in SITE_KINDS.values()
             if k.index_name is not None and (k.index_name in _HEAD_AXES) == heads]
    return ", ".join(names)


def _example_names() -> list[str]:
    return [k.name if not k.per_layer else f"blocks.0.{k.name}" for k in SITE_KINDS.values()]


def _suggest(text: str) -> str:
    kind = re.sub(r"^blocks\.[^.]+\.", "", text.strip())
    kind = re.sub(r"\[[^\]]*\]$", "", kind)
    close = difflib.get_close_matches(kind, list(SITE_KINDS), n=3, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "? Valid kinds: " + ", ".join(SITE_KINDS)
    return "use one of: " + ", ".join(_example_names())


@dataclass(frozen=True)
class Site:
    """A site selector: ``Site("attn.head_out", layer=5, head=3)`` or ``Site.parse("blocks.5.attn.head_out[3]")``.

    ``layer`` is an int (negative counts from the end) or a pattern string; ``index`` addresses a head, a neuron
    or a feature (``head=`` and ``unit=`` are aliases that also check the kind has that axis).
    """

    kind: str
    layer: LayerSpec | None = None
    index: IndexSpec = None

    def __init__(self, kind: str, layer: LayerSpec | None = None, index: IndexSpec = None, *,
                 head: IndexSpec = None, unit: IndexSpec = None) -> None:
        info = SITE_KINDS.get(kind)
        if info is None:
            raise SiteError("a site kind", repr(kind), _suggest(kind))
        given = [v for v in (index, head, unit) if v is not None]
        if len(given) > 1:
            raise SiteError("at most one of index=, head=, unit=", f"{len(given)} of them", "pass only one")
        if head is not None and info.index_name not in _HEAD_AXES:
            raise SiteError("head= only on per-head sites", f"head= on {kind!r}", "use " + _kinds_with_index(True))
        if unit is not None and (info.index_name is None or info.index_name in _HEAD_AXES):
            raise SiteError("unit= only on neuron or feature sites", f"unit= on {kind!r}",
                            "use " + _kinds_with_index(False))
        idx = given[0] if given else None
        if isinstance(idx, list):
            idx = tuple(idx)
        if idx is not None and info.index_axis is None:
            raise SiteError(f"no index on {kind!r} (it has no head, neuron or feature axis)", f"index {idx!r}",
                            "drop the [..] part")
        if info.per_layer and layer is None:
            raise SiteError(f"a layer for {kind!r}", "none", f"write e.g. 'blocks.0.{kind}' or 'blocks.*.{kind}'")
        if not info.per_layer and layer is not None:
            raise SiteError(f"no layer for {kind!r}", f"layer {layer!r}", f"write just {kind!r}")
        if isinstance(layer, str):
            layer = layer.strip()
            if re.fullmatch(r"-?\d+", layer):
                layer = int(layer)
            elif not _LAYER_PATTERN_RE.match(layer):
                raise SiteError("a layer index or pattern ('*', 'a:b', 'a,b,c')", repr(layer), "fix the layer part")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "layer", layer)
        object.__setattr__(self, "index", idx)

    @classmethod
    def parse(cls, text: str | Site) -> Site:
        """Parse ``'blocks.{layer}.{kind}[index]'`` or a global kind (``'embed'``, ``'ln_final'``, ``'logits'``).

        ``kind`` is any registered kind, parameterised ones included (``'blocks.3.resid_post.sae[res].acts[7]'``).
        """
        if isinstance(text, Site):
            return text
        m = _SITE_RE.match(text.strip())
        if not m:
            raise SiteError("a site like 'blocks.3.resid_post' or 'blocks.*.attn.z[2]'", repr(text), _suggest(text))
        kind, layer, index = m.group("kind"), m.group("layer"), m.group("index")
        if kind not in SITE_KINDS:
            raise SiteError("a site kind", repr(text), _suggest(text))
        idx: IndexSpec = None
        if index is not None:
            try:
                parts = tuple(int(p) for p in index.split(","))
            except ValueError:
                raise SiteError("integer indices in [..]", repr(index), "write e.g. [3] or [3,5]") from None
            idx = parts[0] if len(parts) == 1 else parts
        return cls(kind, layer, idx)

    def __str__(self) -> str:
        base = self.kind if self.layer is None else f"blocks.{self.layer}.{self.kind}"
        if self.index is None:
            return base
        idx = self.index if isinstance(self.index, int) else ",".join(str(i) for i in self.index)
        return f"{base}[{idx}]"

    @property
    def info(self) -> SiteKind:
        return SITE_KINDS[self.kind]

    @property
    def is_pattern(self) -> bool:
        return isinstance(self.layer, str)

    def layers(self, n_layers: int) -> list[int]:
        """The concrete layer indices this selector names, normalized to ``0..n_layers-1``."""
        if self.layer is None:
            return []
        if isinstance(self.layer, int):
            return [_check_layer(self.layer, n_layers, self)]
        if self.layer == "*":
            return list(range(n_layers))
        if ":" in self.layer:
            a, b = self.layer.split(":")
            return list(range(n_layers))[slice(int(a) if a else None, int(b) if b else None)]
        return [_check_layer(int(p), n_layers, self) for p in self.layer.split(",")]

    def expand(self, n_layers: int) -> list[Site]:
        """Concrete sites (one per layer) with normalized non-negative layer indices."""
        if self.layer is None:
            return [self]
        return [Site(self.kind, layer, self.index) for layer in self.layers(n_layers)]

    def indices(self) -> tuple[int, ...] | None:
        if self.index is None:
            return None
        return (self.index,) if isinstance(self.index, int) else self.index

    def without_index(self) -> Site:
        return Site(self.kind, self.layer)


def _check_layer(layer: int, n_layers: int, site: Site) -> int:
    if not -n_layers <= layer < n_layers:
        raise IndexOutOfRangeError(f"a layer in [-{n_layers}, {n_layers - 1}]", f"{layer} in {site}",
                                   f"this model has {n_layers} layers")
    return layer % n_layers


def as_sites(sites: str | Site | list[str | Site] | tuple[str | Site, ...], n_layers: int) -> list[Site]:
    """Parse and expand one or many site selectors into concrete sites, keeping order and dropping repeats."""
    items = [sites] if isinstance(sites, (str, Site)) else list(sites) if isinstance(sites, (list, tuple)) else None
    if items is None or not all(isinstance(item, (str, Site)) for item in items):
        raise InputError("a site name, a Site, or a list of them", f"{type(sites).__name__} {sites!r}"[:200],
                         'e.g. sites="blocks.*.resid_post" or sites=["blocks.0.attn.out", "ln_final"]')
    seen: dict[Site, None] = {}  # ordered set
    for item in items:
        for s in Site.parse(item).expand(n_layers):
            seen.setdefault(s)
    return list(seen)


# --- TransformerLens names -------------------------------------------------------------------------------

def to_transformer_lens(site: str | Site) -> str:
    """TransformerLens hook name of a concrete site (``blocks.3.attn.z`` -> ``blocks.3.attn.hook_z``).

    TransformerLens's ``hook_embed`` excludes learned positional embeddings, which it hooks separately as
    ``hook_pos_embed``; lsi's ``embed`` includes them (it equals ``blocks.0.resid_pre``). ``logits`` has no
    TransformerLens hook.
    """
    s = Site.parse(site)
    name = s.info.transformer_lens
    if name is None:
        raise SiteError("a site with a TransformerLens hook", str(s), f"{s.kind!r} has no hook in TransformerLens")
    return name if s.layer is None else f"blocks.{s.layer}.{name}"


def from_transformer_lens(name: str) -> Site:
    """Site for a TransformerLens hook name (``blocks.3.hook_resid_post`` -> ``blocks.3.resid_post``)."""
    per_layer = {k.transformer_lens: k.name for k in SITE_KINDS.values() if k.per_layer and k.transformer_lens}
    global_ = {k.transformer_lens: k.name for k in SITE_KINDS.values() if not k.per_layer and k.transformer_lens}
    if name in global_:
        return Site(global_[name])
    m = re.match(r"^blocks\.(-?\d+)\.(.+)$", name)
    if not m or m.group(2) not in per_layer:
        close = difflib.get_close_matches(name, [f"blocks.0.{v}" for v in per_layer] + list(global_), n=3)
        raise SiteError("a TransformerLens hook name", repr(name), f"closest: {close}" if close else
                        "use names like 'blocks.0.hook_resid_pre'")
    return Site(per_layer[m.group(2)], int(m.group(1)))
