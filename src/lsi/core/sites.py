"""Sites: the canonical names of interpretable objects, as selector objects whose string form round-trips.

A site is a kind (``resid_pre``, ``attn.head_out``, ...) plus, for per-layer kinds, a layer selector and, for
kinds with a head or neuron axis, an optional index. Layer selectors may be patterns: ``*`` (every layer),
``a:b`` (half-open range, negatives allowed) or ``a,b,c``; :meth:`Site.expand` turns a pattern into concrete
sites for a model.

Example:
    >>> s = Site.parse("blocks.*.attn.head_out[3]")
    >>> [str(x) for x in s.expand(n_layers=2)]
    ['blocks.0.attn.head_out[3]', 'blocks.1.attn.head_out[3]']
    >>> str(Site("resid_post", layer=-1).expand(n_layers=4)[0])
    'blocks.3.resid_post'
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from lsi.errors import IndexOutOfRangeError, SiteError


@dataclass(frozen=True)
class SiteKind:
    """What a kind of site is: its shape (by dimension name) and which axes select positions and units."""

    name: str
    shape: tuple[str, ...]
    definition: str
    per_layer: bool = True
    index_axis: int | None = None  # axis addressed by ``[i]``: a head or a neuron
    position_axis: int = 1

    @property
    def index_name(self) -> str | None:
        return None if self.index_axis is None else self.shape[self.index_axis]


_KINDS = (
    SiteKind("embed", ("batch", "pos", "d_model"), "token (+ learned positional) embedding = blocks.0.resid_pre",
             per_layer=False),
    SiteKind("resid_pre", ("batch", "pos", "d_model"), "input of decoder layer i"),
    SiteKind("resid_mid", ("batch", "pos", "d_model"), "resid_pre + attn.out (sequential-attention families only)"),
    SiteKind("resid_post", ("batch", "pos", "d_model"), "output of layer i = resid_pre[i+1] (before final norm)"),
    SiteKind("attn.out", ("batch", "pos", "d_model"), "what attention adds to the residual stream"),
    SiteKind("attn.z", ("batch", "pos", "n_heads", "d_head"), "per-head mixed values (input of W_O)", index_axis=2),
    SiteKind("attn.head_out", ("batch", "pos", "n_heads", "d_model"), "per-head write z_h @ W_O[h]", index_axis=2),
    SiteKind("attn.pattern", ("batch", "n_heads", "q_pos", "k_pos"), "post-softmax attention probabilities",
             index_axis=1, position_axis=2),
    SiteKind("attn.q", ("batch", "pos", "n_heads", "d_head"), "query projection (before rotary embedding)",
             index_axis=2),
    SiteKind("attn.k", ("batch", "pos", "n_kv_heads", "d_head"), "key projection (before rotary embedding)",
             index_axis=2),
    SiteKind("attn.v", ("batch", "pos", "n_kv_heads", "d_head"), "value projection", index_axis=2),
    SiteKind("mlp.out", ("batch", "pos", "d_model"), "what the MLP adds to the residual stream"),
    SiteKind("mlp.post", ("batch", "pos", "d_mlp"), "neuron activations = input of the down projection",
             index_axis=2),
    SiteKind("mlp.pre", ("batch", "pos", "d_mlp"), "pre-activation (the gate branch for gated MLPs)", index_axis=2),
    SiteKind("ln_final", ("batch", "pos", "d_model"), "final-norm output", per_layer=False),
    SiteKind("logits", ("batch", "pos", "vocab"), "unembedding output", per_layer=False),
)
SITE_KINDS: dict[str, SiteKind] = {k.name: k for k in _KINDS}

LayerSpec = int | str  # an index, or a pattern: "*", "a:b", "a,b,c"
IndexSpec = int | tuple[int, ...] | None

_SITE_RE = re.compile(r"^(?:blocks\.(?P<layer>[^.\[\]]+)\.)?(?P<kind>[a-z_]+(?:\.[a-z_]+)?)(?:\[(?P<index>[^\]]*)\])?$")
_LAYER_PATTERN_RE = re.compile(r"^(\*|-?\d+:-?\d+|-?\d*:-?\d*|-?\d+(,-?\d+)+)$")


def _example_names() -> list[str]:
    return [k.name if not k.per_layer else f"blocks.0.{k.name}" for k in _KINDS]


def _suggest(text: str) -> str:
    kind = text.split("[")[0]
    kind = re.sub(r"^blocks\.[^.]+\.", "", kind)
    close = difflib.get_close_matches(kind, list(SITE_KINDS), n=3, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "? Valid kinds: " + ", ".join(SITE_KINDS)
    return "use one of: " + ", ".join(_example_names())


@dataclass(frozen=True)
class Site:
    """A site selector: ``Site("attn.head_out", layer=5, head=3)`` or ``Site.parse("blocks.5.attn.head_out[3]")``.

    ``layer`` is an int (negative counts from the end) or a pattern string; ``index`` addresses a head or neuron
    (``head=`` and ``unit=`` are aliases that also check the kind has that axis).
    """

    kind: str
    layer: LayerSpec | None = None
    index: IndexSpec = None

    def __init__(self, kind: str, layer: LayerSpec | None = None, index: IndexSpec = None, *,
                 head: IndexSpec = None, unit: IndexSpec = None) -> None:
        if kind not in SITE_KINDS:
            raise SiteError("a site kind", repr(kind), _suggest(kind))
        info = SITE_KINDS[kind]
        given = [v for v in (index, head, unit) if v is not None]
        if len(given) > 1:
            raise SiteError("at most one of index=, head=, unit=", f"{len(given)} of them", "pass only one")
        if head is not None and info.index_name not in ("n_heads", "n_kv_heads"):
            raise SiteError("head= only on per-head sites", f"head= on {kind!r}", "use attn.z, attn.head_out, ...")
        if unit is not None and info.index_name != "d_mlp":
            raise SiteError("unit= only on neuron sites", f"unit= on {kind!r}", "use mlp.post or mlp.pre")
        idx = given[0] if given else None
        if isinstance(idx, list):
            idx = tuple(idx)
        if idx is not None and info.index_axis is None:
            raise SiteError(f"no index on {kind!r} (it has no head or neuron axis)", f"index {idx!r}",
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
        """Parse ``'blocks.{layer}.{kind}[index]'`` or a global kind (``'embed'``, ``'ln_final'``, ``'logits'``)."""
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
    items = [sites] if isinstance(sites, (str, Site)) else list(sites)
    seen: dict[Site, None] = {}  # ordered set
    for item in items:
        for s in Site.parse(item).expand(n_layers):
            seen.setdefault(s)
    return list(seen)


# --- TransformerLens names -------------------------------------------------------------------------------

_TO_TL = {
    "resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "resid_post": "hook_resid_post",
    "attn.out": "hook_attn_out", "mlp.out": "hook_mlp_out",
    "attn.z": "attn.hook_z", "attn.q": "attn.hook_q", "attn.k": "attn.hook_k", "attn.v": "attn.hook_v",
    "attn.pattern": "attn.hook_pattern", "attn.head_out": "attn.hook_result",
    "mlp.pre": "mlp.hook_pre", "mlp.post": "mlp.hook_post",
}
_GLOBAL_TO_TL = {"embed": "hook_embed", "ln_final": "ln_final.hook_normalized"}
_FROM_TL = {v: k for k, v in _TO_TL.items()}
_GLOBAL_FROM_TL = {v: k for k, v in _GLOBAL_TO_TL.items()}


def to_transformer_lens(site: str | Site) -> str:
    """TransformerLens hook name of a concrete site (``blocks.3.attn.z`` -> ``blocks.3.attn.hook_z``).

    TransformerLens's ``hook_embed`` excludes learned positional embeddings, which it hooks separately as
    ``hook_pos_embed``; lsi's ``embed`` includes them (it equals ``blocks.0.resid_pre``). ``logits`` has no
    TransformerLens hook.
    """
    s = Site.parse(site)
    if s.kind in _GLOBAL_TO_TL:
        return _GLOBAL_TO_TL[s.kind]
    if s.kind not in _TO_TL:
        raise SiteError("a site with a TransformerLens hook", str(s), "logits are the model output; no hook exists")
    return f"blocks.{s.layer}.{_TO_TL[s.kind]}"


def from_transformer_lens(name: str) -> Site:
    """Site for a TransformerLens hook name (``blocks.3.hook_resid_post`` -> ``blocks.3.resid_post``)."""
    if name in _GLOBAL_FROM_TL:
        return Site(_GLOBAL_FROM_TL[name])
    m = re.match(r"^blocks\.(-?\d+)\.(.+)$", name)
    if not m or m.group(2) not in _FROM_TL:
        close = difflib.get_close_matches(name, [f"blocks.0.{v}" for v in _FROM_TL] + list(_GLOBAL_FROM_TL), n=3)
        raise SiteError("a TransformerLens hook name", repr(name), f"closest: {close}" if close else
                        "use names like 'blocks.0.hook_resid_pre'")
    return Site(_FROM_TL[m.group(2)], int(m.group(1)))
