"""The hook manager: one scoped set of PyTorch hooks for interventions, caching and gradients.

A :class:`HookSession` groups the bindings it needs by (module, phase), installs one hook per group and removes
all of them on exit, also when the code inside raises. At each firing it applies, per site: interventions in
the order given, then the zero-valued gradient probe (if requested), then caching; so a cache records the value
the model actually used.

A session that intervenes is *guarded*: a cheap check per forward pass (one device sync) raises
:class:`~lsi.errors.NonFiniteSteeringError` naming the active interventions instead of letting wrong numbers out:
the logits must be finite, and the residual stream entering the final norm must be finite with a finite sum of
squares in float32 (float64 for float64 models; past that, the norm divides by infinity and every logit
collapses to the same value, e.g. 0, although each one is finite). Padding positions are not checked.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from lsi.arch.dims import ModelDims, get_module
from lsi.arch.spec import ArchSpec
from lsi.core.bindings import Binding, HookCall, Phase, bind
from lsi.core.interventions import Intervention, OpContext
from lsi.core.positions import All, Positions
from lsi.core.sites import Site
from lsi.errors import NonFiniteSteeringError, ReadOnlySiteError


@dataclass
class ForwardState:
    """What the current forward pass is processing, recorded by a pre-hook on the model itself."""

    input_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None  # for the tokens of this call only
    prefill: bool = True
    memo: dict[Any, Any] = field(default_factory=dict)

    def update(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        source = ids if ids is not None else embeds
        assert source is not None, "the model was called without input_ids or inputs_embeds"
        shape = source.shape[:2]
        mask = kwargs.get("attention_mask")
        past = kwargs.get("past_key_values")
        past_len = past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else 0
        if mask is None or mask.dim() != 2:
            mask = torch.ones(shape, dtype=torch.long, device=source.device)
        self.input_ids = ids
        self.attention_mask = mask[:, -shape[1]:]
        self.prefill = past_len == 0
        self.memo = {}

    @property
    def padded(self) -> bool:
        assert self.attention_mask is not None
        return not bool(self.attention_mask.bool().all())

    def mask_for(self, op: Intervention) -> torch.Tensor | bool | None:
        """``False``: skip the op now; ``None``: apply everywhere; a bool tensor ``[b, p]``: apply there."""
        if not self.prefill:
            return False if op.scope == "prompt" else None
        if op.scope == "generated":
            return False
        if isinstance(op.positions, All) and not self.padded:
            return None
        key = ("mask", op.positions)
        if key not in self.memo:
            assert self.attention_mask is not None
            ids = self.input_ids if self.input_ids is not None else torch.zeros_like(self.attention_mask)
            self.memo[key] = op.positions.mask(ids, self.attention_mask)
        return self.memo[key]

    def index_for(self, positions: Positions) -> torch.Tensor:
        key = ("index", positions)
        if key not in self.memo:
            assert self.attention_mask is not None
            ids = self.input_ids if self.input_ids is not None else torch.zeros_like(self.attention_mask)
            self.memo[key] = positions.index(ids, self.attention_mask)
        return self.memo[key]


def _align(mask: torch.Tensor, value: torch.Tensor, axis: int) -> torch.Tensor:
    """Reshape a ``[b, p]`` mask to broadcast against ``value`` along its position axis."""
    mask = mask[:, -value.shape[axis]:].to(value.device)  # logits may cover only the last positions
    shape = [1] * value.dim()
    shape[0], shape[axis] = mask.shape[0], mask.shape[1]
    return mask.view(shape)


def apply_intervention(op: Intervention, site: Site, value: torch.Tensor, mask: torch.Tensor | None,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """New value of a site after ``op`` (restricted to ``site``'s head/neuron index and to ``mask``)."""
    idx = site.indices()
    axis = site.info.index_axis
    if idx is None or axis is None:
        index = None
        sub = value
    else:
        index = torch.tensor(idx, device=value.device)
        sub = value.index_select(axis, index)

    def select(t: torch.Tensor) -> torch.Tensor:
        return t if index is None else t.index_select(axis, index.to(t.device))  # type: ignore[arg-type]

    new = op.transform(sub, OpContext(site, select, attention_mask))
    if new is sub:
        return value
    if mask is not None:
        new = torch.where(_align(mask, sub, site.info.position_axis), new, sub)
    return new if index is None else value.index_copy(axis, index, new)  # type: ignore[arg-type]


def _gather_positions(value: torch.Tensor, index: torch.Tensor, axis: int) -> torch.Tensor:
    moved = value.movedim(axis, 1)
    rows = torch.arange(moved.shape[0], device=moved.device)[:, None]
    return moved[rows, index.to(moved.device)].movedim(1, axis)


def _bad_real_rows(finite: torch.Tensor, attention_mask: torch.Tensor | None) -> int:
    """How many real (non-padding) positions of a ``[b, p]`` finiteness map are not finite (``p`` may cover only
    the last positions of the mask)."""
    bad = ~finite
    if attention_mask is not None:
        bad = bad & attention_mask[:, -bad.shape[1]:].bool().to(bad.device)
    return int(bad.sum())


class OutputGuard:
    """The checks of a guarded session (see the module docstring); ``label()`` names the active interventions.

    Fast path, one device sync per forward pass: the norm of the final norm's input plus the sum of the logits
    (both in float32, or float64 for a float64 model) must be finite (NaN and infinity propagate through both).
    Only when it is not are the values examined per position, padding excluded, to raise or to let a harmless
    case (padding, a huge total of individually sound rows) through.
    """

    _FIX = ("lower the strength (a residual stream past ~1e19 overflows the norms), or run the model in float32; "
            "check values built from data for NaN, and the model itself (lsi.self_check(lm))")

    def __init__(self, label: Callable[[], str], state: ForwardState) -> None:
        self.label, self.state = label, state
        self._norm_input: torch.Tensor | None = None

    def norm_input(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._norm_input = (args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor)))

    def logits(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        x, self._norm_input = self._norm_input, None
        logits = getattr(output, "logits", None)
        if logits is None or x is None:
            return
        logits, x = logits.detach(), x.detach()
        wide = torch.promote_types(x.dtype, torch.float32)  # what norms compute in (float64 stays float64)
        total = torch.linalg.vector_norm(x, dtype=wide) + logits.sum(dtype=wide)
        if bool(torch.isfinite(total)):
            return
        mask = self.state.attention_mask
        nan_inf = _bad_real_rows(torch.isfinite(x).all(-1), mask)
        overflow = _bad_real_rows(torch.isfinite(x.to(wide).square().sum(-1)), mask)
        bad_logits = _bad_real_rows(torch.isfinite(logits).all(-1), mask)
        if nan_inf:
            self._raise("a finite residual stream at the final norm", f"NaN/inf at {nan_inf} positions")
        if overflow:
            self._raise(f"a residual stream the final norm can normalize (sum of squares finite in {wide})",
                        f"|values| up to {float(x.abs().max()):.3g} at {overflow} positions: the logits "
                        "would collapse to a constant")
        if bad_logits:
            self._raise("finite logits", f"NaN/inf logits at {bad_logits} positions")

    def _raise(self, expected: str, found: str) -> None:
        raise NonFiniteSteeringError(f"{expected} under {self.label()}", found, self._FIX)


class HookSession:
    """Scoped hooks for one purpose: ``with HookSession(...) as s: model(...)``; then read ``s.values``.

    ``guard`` (a function naming the active interventions) turns on the output checks of the module docstring.
    """

    def __init__(self, model: nn.Module, spec: ArchSpec, dims: ModelDims, *,
                 interventions: Iterable[Intervention] = (), cache: Iterable[Site] = (),
                 cache_positions: Positions | None = None, cache_device: torch.device | str | None = None,
                 grads: Iterable[Site] = (), guard: Callable[[], str] | None = None) -> None:
        self.model = model
        self.state = ForwardState()
        self._guard = None if guard is None else (OutputGuard(guard, self.state), get_module(model, spec.final_norm))
        self.values: dict[str, torch.Tensor] = {}
        self.probes: dict[str, torch.Tensor] = {}
        self.fire_counts: dict[str, int] = defaultdict(int)
        self._cache_positions = cache_positions
        self._cache_device = cache_device
        self._ops: dict[str, list[tuple[Intervention, Site]]] = defaultdict(list)
        # values are kept per index-free site; a cache slices heads/neurons out on read
        self._cache_keys = {str(s.without_index()) for s in cache}
        self._grad_keys = {str(s.without_index()) for s in grads}
        self._bindings: dict[str, Binding] = {}
        for op in interventions:
            for concrete in op.site.expand(dims.n_layers):
                self._ops[str(concrete.without_index())].append((op, concrete))
        for key in [*self._ops, *sorted(self._cache_keys | self._grad_keys)]:
            if key not in self._bindings:
                self._bindings[key] = bind(Site.parse(key), model, spec, dims)
        read_only = sorted(k for k in [*self._ops, *self._grad_keys] if self._bindings[k].put is None)
        if read_only:
            raise ReadOnlySiteError("writable sites for interventions and gradients", f"{read_only} (read-only)",
                                    "intervene on or differentiate attn.q / attn.k / attn.z instead of the pattern")
        self._handles: list[RemovableHandle] = []

    # -- firing ------------------------------------------------------------------------------------------------
    def _fire(self, key: str, binding: Binding, call: HookCall) -> None:
        self.fire_counts[key] += 1
        value: torch.Tensor | None = None  # the site's value as the model now uses it (derived sites included)
        for op, concrete in self._ops.get(key, ()):
            mask = self.state.mask_for(op)
            if mask is False:
                continue
            old = binding.get(call) if value is None else value
            new = apply_intervention(op, concrete, old, mask, self.state.attention_mask)  # type: ignore[arg-type]
            if new is not old:
                assert binding.put is not None  # read-only sites are refused in __init__
                binding.put(call, new, old)
            value = new
        if key in self._grad_keys:
            old = binding.get(call) if value is None else value
            probe = torch.zeros_like(old, requires_grad=True)
            assert binding.put is not None  # read-only sites are refused in __init__
            value = old + probe
            binding.put(call, value, old)
            self.probes[key] = probe
        if key in self._cache_keys:
            value = (binding.get(call) if value is None else value).detach()
            if self._cache_positions is not None and self.state.prefill:
                axis = binding.site.info.position_axis
                value = _gather_positions(value, self.state.index_for(self._cache_positions), axis)
            if self._cache_device is not None:
                value = value.to(self._cache_device)
            self.values[key] = value

    def _make_hook(self, phase: Phase, group: list[tuple[str, Binding]]) -> Any:
        if phase == "pre":
            def pre(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                call = HookCall(args, kwargs)
                for key, binding in group:
                    self._fire(key, binding, call)
                return call.args, call.kwargs
            return pre

        def post(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            call = HookCall(args, kwargs, output)
            for key, binding in group:
                self._fire(key, binding, call)
            return call.output
        return post

    # -- install / remove ----------------------------------------------------------------------------------------
    def __enter__(self) -> HookSession:
        try:
            self._handles.append(self.model.register_forward_pre_hook(
                lambda m, a, kw: self.state.update(a, kw), with_kwargs=True))
            groups: dict[tuple[int, Phase], list[tuple[str, Binding]]] = defaultdict(list)
            modules: dict[int, nn.Module] = {}
            for key, binding in self._bindings.items():
                groups[(id(binding.module), binding.phase)].append((key, binding))
                modules[id(binding.module)] = binding.module
            for (mid, phase), group in groups.items():
                self._install(modules[mid], phase, self._make_hook(phase, group))
            # helpers after the groups, so they see values after this session's interventions
            for binding in self._bindings.values():
                for module, phase, fn in binding.helpers:
                    self._install(module, phase, fn)
            if self._guard is not None:
                guard, final_norm = self._guard
                self._install(final_norm, "pre", guard.norm_input)
                self._install(self.model, "post", guard.logits)
        except BaseException:
            self.close()
            raise
        return self

    def _install(self, module: nn.Module, phase: Phase, hook: Any) -> None:
        if phase == "pre":
            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        else:
            self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(self, *exc: object) -> None:
        self.close()
