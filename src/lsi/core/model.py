"""LanguageModel: an HF causal LM, its tokenizer and its architecture spec, with scoped hooks.

The wrapper never changes the HF forward: with no intervention active, logits are bit-identical to calling the
HF model on the same ids and mask.

Example:
    >>> import lsi
    >>> from lsi.testing import tiny_model
    >>> lm = lsi.LanguageModel(tiny_model("llama"))
    >>> cache = lm.run_with_cache([[1, 2, 3]], sites=["blocks.*.resid_post"])
    >>> tuple(cache["blocks.1.resid_post"].shape)
    (1, 3, 32)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from lsi.arch.dims import ModelDims, get_module
from lsi.arch.registry import candidate_specs
from lsi.arch.spec import ArchSpec
from lsi.core.bindings import bind
from lsi.core.cache import ActivationCache
from lsi.core.hooks import HookSession
from lsi.core.inputs import Batch, Inputs, PaddingSide, to_batch
from lsi.core.interventions import Intervention
from lsi.core.limits import InputLimits
from lsi.core.positions import PositionSpec, as_positions
from lsi.core.sites import SITE_KINDS, LayerSpec, Site, SiteKind, as_sites
from lsi.core.steering import Steering, compose
from lsi.core.weight_edit import added_to_weights
from lsi.core.weights import Weights
from lsi.errors import InputError, NonFiniteMetricError, SiteUnavailableError, UnknownArchitectureError

SiteSpec = str | Site | Sequence[str | Site]
Metric = Callable[[torch.Tensor, Batch], torch.Tensor]


def evaluate(metric: Metric, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """``metric(logits, batch)``, refused unless it is a finite scalar tensor."""
    value = metric(logits, batch)
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        found = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise InputError("a metric returning a scalar tensor", found, "reduce it, e.g. metric(...).mean() or .sum()")
    if not bool(torch.isfinite(value.detach()).all()):
        name = getattr(metric, "__name__", type(metric).__name__)
        raise NonFiniteMetricError(f"a finite value of the metric {name}", f"{float(value.detach())}",
                                   "guard its divisions and logs (e.g. log_softmax instead of log(softmax)); "
                                   "check that the logits are finite")
    return value.reshape(())


@dataclass(frozen=True)
class GradResult:
    """A scalar metric, the activations it was computed from, and its gradient with respect to each site."""

    value: torch.Tensor
    activations: ActivationCache
    grads: ActivationCache


class LanguageModel:
    """Wraps a ``transformers`` causal LM. Build it with :func:`lsi.load` or directly from a model object."""

    def __init__(self, model: Any, tokenizer: Any = None, *, spec: ArchSpec | None = None,
                 verify: bool | None = None) -> None:
        if getattr(model, "config", None) is None:
            raise InputError("a transformers causal LM (a PreTrainedModel with a config)", type(model).__name__,
                             "load it with lsi.load(path) or AutoModelForCausalLM; a custom nn.Module needs a "
                             "PretrainedConfig and an ArchSpec (spec=)")
        self.model = model.eval()
        self.tokenizer = tokenizer
        candidates, self.probed = ([spec], False) if spec is not None else candidate_specs(model)
        for i, candidate in enumerate(candidates):
            self.spec = candidate
            self.dims = ModelDims.read(model, candidate)
            self.limits = InputLimits.read(model, candidate)
            self._bound: dict[tuple[str, LayerSpec | None], SiteKind] = {}  # (kind, layer) found available
            self.attn_switched_from: str | None = None
            if not (verify if verify is not None else self.probed):
                break
            from lsi.core.selfcheck import require_self_check

            try:
                require_self_check(self)
                break
            except UnknownArchitectureError:
                if i == len(candidates) - 1:
                    raise

    # -- basic facts -------------------------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def device(self) -> torch.device:
        return get_module(self.model, self.spec.embed).weight.device

    @property
    def attn_implementation(self) -> str:
        return str(getattr(self.model.config, "_attn_implementation", "eager"))

    @property
    def weights(self) -> Weights:
        """Weight objects (W_E, W_U, per-head W_Q/W_K/W_V/W_O, QK/OV circuits, neuron key/value weights)."""
        return Weights(self)

    @property
    def parallel_attn(self) -> bool:
        return self.spec.is_parallel(self.model.config)

    def available_sites(self) -> list[Site]:
        """Every concrete site this model has (one per layer for per-layer kinds)."""
        out: list[Site] = []
        for kind in SITE_KINDS.values():
            layers: list[int | None] = list(range(self.dims.n_layers)) if kind.per_layer else [None]
            for layer in layers:
                site = Site(kind.name, layer)
                try:
                    bind(site, self.model, self.spec, self.dims)
                except SiteUnavailableError:
                    continue
                out.append(site)
        return out

    def site_shape(self, site: str | Site, *, batch: int = 1, pos: int = 1) -> tuple[int, ...]:
        """Shape of a site's value for a batch; ``pos`` is the sequence length."""
        s = Site.parse(site)
        self._check_available(s)
        sizes = {"batch": batch, "pos": pos, "q_pos": pos, "k_pos": pos}
        shape = [sizes[d] if d in sizes else s.info.dim_size(d, self.dims) for d in s.info.shape]
        if s.info.index_axis is not None and s.indices() is not None:
            n = len(s.indices())  # type: ignore[arg-type]
            if isinstance(s.index, int):
                del shape[s.info.index_axis]
            else:
                shape[s.info.index_axis] = n
        return tuple(shape)

    def _check_available(self, site: Site) -> None:
        key = (site.kind, site.layer)
        if self._bound.get(key) is not site.info:  # a kind's rule refuses sites this model does not have
            for concrete in site.without_index().expand(self.dims.n_layers):
                bind(concrete, self.model, self.spec, self.dims)
            self._bound[key] = site.info
        idx, axis = site.indices(), site.info.index_axis
        if idx is not None and axis is not None:
            from lsi.errors import IndexOutOfRangeError

            name = site.info.shape[axis]
            size = site.info.dim_size(name, self.dims)
            bad = [i for i in idx if not 0 <= i < size]
            if bad:
                raise IndexOutOfRangeError(f"{name} indices in [0, {size - 1}]", f"{bad} in {site}",
                                           f"this model has {name}={size}")

    def resolve_sites(self, sites: SiteSpec) -> list[Site]:
        """Parse, expand and check site selectors against this model."""
        concrete = as_sites(sites, self.dims.n_layers)  # type: ignore[arg-type]
        for s in concrete:
            self._check_available(s)
        return concrete

    # -- inputs --------------------------------------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        tok_pad = getattr(self.tokenizer, "pad_token_id", None)
        cfg_pad = getattr(self.model.config, "pad_token_id", None)
        return int(tok_pad if tok_pad is not None else cfg_pad if cfg_pad is not None else 0)

    def to_batch(self, inputs: Inputs | Batch, *, padding_side: PaddingSide | None = None,
                 new_tokens: int = 0) -> Batch:
        """Tokenize and pad ``inputs`` (text, ids, tensors or a tokenizer's output) onto the model's device; checked
        against the vocabulary and the context (with ``new_tokens`` to generate), see :mod:`lsi.core.limits`."""
        side = padding_side or getattr(self.tokenizer, "padding_side", None) or "right"
        batch = to_batch(inputs, tokenizer=self.tokenizer, padding_side=side, pad_id=self.pad_id)
        self.limits.check(batch, new_tokens=new_tokens)
        if isinstance(inputs, str) or (isinstance(inputs, Sequence) and any(isinstance(t, str) for t in inputs)):
            self.limits.check_text(batch, self.tokenizer)
        return batch.to(self.device)

    def batches(self, inputs: Inputs | Batch, batch_size: int) -> Iterator[Batch]:
        """``inputs`` as padded batches of at most ``batch_size`` rows (for streaming over a dataset)."""
        if batch_size < 1:
            raise InputError("batch_size >= 1", str(batch_size), "pass a positive batch size, e.g. batch_size=32")
        return self.to_batch(inputs).chunks(batch_size)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        if self.tokenizer is None:
            raise InputError("a tokenizer to encode text", "none", "load the model with a tokenizer")
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    # -- running -------------------------------------------------------------------------------------------------
    def _call(self, batch: Batch, **kwargs: Any) -> Any:
        extra = {"position_ids": batch.position_ids} if batch.has_padding else {}
        return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                          **extra, **kwargs)

    def forward(self, inputs: Inputs | Batch, **kwargs: Any) -> torch.Tensor:
        """Logits ``[batch, pos, vocab]`` of the HF model (with any active interventions)."""
        with torch.no_grad():
            return self.logits_with_grad(inputs, **kwargs)

    def logits_with_grad(self, inputs: Inputs | Batch, **kwargs: Any) -> torch.Tensor:
        """Like :meth:`forward`, but under the caller's grad mode (for gradients with respect to parameters)."""
        return self._call(self.to_batch(inputs), **kwargs).logits

    def _needs_patterns(self, sites: list[Site]) -> None:
        if any(s.kind == "attn.pattern" for s in sites) and self.attn_implementation != "eager":
            warnings.warn(f"attention patterns need eager attention: switching {self.family} from "
                          f"{self.attn_implementation!r} to 'eager' (numerics may differ in the last bits; load "
                          "with attn_implementation='eager' to avoid the switch)", stacklevel=3)
            self.use_eager_attention()

    def use_eager_attention(self) -> None:
        """Switch to eager attention (needed for attention patterns); recorded in ``attn_switched_from``."""
        if self.attn_implementation != "eager":
            self.attn_switched_from = self.attn_implementation
            self.model.set_attn_implementation("eager")

    def run_with_cache(self, inputs: Inputs | Batch, sites: SiteSpec, *, positions: PositionSpec = None,
                       device: torch.device | str | None = None) -> ActivationCache:
        """Run once and cache only ``sites``.

        With ``positions`` (``"last"``, ints, a slice or a selector) each value keeps only those positions:
        ``[batch, k, ...]`` (the query axis for patterns). ``device`` moves cached values (e.g. ``"cpu"``).
        """
        concrete = self.resolve_sites(sites)
        self._needs_patterns(concrete)
        batch = self.to_batch(inputs)
        pos = None if positions is None else as_positions(positions)
        with torch.no_grad(), HookSession(self.model, self.spec, self.dims, cache=concrete, cache_positions=pos,
                                          cache_device=device) as session:
            out = self._call(batch)
        return ActivationCache(session.values, n_layers=self.dims.n_layers, input_ids=batch.input_ids,
                               attention_mask=batch.attention_mask,
                               positions=None if pos is None else pos.index(batch.input_ids, batch.attention_mask),
                               logits=out.logits)

    def run_with_grads(self, inputs: Inputs | Batch, metric: Metric, sites: SiteSpec) -> GradResult:
        """Run, compute the scalar ``metric(logits, batch)``, and return d(metric)/d(site) for every site.

        Gradients flow whether or not the model's parameters require grad (a zero-valued probe is added at
        each site, which leaves every value bit-identical).
        """
        concrete = self.resolve_sites(sites)
        self._needs_patterns(concrete)
        batch = self.to_batch(inputs)
        with torch.enable_grad(), HookSession(self.model, self.spec, self.dims, cache=concrete,
                                              grads=concrete) as session:
            logits = self._call(batch).logits
            value = evaluate(metric, logits, batch)
            probes = session.probes
            grads = torch.autograd.grad(value, list(probes.values()), allow_unused=True)
        grad_values = {key: (g if g is not None else torch.zeros_like(probes[key])).detach()
                       for key, g in zip(probes, grads, strict=True)}
        common: dict[str, Any] = dict(n_layers=self.dims.n_layers, input_ids=batch.input_ids,
                                      attention_mask=batch.attention_mask)
        return GradResult(value.detach(), ActivationCache(session.values, logits=logits.detach(), **common),
                          ActivationCache(grad_values, **common))

    def intervene(self, *steerings: Steering | Iterable[Steering]) -> AbstractContextManager[HookSession]:
        """Apply interventions and steerings (leaves such as ``lsi.Zero`` / ``lsi.Add``, weight edits,
        compositions, lists of them; in order) to every forward pass and ``generate`` call inside the block;
        weight deltas are added and restored bit-exactly on exit, hooks always removed. Checked against this model
        here, before the block. A forward pass whose logits come out NaN / infinite, or collapsed by a residual
        stream that overflows the final norm, raises :class:`~lsi.errors.NonFiniteSteeringError` naming the
        interventions (see :mod:`lsi.core.hooks`)."""
        steering = compose(*steerings)
        ops, deltas = steering.prepare(self)
        for op in ops:
            for s in op.site.expand(self.dims.n_layers):
                self._check_available(s)
        leaves = steering.leaves()

        def label() -> str:  # only spelled out when the guard raises
            names = [repr(leaf) for leaf in leaves[:4]]
            return ", ".join(names) + (f" and {len(leaves) - 4} more" if len(leaves) > 4 else "")

        return self._hooked(ops, deltas, label if leaves else None)

    @contextmanager
    def _hooked(self, ops: list[Intervention], deltas: dict[str, torch.Tensor],
                guard: Callable[[], str] | None) -> Iterator[HookSession]:
        with added_to_weights(self, deltas), HookSession(self.model, self.spec, self.dims, interventions=ops,
                                                         guard=guard) as session:
            yield session

    def generate(self, inputs: Inputs | Batch, *, max_new_tokens: int = 20, do_sample: bool = False,
                 **kwargs: Any) -> torch.Tensor:
        """``model.generate`` on left-padded inputs; returns ids ``[batch, prompt + new]``."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError("max_new_tokens >= 1", repr(max_new_tokens), "e.g. max_new_tokens=20")
        batch = self.to_batch(inputs, padding_side="left", new_tokens=max_new_tokens)
        with torch.no_grad():
            return self.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                       max_new_tokens=max_new_tokens, do_sample=do_sample,
                                       pad_token_id=self.pad_id, **kwargs)

    def generate_text(self, prompts: str | Sequence[str], **kwargs: Any) -> list[str]:
        """Generated texts (prompt included, special tokens dropped), one per prompt."""
        if self.tokenizer is None:
            raise InputError("a tokenizer to decode generated text", "none",
                             "load the model with a tokenizer, or call generate() for token ids")
        ids = self.generate(prompts, **kwargs)
        return list(self.tokenizer.batch_decode(ids, skip_special_tokens=True))

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """Logits from a residual-stream state: final norm, unembedding and any final soft-capping."""
        norm = get_module(self.model, self.spec.final_norm)
        logits = get_module(self.model, self.spec.unembed)(norm(resid))
        cap = getattr(self.model.config, self.spec.final_logit_softcap or "", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def __repr__(self) -> str:
        d = self.dims
        return (f"LanguageModel(family={self.family!r}, n_layers={d.n_layers}, d_model={d.d_model}, "
                f"n_heads={d.n_heads}, n_kv_heads={d.n_kv_heads}, d_mlp={d.d_mlp}, vocab={d.vocab})")
