"""Folding steering into weights: how a leaf folds (:class:`Folding`), the modules that write to the residual
stream as is, and the weight edits the core leaves fold into (a constant added to the stream becomes a bias; a
zeroed or scaled head or neuron becomes scaled projection columns). :func:`lsi.steer.export.fold` runs them.

Example:
    >>> import lsi
    >>> from lsi.testing import tiny_model
    >>> [w.name for w in residual_writers(lsi.LanguageModel(tiny_model("gpt2")))]
    ['embed', 'pos_embed', 'blocks.0.attn.out', 'blocks.0.mlp.out', 'blocks.1.attn.out', 'blocks.1.mlp.out']
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lsi.arch.dims import get_module, linear_weight
from lsi.core.model_copy import untie_embeddings
from lsi.core.positions import All
from lsi.errors import NotFoldableError

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel
    from lsi.core.sites import Site


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


# -- how a leaf folds -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Folding:
    """How one steering leaf folds into weights (its :meth:`~lsi.core.steering.Steering.folding`).

    ``edit`` changes a copy of the model in place. Edits run after every weight delta is added, in composition
    order within a ``stage`` and by ascending stage (1: additions, shifts and unit scalings; 2: projections out
    of the residual stream); layers in ``deletes`` are removed last. What the fold changes and reads lets
    :func:`lsi.steer.export.fold` refuse compositions whose folds would not commute with the hooks: ``layers``
    (where its change lives; refused in deleted layers), ``rewrites`` / ``reads`` (layers whose projection weights
    it rescales / reads), ``adds`` (a constant it adds to the residual stream) and ``removes`` (a unit direction
    it projects out).
    """

    edit: Callable[[LanguageModel], object] | None = None
    stage: int = 1
    layers: frozenset[int] = frozenset()
    rewrites: frozenset[int] = frozenset()
    reads: frozenset[int] = frozenset()
    adds: torch.Tensor | None = None
    removes: torch.Tensor | None = None
    deletes: frozenset[int] = frozenset()


HOOKS_FIX = "apply it with hooks (with lm.intervene(steering): ...) instead of exporting it"
BIAS_SWITCHES = ("mlp_bias", "attention_bias")  # HF config switches that give projections a bias
UNIT_KINDS = ("attn.z", "attn.head_out", "mlp.post")  # per-head / per-neuron sites whose scaling folds


def check_everywhere(leaf: Any, what: str) -> None:
    """Refuse a leaf that acts on some positions or some of a generation only (``leaf.positions`` /
    ``leaf.scope``): a weight acts on every token."""
    if not isinstance(leaf.positions, All) or leaf.scope != "all":
        raise NotFoldableError(f"{what} at every position of prompt and generated tokens",
                               f"{leaf!r}: positions={leaf.positions}, scope={leaf.scope} (position-dependent)",
                               HOOKS_FIX)


def writer_name(site: Site) -> str:
    """The residual writer whose output a constant added at a concrete ``site`` can be folded into."""
    kind, layer = site.kind, site.layer
    if kind == "embed" or (kind == "resid_pre" and layer == 0):
        return "embed"
    if isinstance(layer, int) and kind == "resid_pre":
        return f"blocks.{layer - 1}.mlp.out"
    if isinstance(layer, int) and kind in ("resid_post", "mlp.out"):
        return f"blocks.{layer}.mlp.out"
    if isinstance(layer, int) and kind in ("resid_mid", "attn.out"):
        return f"blocks.{layer}.attn.out"
    raise NotFoldableError("an addition at a residual-stream site (embed, resid_pre/mid/post, attn.out, mlp.out)",
                           f"{site} (its value is transformed before it reaches the stream)", HOOKS_FIX)


def bias_of(lm: LanguageModel, writer: Writer) -> torch.Tensor:
    """The writer's bias, adding zero biases through a config switch (``mlp_bias`` / ``attention_bias``) when it
    has none, so plain ``transformers`` builds the same modules; families without such a switch are refused."""
    if writer.bias is not None:
        return writer.bias
    config = lm.model.config
    for switch in BIAS_SWITCHES:
        if getattr(config, switch, None) is not False:
            continue
        shadow_config = copy.deepcopy(config)
        setattr(shadow_config, switch, True)
        with torch.device("meta"):
            shadow = type(lm.model)(shadow_config)
        added = sorted(set(shadow.state_dict()) - set(lm.model.state_dict()))
        modules = [get_module(lm.model, name.rsplit(".", 1)[0]) for name in added]
        if f"{writer.path}.bias" not in added or not all(
                n.endswith(".bias") and isinstance(m, nn.Linear) for n, m in zip(added, modules, strict=True)):
            continue
        for m in modules:
            m.bias = nn.Parameter(torch.zeros(m.out_features, dtype=m.weight.dtype, device=m.weight.device))
        setattr(config, switch, True)
        assert writer.bias is not None
        return writer.bias
    raise NotFoldableError(f"a bias on {writer.path} (or a config switch {list(BIAS_SWITCHES)} that adds one)",
                           f"none in {lm.family}", "plain transformers would not load an added bias; " + HOOKS_FIX)


def add_to_stream(lm: LanguageModel, sites: list[Site], delta: torch.Tensor) -> None:
    """Fold the constant ``delta`` (float64 ``[d_model]``) added at each concrete residual-stream site into the
    bias of the module that writes just before it, or every row of the token embedding (a tied unembedding is
    untied first)."""
    writers = {w.name: w for w in residual_writers(lm)}
    for s in sites:
        name = writer_name(s)
        if name == "embed":
            untie_embeddings(lm)
            target = writers[name].weight  # [d_model, vocab]: every token's row gets delta
            shift = delta[:, None]
        else:
            target, shift = bias_of(lm, writers[name]), delta
        with torch.no_grad():
            target.copy_((target.double() + shift.to(target.device)).to(target.dtype))


def unit_layers(lm: LanguageModel, leaf: Any) -> frozenset[int]:
    """The layers of a zero / scale leaf on heads or neurons at every position; refuses any other."""
    check_everywhere(leaf, "a zero or scale of heads or neurons")
    layers = set()
    for site in lm.resolve_sites(leaf.site):
        if site.kind not in UNIT_KINDS or site.indices() is None:
            raise NotFoldableError(f"heads or neurons ({', '.join(k + '[i]' for k in UNIT_KINDS)})", str(site),
                                   "use DeleteLayers for whole layers; " + HOOKS_FIX)
        assert isinstance(site.layer, int)
        layers.add(site.layer)
    return frozenset(layers)


def scale_units(lm: LanguageModel, site: Site, factor: float) -> None:
    """Fold ``x <- factor * x`` of heads or neurons at every position into ``lm``'s weights, in place: head ``h``'s
    columns of the attention output projection, or neuron ``j``'s column of the MLP down projection, times
    ``factor`` (their biases stay: a head's or a neuron's write does not include them)."""
    spec, d_head = lm.spec, lm.dims.d_head
    for s in lm.resolve_sites(site):
        assert isinstance(s.layer, int)
        is_head = s.kind != "mlp.post"
        path = spec.layer_path(s.layer, spec.o_proj if is_head else spec.mlp_down)
        weight = linear_weight(get_module(lm.model, path), spec.conv1d)  # [d_model, inputs], writes through
        columns = [c for i in s.indices() or () for c in (range(i * d_head, (i + 1) * d_head) if is_head else [i])]
        with torch.no_grad():
            weight[:, columns] *= factor
