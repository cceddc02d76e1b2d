"""Bindings: where each concrete site lives in the HF module tree and how to read and write it there.

A binding names a module, a phase (``pre``: the module's input, ``post``: its output) and two functions: ``get``
returns the site's value in canonical shape from a hook call, ``put`` writes a new canonical value back. This is
the one place that turns module inputs/outputs (tensors or tuples) into site tensors and back.

Each site kind carries its binding rule; the built-in kinds (the site contract, :data:`BUILT_IN_KINDS` at the
end of this module) register through :func:`~lsi.core.sites.register_site_kind` like any other kind. A derived kind
(:class:`~lsi.core.sites.Derived`) is bound through its parent's binding by :func:`bind_derived`.

Example:
    >>> from lsi.testing import tiny_model
    >>> import lsi
    >>> lm = lsi.LanguageModel(tiny_model("llama"))
    >>> b = bind(lsi.Site("mlp.post", 1), lm.model, lm.spec, lm.dims)
    >>> b.phase, type(b.module).__name__
    ('pre', 'Linear')
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lsi.arch.dims import ModelDims, get_module, linear_weight
from lsi.arch.spec import ArchSpec
from lsi.core.sites import BindingRule, Derived, Site, SiteKind
from lsi.errors import AttentionImplementationError, SiteUnavailableError

Phase = Literal["pre", "post"]


@dataclass
class HookCall:
    """One firing of a module hook: its (mutable) inputs and, for ``post`` hooks, its output."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any = None


# --- the one place that knows how module inputs and outputs are packed ---------------------------------------

def get_input(call: HookCall) -> torch.Tensor:
    if call.args:
        return call.args[0]
    return call.kwargs["hidden_states"]


def set_input(call: HookCall, value: torch.Tensor) -> None:
    if call.args:
        call.args = (value, *call.args[1:])
    else:
        call.kwargs["hidden_states"] = value


def get_output(call: HookCall, slot: int = 0) -> Any:
    out = call.output
    return out if isinstance(out, torch.Tensor) else out[slot]


def set_output(call: HookCall, value: torch.Tensor, slot: int = 0) -> None:
    if isinstance(call.output, torch.Tensor):
        call.output = value
    else:
        items = list(call.output)
        items[slot] = value
        call.output = type(call.output)(items) if isinstance(call.output, tuple) else items


Getter = Callable[[HookCall], torch.Tensor]
Putter = Callable[[HookCall, torch.Tensor, torch.Tensor], None]  # (call, new, old)


@dataclass
class Binding:
    site: Site
    module: nn.Module
    phase: Phase
    get: Getter
    put: Putter | None  # None: read-only
    # extra raw PyTorch hooks this binding needs (module, phase, hook) -- e.g. stashing resid_pre for resid_mid
    helpers: list[tuple[nn.Module, Phase, Callable[..., None]]] = field(default_factory=list)


def _input_binding(site: Site, module: nn.Module) -> Binding:
    return Binding(site, module, "pre", get_input, lambda call, new, old: set_input(call, new))


def _output_binding(site: Site, module: nn.Module) -> Binding:
    return Binding(site, module, "post", get_output, lambda call, new, old: set_output(call, new))


def _in_layer(site: Site, model: nn.Module, spec: ArchSpec, path: str = "") -> Any:
    """The site's decoder layer, or the module at ``path`` inside it."""
    assert isinstance(site.layer, int), f"bind() needs a concrete layer, got {site}"
    return get_module(model, spec.layer_path(site.layer, path))


def _layer_input(path: Callable[[ArchSpec], str]) -> BindingRule:
    """Rule for a site that is the first input of ``path(spec)`` inside its layer (``""``: the layer)."""
    return lambda site, model, spec, dims: _input_binding(site, _in_layer(site, model, spec, path(spec)))


def _layer_output(path: Callable[[ArchSpec], str]) -> BindingRule:
    """Rule for a site that is the output of ``path(spec)`` inside its layer (``""``: the layer)."""
    return lambda site, model, spec, dims: _output_binding(site, _in_layer(site, model, spec, path(spec)))


def _model_output(path: Callable[[ArchSpec], str]) -> BindingRule:
    """Rule for a global site that is the output of the module ``path(spec)`` of the model."""
    return lambda site, model, spec, dims: _output_binding(site, get_module(model, path(spec)))


def _embed_rule(site: Site, model: nn.Module, spec: ArchSpec, dims: ModelDims) -> Binding:
    return _input_binding(site, get_module(model, spec.layer_path(0)))


def _split_heads(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.unflatten(-1, (n, x.shape[-1] // n))


def _z_rule(site: Site, model: nn.Module, spec: ArchSpec, dims: ModelDims) -> Binding:
    return Binding(site, _in_layer(site, model, spec, spec.o_proj), "pre",
                   lambda call: _split_heads(get_input(call), dims.n_heads),
                   lambda call, new, old: set_input(call, new.flatten(-2)))


def _qkv_rule(which: int) -> BindingRule:
    """Rule for the query (0), key (1) or value (2) projection, own or fused."""

    def rule(site: Site, model: nn.Module, spec: ArchSpec, dims: ModelDims) -> Binding:
        n = dims.n_heads if which == 0 else dims.n_kv_heads
        own = (spec.q_proj, spec.k_proj, spec.v_proj)[which]
        if own is not None:
            return Binding(site, _in_layer(site, model, spec, own), "post",
                           lambda call: _split_heads(get_output(call), n),
                           lambda call, new, old: set_output(call, new.flatten(-2)))
        assert spec.qkv_proj is not None, f"{spec.family}: no q/k/v projection in the spec"
        fused = _in_layer(site, model, spec, spec.qkv_proj)
        dh = dims.d_head
        if spec.qkv_layout == "per_head":  # [.., h, 3, dh] interleaved per head (GPT-NeoX)

            def get(call: HookCall) -> torch.Tensor:
                return get_output(call).unflatten(-1, (dims.n_heads, 3, dh))[..., which, :]

            def put(call: HookCall, new: torch.Tensor, old: torch.Tensor) -> None:
                raw = get_output(call).unflatten(-1, (dims.n_heads, 3, dh)).clone()
                raw[..., which, :] = new
                set_output(call, raw.flatten(-3))

            return Binding(site, fused, "post", get, put)
        sizes = (dims.n_heads * dh, dims.n_kv_heads * dh, dims.n_kv_heads * dh)
        start = sum(sizes[:which])
        stop = start + sizes[which]

        def get_slice(call: HookCall) -> torch.Tensor:
            return _split_heads(get_output(call)[..., start:stop], n)

        def put_slice(call: HookCall, new: torch.Tensor, old: torch.Tensor) -> None:
            raw = get_output(call).clone()
            raw[..., start:stop] = new.flatten(-2)
            set_output(call, raw)

        return Binding(site, fused, "post", get_slice, put_slice)

    return rule


# --- values written through a derived view, visible to later hooks -------------------------------------------

_WRITTEN = "_lsi_written"  # attribute of a module's input/output tensor: {site: the derived value the model used}


def _stored(phase: Phase, call: HookCall) -> torch.Tensor:
    """The tensor object that holds a ``phase`` hook's value in ``call`` (the one a write replaces)."""
    return get_input(call) if phase == "pre" else get_output(call)


def _written(phase: Phase, call: HookCall, site: str) -> torch.Tensor | None:
    """The value of the derived ``site`` that an earlier write stored in ``call`` (another session's hook)."""
    written = getattr(_stored(phase, call), _WRITTEN, None)
    return None if written is None else written.get(site)


def _remember_written(phase: Phase, call: HookCall, site: str, value: torch.Tensor) -> None:
    stored = _stored(phase, call)
    written = getattr(stored, _WRITTEN, None)
    if written is None:
        written = {}
        setattr(stored, _WRITTEN, written)
    written[site] = value


def bind_derived(site: Site, derived: Derived, model: nn.Module, spec: ArchSpec, dims: ModelDims) -> Binding:
    """The binding of a derived site: read from its parent site's binding (same layer) and written back into it.

    A write stores ``derived.write(parent, old, new)`` as the parent and records ``new`` on the tensor it
    replaced the parent's with, so a later hook on that module (another session) reads the value the model used
    instead of re-deriving it (``read(write(p, old, new))`` need not equal ``new``: a ReLU encoder, a projection).
    """
    parent = bind(Site(derived.parent, site.layer), model, spec, dims)
    read, write, parent_put, key = derived.read, derived.write, parent.put, str(site)

    def get(call: HookCall) -> torch.Tensor:
        known = _written(parent.phase, call, key)
        return known if known is not None else read(parent.get(call))

    if write is None or parent_put is None:
        return Binding(site, parent.module, parent.phase, get, None, helpers=parent.helpers)
    write_back = write

    def put(call: HookCall, new: torch.Tensor, old: torch.Tensor) -> None:
        value = parent.get(call)
        parent_put(call, write_back(value, old, new), value)
        _remember_written(parent.phase, call, key, new)

    return Binding(site, parent.module, parent.phase, get, put, helpers=parent.helpers)


def head_out_weight(o_proj: nn.Module, spec: ArchSpec, dims: ModelDims) -> torch.Tensor:
    """W_O split by head: ``[n_heads, d_head, d_model]``."""
    w = linear_weight(o_proj, spec.conv1d)  # [d_model, n_heads * d_head]
    return w.T.unflatten(0, (dims.n_heads, dims.d_head))


def _head_out_rule(site: Site, model: nn.Module, spec: ArchSpec, dims: ModelDims) -> Binding:
    """head_out is read from z (the projection's input) and written to the projection's output: a write adds
    the change of the heads' sum. Not a :class:`Derived` of ``attn.z``, since a new per-head write need not lie
    in the image of W_O[h]; like one, it records the values it wrote for later hooks."""
    o_proj, key = _in_layer(site, model, spec, spec.o_proj), str(site)

    def get(call: HookCall) -> torch.Tensor:
        known = _written("post", call, key)
        if known is not None:
            return known
        z = _split_heads(get_input(call), dims.n_heads)
        w = head_out_weight(o_proj, spec, dims).to(z.dtype)
        return torch.einsum("...he,hed->...hd", z, w)

    def put(call: HookCall, new: torch.Tensor, old: torch.Tensor) -> None:
        out = get_output(call)
        set_output(call, out + (new - old).sum(-2).to(out.dtype))
        _remember_written("post", call, key, new)

    return Binding(site, o_proj, "post", get, put)


def _pattern_rule(site: Site, model: nn.Module, spec: ArchSpec, dims: ModelDims) -> Binding:
    def get(call: HookCall) -> torch.Tensor:
        pattern = get_output(call, slot=1) if isinstance(call.output, (tuple, list)) else None
        if pattern is None:
            raise AttentionImplementationError(
                "attention weights from the attention module (eager attention)", "none (a fused kernel ran)",
                "load with attn_implementation='eager' or call lm.use_eager_attention()")
        return pattern

    return Binding(site, _in_layer(site, model, spec, spec.attn), "post", get, None)


def _resid_mid_rule(site: Site, model: nn.Module, spec: ArchSpec, dims: ModelDims) -> Binding:
    if spec.is_parallel(model.config):
        raise SiteUnavailableError(
            f"a site of {spec.family} (parallel attention: attention and MLP both read resid_pre)",
            str(site), "use resid_pre, attn.out and mlp.out; resid_post = resid_pre + attn.out + mlp.out")
    stash: dict[str, torch.Tensor] = {}

    def remember(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        stash["resid_pre"] = get_input(HookCall(args, kwargs))

    def get(call: HookCall) -> torch.Tensor:
        return stash["resid_pre"] + get_output(call)  # the same single addition HF performs

    def put(call: HookCall, new: torch.Tensor, old: torch.Tensor) -> None:
        set_output(call, new - stash["resid_pre"])  # attention now writes exactly what makes resid_mid == new

    return Binding(site, _in_layer(site, model, spec, spec.attn_out), "post", get, put,
                   helpers=[(_in_layer(site, model, spec), "pre", remember)])


def bind(site: Site, model: nn.Module, spec: ArchSpec, dims: ModelDims) -> Binding:
    """The binding of a concrete, index-free site (``Site("attn.z", 3)``), by its kind's rule.

    Raises :class:`~lsi.errors.SiteUnavailableError` where this model has no such site.
    """
    rule = site.info.binding
    if isinstance(rule, Derived):
        return bind_derived(site, rule, model, spec, dims)
    return rule(site, model, spec, dims)


# --- the built-in kinds: the site contract (ARCHITECTURE.md) ------------------------------------------------

_RESID = ("batch", "pos", "d_model")
_HEADS = ("batch", "pos", "n_heads", "d_head")
_KV_HEADS = ("batch", "pos", "n_kv_heads", "d_head")
_NEURONS = ("batch", "pos", "d_mlp")

BUILT_IN_KINDS = (  # registered by lsi.core.sites on first use of the registry
    SiteKind("embed", _RESID, "token (+ learned positional) embedding = blocks.0.resid_pre", _embed_rule,
             per_layer=False, transformer_lens="hook_embed"),
    SiteKind("resid_pre", _RESID, "input of decoder layer i", _layer_input(lambda s: ""),
             transformer_lens="hook_resid_pre"),
    SiteKind("resid_mid", _RESID, "resid_pre + attn.out (sequential-attention families only)", _resid_mid_rule,
             transformer_lens="hook_resid_mid"),
    SiteKind("resid_post", _RESID, "output of layer i = resid_pre[i+1] (before final norm)",
             _layer_output(lambda s: ""), transformer_lens="hook_resid_post"),
    SiteKind("attn.out", _RESID, "what attention adds to the residual stream", _layer_output(lambda s: s.attn_out),
             transformer_lens="hook_attn_out"),
    SiteKind("attn.z", _HEADS, "per-head mixed values (input of W_O)", _z_rule, index_axis=2,
             transformer_lens="attn.hook_z"),
    SiteKind("attn.head_out", ("batch", "pos", "n_heads", "d_model"), "per-head write z_h @ W_O[h]", _head_out_rule,
             index_axis=2, transformer_lens="attn.hook_result"),
    SiteKind("attn.pattern", ("batch", "n_heads", "q_pos", "k_pos"), "post-softmax attention probabilities",
             _pattern_rule, index_axis=1, position_axis=2, transformer_lens="attn.hook_pattern"),
    SiteKind("attn.q", _HEADS, "query projection (before rotary embedding)", _qkv_rule(0), index_axis=2,
             transformer_lens="attn.hook_q"),
    SiteKind("attn.k", _KV_HEADS, "key projection (before rotary embedding)", _qkv_rule(1), index_axis=2,
             transformer_lens="attn.hook_k"),
    SiteKind("attn.v", _KV_HEADS, "value projection", _qkv_rule(2), index_axis=2, transformer_lens="attn.hook_v"),
    SiteKind("mlp.out", _RESID, "what the MLP adds to the residual stream", _layer_output(lambda s: s.mlp_out),
             transformer_lens="hook_mlp_out"),
    SiteKind("mlp.post", _NEURONS, "neuron activations = input of the down projection",
             _layer_input(lambda s: s.mlp_down), index_axis=2, transformer_lens="mlp.hook_post"),
    SiteKind("mlp.pre", _NEURONS, "pre-activation (the gate branch for gated MLPs)", _layer_input(lambda s: s.mlp_act),
             index_axis=2, transformer_lens="mlp.hook_pre"),
    SiteKind("ln_final", _RESID, "final-norm output", _model_output(lambda s: s.final_norm), per_layer=False,
             transformer_lens="ln_final.hook_normalized"),
    SiteKind("logits", ("batch", "pos", "vocab"), "unembedding output", _model_output(lambda s: s.unembed),
             per_layer=False),
)
