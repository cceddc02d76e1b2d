"""The residual DAG of a decoder-only transformer, runs with any set of its edges patched, and the gradient of a
metric at every edge's receiving end.

Senders (writers to the residual stream): ``embed``, every head ``blocks.{l}.attn.head_out[h]``, every MLP
``blocks.{l}.mlp.out``. Receivers (readers of it), each with its own residual input: the query input of every
head, the key and value inputs of every key/value head, the input of every MLP and the logits (the final
residual). Under grouped-query attention the key and value projections belong to the ``n_kv_heads`` KV heads,
each shared by several query heads, so edges into keys and values go to the KV head; query edges go to each query
head. An edge joins every sender to every later receiver. Labels are ``"{sender}->{receiver}"``, the receiver
named by the site its input feeds (``attn.q`` / ``attn.k`` / ``attn.v`` indexed by query / KV head, the MLP by its
output site)::

    embed->blocks.0.attn.q[3]                       the query input of head 3 of layer 0
    blocks.0.attn.head_out[1]->blocks.1.attn.k[0]   the key input of KV head 0 of layer 1
    blocks.0.attn.head_out[2]->blocks.0.mlp.out     the input of the MLP of layer 0
    blocks.1.mlp.out->logits

Patching edge u→v makes v read its residual input minus ``a_u(current) − a_u(corrupted)``: v sees u's corrupted
output while every other receiver sees u's current one. With every edge patched the model computes the corrupted
run, with none the clean run (to float round-off).

How a receiver gets its own input, through interventions at existing sites only: a head's q/k/v projection output
gains ``(N(x − D_v) − N(x)) @ W[h]`` (``x`` = the layer's ``resid_pre``, ``N`` = the layer's pre-attention norm,
``D_v`` = the summed differences of v's patched edges); an MLP reads ``resid_mid − D`` and its output gets ``+ D``
back, so the residual stream itself is unchanged; the logits read ``resid_post − D`` of the last layer. Gradients
are the same reads pulled back: ``∂m/∂z_q[h] = J_N(x)ᵀ W_Q[h] ∂m/∂q[h]``, ``∂m/∂z_mlp = ∂m/∂resid_mid −
∂m/∂resid_post``, ``∂m/∂z_logits = ∂m/∂resid_post`` (last layer).

Supported: sequential pre-norm blocks (Llama, Mistral, Qwen2/3, Phi-3, GPT-2, GPT-NeoX without parallel
residual). Refused with :class:`~lsi.errors.UnknownArchitectureError`: parallel attention (no ``resid_mid``: the MLP
reads ``resid_pre``) and post-norm families (Gemma-2, OLMo-2), where what a head adds to the residual stream is
not its ``head_out``. The pre-attention norm is the spec's ``pre_attn_norm``, verified on a short input (its
output through ``W_Q`` must reproduce ``attn.q``); memory grows with senders × tokens.

Example:
    >>> import lsi
    >>> from lsi.testing import tiny_model
    >>> graph = CircuitGraph.of(lsi.LanguageModel(tiny_model("llama")))  # 4 query heads, 2 KV heads, 2 layers
    >>> len(graph.senders), len(graph.receivers), len(graph.edges)
    (11, 19, 82)
    >>> graph.edges[0], graph.edges[-1]
    ('embed->blocks.0.attn.q[0]', 'blocks.1.mlp.out->logits')
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lsi.arch.dims import get_module
from lsi.core.inputs import Batch
from lsi.core.interventions import Apply, Intervention
from lsi.core.model import evaluate
from lsi.core.runs import ContextFactory, as_run, check_aligned
from lsi.errors import InputError, ShapeMismatchError, UnknownArchitectureError

if TYPE_CHECKING:
    from lsi.core.cache import ActivationCache
    from lsi.core.model import LanguageModel, Metric

DEFAULT_BATCH_SIZE = 512  # rows per forward when copies of the inputs are stacked along the batch
_QKV = "qkv"


@dataclass(frozen=True, eq=False)
class CircuitGraph:
    """The residual DAG of one model: senders, receivers and which edges exist (build with :meth:`of`)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    norms: tuple[nn.Module, ...] = field(repr=False)  # pre-attention norm of each layer

    @classmethod
    def of(cls, lm: LanguageModel) -> CircuitGraph:
        """The graph of ``lm``, after checking the residual stream decomposes into its senders."""
        _require_sequential_prenorm(lm)
        d = lm.dims
        return cls(d.n_layers, d.n_heads, d.n_kv_heads, _attention_norms(lm))

    # -- nodes -------------------------------------------------------------------------------------------------
    @property
    def _block(self) -> int:
        return self.n_heads + 2 * self.n_kv_heads + 1  # receivers per layer

    @cached_property
    def senders(self) -> tuple[str, ...]:
        out = ["embed"]
        for layer in range(self.n_layers):
            out += [f"blocks.{layer}.attn.head_out[{h}]" for h in range(self.n_heads)] + [f"blocks.{layer}.mlp.out"]
        return tuple(out)

    @cached_property
    def receivers(self) -> tuple[str, ...]:
        out = []
        for layer in range(self.n_layers):
            for kind in _QKV:
                n = self.n_heads if kind == "q" else self.n_kv_heads
                out += [f"blocks.{layer}.attn.{kind}[{h}]" for h in range(n)]
            out.append(f"blocks.{layer}.mlp.out")
        return (*out, "logits")

    @property
    def sender_sites(self) -> list[str]:
        """The sites to cache from a corrupted run (every sender's output)."""
        return ["embed", "blocks.*.attn.head_out", "blocks.*.mlp.out"]

    def qkv_rows(self, layer: int, which: int) -> list[int]:
        """Receiver indices of layer ``layer``'s query (0), key (1) or value (2) inputs."""
        start = layer * self._block + (0, self.n_heads, self.n_heads + self.n_kv_heads)[which]
        return list(range(start, start + (self.n_heads if which == 0 else self.n_kv_heads)))

    def mlp_row(self, layer: int) -> int:
        return layer * self._block + self._block - 1

    @property
    def logits_row(self) -> int:
        return self.n_layers * self._block

    def senders_before(self, layer: int, *, mlp: bool) -> int:
        """How many senders write before layer ``layer``'s attention (``mlp=False``) or its MLP reads."""
        return 1 + layer * (self.n_heads + 1) + (self.n_heads if mlp else 0)

    # -- edges -------------------------------------------------------------------------------------------------
    @cached_property
    def allowed(self) -> torch.Tensor:
        """``[receivers, senders]`` bool: which edges exist (the sender writes before the receiver reads)."""
        reads = torch.full((len(self.receivers),), len(self.senders))
        for layer in range(self.n_layers):
            for which in range(3):
                reads[self.qkv_rows(layer, which)] = self.senders_before(layer, mlp=False)
            reads[self.mlp_row(layer)] = self.senders_before(layer, mlp=True)
        return torch.arange(len(self.senders))[None, :] < reads[:, None]

    @cached_property
    def edges(self) -> tuple[str, ...]:
        """Edge labels in receiver-major order (the order of ``allowed.nonzero()``)."""
        return tuple(f"{self.senders[s]}->{self.receivers[r]}" for r, s in self.allowed.nonzero().tolist())

    def to_matrix(self, values: torch.Tensor) -> torch.Tensor:
        """Per-edge values ``[..., n_edges]`` into ``[..., receivers, senders]`` (zero where no edge exists)."""
        out = values.new_zeros((*values.shape[:-1], *self.allowed.shape))
        out[..., self.allowed] = values
        return out

    def mask(self, edges: Iterable[str]) -> torch.Tensor:
        """``[receivers, senders]`` bool, true at the given edge labels."""
        index = {label: i for i, label in enumerate(self.edges)}
        flat = torch.zeros(len(self.edges), dtype=torch.bool)
        for label in edges:
            if label not in index:
                raise InputError("edge labels of this model's graph ('sender->receiver')", repr(label),
                                 f"pick from graph.edges, e.g. {self.edges[0]!r}")
            flat[index[label]] = True
        return self.to_matrix(flat)

    def sender_values(self, cache: ActivationCache) -> torch.Tensor:
        """Every sender's output from a cache of :attr:`sender_sites`: ``[batch, pos, senders, d_model]``."""
        parts = [cache["embed"][:, :, None]]
        for layer in range(self.n_layers):
            parts += [cache[f"blocks.{layer}.attn.head_out"], cache[f"blocks.{layer}.mlp.out"][:, :, None]]
        return torch.cat(parts, 2)


def _require_sequential_prenorm(lm: LanguageModel) -> None:
    fix = ("circuit discovery needs sequential pre-norm blocks (Llama, Mistral, Qwen, Phi-3, GPT-2, GPT-NeoX with "
           "use_parallel_residual=False); use head or MLP patching for this model")
    if lm.parallel_attn:
        raise UnknownArchitectureError("attention and MLP in sequence (the MLP reads resid_mid)",
                                       f"{lm.family} with parallel attention", fix)
    spec, layer = lm.spec, get_module(lm.model, lm.spec.layer_path(0))
    mlp = spec.mlp_down.rsplit(".", 1)[0]
    for what, path, own in (("attention", spec.attn_out, spec.attn), ("MLP", spec.mlp_out, mlp)):
        if path != own and list(get_module(layer, path).parameters()):
            raise UnknownArchitectureError(
                f"the {what} output added to the residual stream as it is", f"{lm.family}: a norm ({path!r}) "
                f"between the {what} and the residual stream", fix)
    if spec.pre_attn_norm is None:
        raise UnknownArchitectureError("a norm between the residual stream and q/k/v",
                                       f"{lm.family}: the spec names no pre_attn_norm", fix)


def _attention_norms(lm: LanguageModel) -> tuple[nn.Module, ...]:
    """The spec's pre-attention norm of every layer, checked on a short input: its output through W_Q must
    reproduce ``attn.q`` (bias-free: differences between positions are compared)."""
    d, path = lm.dims, lm.spec.pre_attn_norm
    assert path is not None  # refused by _require_sequential_prenorm
    norms = tuple(get_module(lm.model, lm.spec.layer_path(layer, path)) for layer in range(d.n_layers))
    ids = (torch.arange(6) * 7 + 3) % d.vocab
    cache = lm.run_with_cache(ids[None], ["blocks.*.resid_pre", "blocks.*.attn.q"])
    wrong = [layer for layer, norm in enumerate(norms) if not _reproduces_q(lm, layer, norm, cache)]
    if wrong:
        raise UnknownArchitectureError("a pre_attn_norm whose output through W_Q gives attn.q",
                                       f"{lm.family}: {path!r} does not, in layers {wrong}",
                                       "set pre_attn_norm in the model's ArchSpec to the norm feeding q/k/v")
    return norms


def _reproduces_q(lm: LanguageModel, layer: int, norm: nn.Module, cache: ActivationCache) -> bool:
    with torch.no_grad():
        x, q = cache[f"blocks.{layer}.resid_pre"][0], cache[f"blocks.{layer}.attn.q"][0]
        n = norm(x)
        predicted = torch.einsum("pd,hde->phe", n - n[:1], lm.weights.W_Q(layer))
        actual = q - q[:1]
        return bool((predicted - actual).norm() <= 1e-2 * actual.norm())


# -- clean / corrupted ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Contrast:
    """A clean batch, the setting it runs in, and the corrupted run's sender values ``[batch, pos, senders, d]``."""

    batch: Batch
    setting: ContextFactory
    corrupt: torch.Tensor
    f_corrupt: float


def contrast(lm: LanguageModel, graph: CircuitGraph, clean: Any, corrupted: Any, metric: Metric) -> Contrast:
    """Run the corrupted inputs (in their setting) once and keep what edge patching needs. Every metric, the
    corrupted run's included, is evaluated against the clean batch (the patched runs' inputs)."""
    clean_run, corrupt_run = as_run(clean), as_run(corrupted)
    batch, other = lm.to_batch(clean_run.inputs), lm.to_batch(corrupt_run.inputs)
    check_aligned(batch, other)
    with corrupt_run.setting():
        cache = lm.run_with_cache(other, graph.sender_sites)
    assert cache.logits is not None
    return Contrast(batch, clean_run.setting, graph.sender_values(cache), float(evaluate(metric, cache.logits, batch)))


def per_copy(metric: Metric, batch: Batch) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits of stacked copies of ``batch`` -> the metric of each copy ``[copies]``."""
    def values(logits: torch.Tensor) -> torch.Tensor:
        return torch.stack([evaluate(metric, part, batch) for part in logits.split(len(batch.input_ids))])
    return values


# -- patched runs --------------------------------------------------------------------------------------------------

class _PatchedForward:
    """Interventions for one forward of ``k`` stacked copies, copy ``i`` with the edges ``patched[i]`` patched.

    Sender outputs are kept as differences to the corrupted run, sender-major (``[n, k, batch * pos * d]``), so
    the shift of a set of receivers is one batched matrix product with the patch weights."""

    def __init__(self, lm: LanguageModel, graph: CircuitGraph, corrupt: torch.Tensor, patched: torch.Tensor) -> None:
        self.graph = graph
        self.corrupt = corrupt.permute(2, 0, 1, 3).flatten(1)  # [senders, batch * pos * d]
        self.weights = patched.to(corrupt.dtype)
        self.active = patched.any(0).any(-1)  # receivers with a patched edge in some copy
        w = lm.weights
        self.proj = {(layer, which): (w.W_Q, w.W_K, w.W_V)[which](layer)
                     for layer in range(graph.n_layers) for which in range(3)}
        self.diffs: list[torch.Tensor] = []  # this forward's (current − corrupted) sender outputs so far
        self.joined = corrupt.new_zeros((0,))
        self.x = corrupt.new_zeros(())
        self.mlp_shift = corrupt.new_zeros(())

    def interventions(self) -> list[Intervention]:
        g = self.graph
        ops: list[Intervention] = []
        for layer in range(g.n_layers):
            ops.append(Apply(f"blocks.{layer}.resid_pre", partial(self._enter, layer)))
            ops += [Apply(f"blocks.{layer}.attn.{kind}", partial(self._qkv, layer, which))
                    for which, kind in enumerate(_QKV) if bool(self.active[g.qkv_rows(layer, which)].any())]
            ops.append(Apply(f"blocks.{layer}.attn.head_out", self._record))
            if bool(self.active[g.mlp_row(layer)]):
                ops += [Apply(f"blocks.{layer}.resid_mid", partial(self._mlp_in, layer)),
                        Apply(f"blocks.{layer}.mlp.out", self._mlp_out)]
            else:
                ops.append(Apply(f"blocks.{layer}.mlp.out", self._record_one))
        if bool(self.active[g.logits_row]):
            ops.append(Apply(f"blocks.{g.n_layers - 1}.resid_post", self._final))
        return ops

    def _record(self, outputs: torch.Tensor) -> torch.Tensor:
        """Keep ``outputs`` ``[k * batch, pos, n, d]`` of the next ``n`` senders."""
        n, k, start = outputs.shape[2], self.weights.shape[0], sum(len(d) for d in self.diffs)
        current = outputs.permute(2, 0, 1, 3).reshape(n, k, -1)
        self.diffs.append(current - self.corrupt[start:start + n, None])
        return outputs

    def _record_one(self, out: torch.Tensor) -> torch.Tensor:
        self._record(out[:, :, None])
        return out

    def _shift(self, rows: list[int]) -> torch.Tensor:
        """``D`` of receivers ``rows``: the summed (current − corrupted) outputs of their patched senders,
        ``[k * batch, pos, len(rows), d]``."""
        n = sum(len(d) for d in self.diffs)
        if len(self.joined) != n:
            self.joined = torch.cat(self.diffs).transpose(0, 1)  # [k, n, batch * pos * d]
        shift = torch.bmm(self.weights[:, rows, :n], self.joined)  # [k, rows, batch * pos * d]
        b_p_d = self.x.shape[1:]
        return shift.unflatten(2, (-1, *b_p_d)).permute(0, 2, 3, 1, 4).flatten(0, 1)

    def _enter(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        self.x = x
        if layer == 0:
            self.diffs = []
            self._record(x[:, :, None])
        return x

    def _qkv(self, layer: int, which: int, value: torch.Tensor) -> torch.Tensor:
        rows = self.graph.qkv_rows(layer, which)
        heads = [i for i, r in enumerate(rows) if bool(self.active[r])]
        x = self.x[:, :, None]
        normed = self.graph.norms[layer](torch.cat([x - self._shift([rows[i] for i in heads]), x], 2))
        change = normed[:, :, :-1] - normed[:, :, -1:]  # [k * batch, pos, heads, d]
        projected = torch.bmm(change.permute(2, 0, 1, 3).flatten(1, 2), self.proj[layer, which][heads])
        index = torch.tensor(heads, device=value.device)
        return value.index_add(2, index, projected.unflatten(1, value.shape[:2]).permute(1, 2, 0, 3).to(value.dtype))

    def _mlp_in(self, layer: int, resid_mid: torch.Tensor) -> torch.Tensor:
        self.mlp_shift = self._shift([self.graph.mlp_row(layer)])[:, :, 0]
        return resid_mid - self.mlp_shift

    def _mlp_out(self, out: torch.Tensor) -> torch.Tensor:
        self._record(out[:, :, None])
        return out + self.mlp_shift

    def _final(self, resid: torch.Tensor) -> torch.Tensor:
        return resid - self._shift([self.graph.logits_row])[:, :, 0]


def patched_metrics(lm: LanguageModel, graph: CircuitGraph, con: Contrast, patched: torch.Tensor, metric: Metric, *,
                    batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    """The metric of the clean run with the edges ``patched[i]`` (``[n, receivers, senders]`` bool) patched to the
    corrupted run, for each ``i``: ``[n]``. A forward holds ``max(1, batch_size // len(batch))`` copies.

    Example:
        >>> con = contrast(lm, graph, clean_ids, corrupt_ids, metric)  # doctest: +SKIP
        >>> patched_metrics(lm, graph, con, torch.stack([graph.mask(["embed->logits"]), graph.allowed]), metric)
        ... # doctest: +SKIP
    """
    if patched.shape[1:] != graph.allowed.shape:
        raise ShapeMismatchError(f"edge masks shaped [n, {len(graph.receivers)}, {len(graph.senders)}]",
                                 f"{tuple(patched.shape)}", "build masks with graph.mask(...) or graph.to_matrix")
    check_batch_size(batch_size)
    patched = patched.bool() & graph.allowed
    per_forward = max(1, batch_size // len(con.batch.input_ids))
    values = []
    with con.setting():
        for chunk in patched.split(per_forward):
            run = _PatchedForward(lm, graph, con.corrupt, chunk.to(con.corrupt.device))
            with lm.intervene(run.interventions()):
                logits = lm.forward(con.batch.repeat(len(chunk)))
            values.append(per_copy(metric, con.batch)(logits))
    return torch.cat(values).double().cpu()


# -- gradients at the receivers ------------------------------------------------------------------------------------

def receiver_grads(lm: LanguageModel, graph: CircuitGraph, batch: Batch, metric: Metric,
                   embed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward and backward: (the metric, every sender's output ``[batch, pos, senders, d]``, ∂metric/∂(each
    receiver's input) ``[batch, pos, receivers, d]``). ``embed`` replaces the embeddings (e.g. interpolated ones).

    Example:
        >>> value, senders, grads = receiver_grads(lm, graph, lm.to_batch(ids), metric)  # doctest: +SKIP
    """
    sites = ["embed", *[f"blocks.*.{s}" for s in ("resid_pre", "attn.q", "attn.k", "attn.v", "attn.head_out",
                                                  "resid_mid", "mlp.out", "resid_post")]]
    intervention = [] if embed is None else [Apply("embed", lambda _: embed)]
    with lm.intervene(intervention):
        run = lm.run_with_grads(batch, metric, sites)
    acts, grads, w = run.activations, run.grads, lm.weights
    parts = []
    for layer in range(graph.n_layers):
        site = f"blocks.{layer}"
        pulled = [torch.einsum("bphe,hde->bphd", grads[f"{site}.attn.{kind}"], proj(layer))
                  for kind, proj in zip(_QKV, (w.W_Q, w.W_K, w.W_V), strict=True)]
        parts += [_norm_vjp(graph.norms[layer], acts[f"{site}.resid_pre"], torch.cat(pulled, 2)),
                  (grads[f"{site}.resid_mid"] - grads[f"{site}.resid_post"])[:, :, None]]
    parts.append(grads[f"blocks.{graph.n_layers - 1}.resid_post"][:, :, None])
    return run.value, graph.sender_values(acts), torch.cat(parts, 2)


def _norm_vjp(norm: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """``J_norm(x)ᵀ g`` for each of ``grad_out``'s slices ``[batch, pos, n, d]``."""
    with torch.enable_grad():
        xs = x[:, :, None].expand_as(grad_out).detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(norm(xs), xs, grad_out.to(x.dtype))
    return grad


def edge_products(graph: CircuitGraph, diff: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """``Σ_{batch,pos} diff_u · grad_v`` for every existing edge u→v: ``[n_edges]`` (float32 or wider)."""
    dtype = torch.promote_types(diff.dtype, torch.float32)
    full = torch.einsum("bpsd,bprd->rs", diff.to(dtype), grads.to(dtype))
    return full[graph.allowed.to(full.device)].cpu()


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise InputError("batch_size >= 1 (rows per forward)", str(batch_size), "e.g. batch_size=512")

