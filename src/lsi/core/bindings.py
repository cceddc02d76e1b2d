"""Bindings: where each concrete site lives in the HF module tree and how to read and write it there.

A binding names a module, a phase (``pre``: the module's input, ``post``: its output) and two functions: ``get``
returns the site's value in canonical shape from a hook call, ``put`` writes a new canonical value back. This is
the one place that turns module inputs/outputs (tensors or tuples) into site tensors and back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from lsi.arch.dims import ModelDims, get_module, linear_weight
from lsi.arch.spec import ArchSpec
from lsi.core.sites import Site
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


def _split_heads(x: torch.Tensor, n: int) -> torch.Tensor:
    return x.unflatten(-1, (n, x.shape[-1] // n))


def _qkv_binding(site: Site, layer: nn.Module, spec: ArchSpec, dims: ModelDims) -> Binding:
    which = "qkv".index(site.kind[-1])
    n = dims.n_heads if which == 0 else dims.n_kv_heads
    own = (spec.q_proj, spec.k_proj, spec.v_proj)[which]
    if own is not None:
        module = get_module(layer, own)
        return Binding(site, module, "post", lambda call: _split_heads(get_output(call), n),
                       lambda call, new, old: set_output(call, new.flatten(-2)))
    assert spec.qkv_proj is not None, f"{spec.family}: no q/k/v projection in the spec"
    fused = get_module(layer, spec.qkv_proj)
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


def head_out_weight(o_proj: nn.Module, spec: ArchSpec, dims: ModelDims) -> torch.Tensor:
    """W_O split by head: ``[n_heads, d_head, d_model]``."""
    w = linear_weight(o_proj, spec.conv1d)  # [d_model, n_heads * d_head]
    return w.T.unflatten(0, (dims.n_heads, dims.d_head))


_HEAD_OUT_TAG = "_lsi_head_out"


def _head_out_binding(site: Site, layer: nn.Module, spec: ArchSpec, dims: ModelDims) -> Binding:
    """head_out is derived from z; a write adds the change of the heads' sum to the projection's output and tags
    that output tensor with the new per-head values, so later hooks (other sessions) read what the model used."""
    o_proj = get_module(layer, spec.o_proj)

    def get(call: HookCall) -> torch.Tensor:
        tagged = getattr(get_output(call), _HEAD_OUT_TAG, None)
        if tagged is not None:
            return tagged
        z = _split_heads(get_input(call), dims.n_heads)
        w = head_out_weight(o_proj, spec, dims).to(z.dtype)
        return torch.einsum("...he,hed->...hd", z, w)

    def put(call: HookCall, new: torch.Tensor, old: torch.Tensor) -> None:
        out = get_output(call)
        changed = out + (new - old).sum(-2).to(out.dtype)
        setattr(changed, _HEAD_OUT_TAG, new)
        set_output(call, changed)

    return Binding(site, o_proj, "post", get, put)


def _pattern_binding(site: Site, attn: nn.Module) -> Binding:
    def get(call: HookCall) -> torch.Tensor:
        pattern = get_output(call, slot=1) if isinstance(call.output, (tuple, list)) else None
        if pattern is None:
            raise AttentionImplementationError(
                "attention weights from the attention module (eager attention)", "none (a fused kernel ran)",
                "load with attn_implementation='eager' or call lm.use_eager_attention()")
        return pattern

    return Binding(site, attn, "post", get, None)


def _resid_mid_binding(site: Site, layer: nn.Module, spec: ArchSpec) -> Binding:
    stash: dict[str, torch.Tensor] = {}

    def remember(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        stash["resid_pre"] = get_input(HookCall(args, kwargs))

    def get(call: HookCall) -> torch.Tensor:
        return stash["resid_pre"] + get_output(call)  # the same single addition HF performs

    def put(call: HookCall, new: torch.Tensor, old: torch.Tensor) -> None:
        set_output(call, new - stash["resid_pre"])  # attention now writes exactly what makes resid_mid == new

    return Binding(site, get_module(layer, spec.attn_out), "post", get, put, helpers=[(layer, "pre", remember)])


def bind(site: Site, model: nn.Module, spec: ArchSpec, dims: ModelDims) -> Binding:
    """The binding of a concrete, index-free site (``Site("attn.z", 3)``)."""
    kind = site.kind
    if kind == "embed":
        return _input_binding(site, get_module(model, spec.layer_path(0)))
    if kind == "ln_final":
        return _output_binding(site, get_module(model, spec.final_norm))
    if kind == "logits":
        return _output_binding(site, get_module(model, spec.unembed))
    assert isinstance(site.layer, int), f"bind() needs a concrete layer, got {site}"
    layer = get_module(model, spec.layer_path(site.layer))
    if kind == "resid_pre":
        return _input_binding(site, layer)
    if kind == "resid_post":
        return _output_binding(site, layer)
    if kind == "resid_mid":
        if spec.is_parallel(model.config):
            raise SiteUnavailableError(
                f"a site of {spec.family} (parallel attention: attention and MLP both read resid_pre)",
                str(site), "use resid_pre, attn.out and mlp.out; resid_post = resid_pre + attn.out + mlp.out")
        return _resid_mid_binding(site, layer, spec)
    if kind == "attn.out":
        return _output_binding(site, get_module(layer, spec.attn_out))
    if kind == "mlp.out":
        return _output_binding(site, get_module(layer, spec.mlp_out))
    if kind == "mlp.pre":
        return _input_binding(site, get_module(layer, spec.mlp_act))
    if kind == "mlp.post":
        return _input_binding(site, get_module(layer, spec.mlp_down))
    if kind == "attn.z":
        o_proj = get_module(layer, spec.o_proj)
        return Binding(site, o_proj, "pre", lambda call: _split_heads(get_input(call), dims.n_heads),
                       lambda call, new, old: set_input(call, new.flatten(-2)))
    if kind == "attn.head_out":
        return _head_out_binding(site, layer, spec, dims)
    if kind == "attn.pattern":
        return _pattern_binding(site, get_module(layer, spec.attn))
    if kind in ("attn.q", "attn.k", "attn.v"):
        return _qkv_binding(site, layer, spec, dims)
    raise AssertionError(f"no binding rule for {kind}")  # every SiteKind has a rule above
