"""Rank-one model editing (ROME, Meng et al. 2022): rewrite one fact in the MLP of one layer.

The MLP down projection ``W`` (bias ``b``) of layer ``l`` is read as a linear key -> value memory: keys are its
inputs (site ``blocks.{l}.mlp.post``), values its outputs (``blocks.{l}.mlp.out``, which the residual stream adds
as is; families with a norm after the MLP are refused with :class:`NotFoldableError`). For an
:class:`EditRequest` (prompts naming a subject, the last subject token of each, the new object token):

1. ``k*`` (:func:`subject_key`): the mean key at the last subject token over the prompts, each also behind a few
   prefixes (ROME's random contexts; the bare prompts always count, prefixes go after a leading BOS token);
2. ``v* = W k* + b + δ`` (:func:`edit_vectors`): Adam on ``δ``, added to the MLP output at the last subject
   token of every (prefixed) prompt, minimizing ``NLL(new object) + kl_weight · KL(base ‖ edited) +
   weight_decay · (|δ| / |v|)²`` (:class:`ValueOptimization`). The KL ("essence") term is taken at the last token
   of the request's essence prompts, with ``δ`` at their subject; ``v`` is the mean unedited value. The learning
   rate is in units of ``|v|`` (ROME's is absolute, 0.5), so the step follows the layer's activation scale; after
   every step ``|δ|`` is clamped to ``clamp · |v|`` (ROME's ``clamp_norm_factor``, 4); optimization stops once
   the NLL is below ``stop_nll`` (ROME: 0.05);
3. ``u = C⁻¹ k*`` with ``C = E[k kᵀ]`` over a corpus (:class:`KeyStatistics`, solved in float64; a ridge
   ``λ I``, ``λ = 1e-6 · mean diag C``, is added only when ``C`` is not positive definite, and recorded);
4. ``ΔW = (v* − W k* − b) uᵀ / (uᵀ k*)`` (:func:`rank_one_edit`): ``W' k* + b = v*`` exactly (up to the float32
   rounding of the stored ΔW), and every key with ``uᵀ k = 0`` (orthogonal to ``k*`` in the ``C⁻¹`` metric)
   keeps its value.

The result of :func:`rome_edit` is a :class:`~lsi.core.weight_edit.WeightEdit` (label ``"rome"``): applied in a
``with`` block, saved and loaded (refused on other weights), composed, folded and exported with
:func:`lsi.steer.export.export_hf`.

Example:
    >>> import lsi, torch
    >>> from lsi.testing import tiny_model
    >>> lm = lsi.LanguageModel(tiny_model("gpt2"))
    >>> corpus = torch.randint(3, 97, (8, 12), generator=torch.Generator().manual_seed(0))
    >>> request = EditRequest([[5, 6, 7, 8], [9, 5, 6, 10]], [1, 2], target_id=42)
    >>> found = edit_vectors(lm, request, 0)
    >>> edit = rank_one_edit(lm, 0, found.key, found.value, key_statistics(lm, 0, corpus))  # = rome_edit's
    >>> with edit.apply(lm):
    ...     torch.allclose(projected(down_projection(lm, 0), found.key), found.value, atol=1e-6)
    True
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from lsi.core.bundle import load_bundle, save_bundle
from lsi.core.folding import Writer, residual_writers
from lsi.core.identity import ModelIdentity
from lsi.core.interventions import Apply
from lsi.core.spans import token_id, token_spans
from lsi.core.steering import check_finite
from lsi.core.weight_edit import WeightEdit
from lsi.errors import IndexOutOfRangeError, InputError, ModelMismatchError
from lsi.evaluation.functional import kl_divergence

if TYPE_CHECKING:
    from lsi.core.inputs import Batch, Inputs
    from lsi.core.model import LanguageModel

FORMAT = 2  # 2: the model record holds every dimension
RIDGE = 1e-6  # λ / mean diag C, added only when C is not positive definite
N_PREFIXES, PREFIX_LENGTH = 5, 5  # default prefixes sampled from the corpus

Ids = tuple[int, ...]


# -- the request ----------------------------------------------------------------------------------------------------
def _ids(rows: Sequence[Sequence[int]], what: str) -> tuple[Ids, ...]:
    out = tuple(tuple(int(i) for i in row) for row in rows)
    if not out or any(not row for row in out):
        raise InputError(f"at least one non-empty {what}", f"{len(out)} rows, lengths {[len(r) for r in out]}",
                         f"pass {what} as lists of token ids")
    return out


def _positions(positions: Sequence[int], rows: tuple[Ids, ...], what: str) -> tuple[int, ...]:
    out = tuple(int(p) for p in positions)
    if len(out) != len(rows):
        raise InputError(f"one last-subject-token position per {what} ({len(rows)})", f"{len(out)} positions",
                         "give the index of the subject's last token in each prompt")
    bad = [(p, len(r)) for p, r in zip(out, rows, strict=True) if not 0 <= p < len(r)]
    if bad:
        raise IndexOutOfRangeError(f"positions inside their {what}", f"(position, length) pairs {bad[:3]}",
                                   "count positions from 0 over the prompt's token ids")
    return out


@dataclass(frozen=True)
class EditRequest:
    """What to edit: ``prompts`` (token ids; the object is predicted after the last token), the position of the
    subject's last token in each, the new object's token id and, optionally, essence prompts with their subject
    positions (KL term; default: each distinct prompt cut after its last subject token). ``subject`` labels it.

    Example:
        >>> r = EditRequest([[1, 4, 5, 24, 25]], [2], target_id=30, subject="ba ko")
        >>> r.essence, r.essence_positions
        (((1, 4, 5),), (2,))
    """

    prompts: tuple[Ids, ...]
    subject_positions: tuple[int, ...]
    target_id: int
    essence: tuple[Ids, ...] = ()
    essence_positions: tuple[int, ...] = ()
    subject: str = ""

    def __init__(self, prompts: Sequence[Sequence[int]], subject_positions: Sequence[int], target_id: int, *,
                 essence: Sequence[Sequence[int]] = (), essence_positions: Sequence[int] = (),
                 subject: str = "") -> None:
        rows = _ids(prompts, "prompt")
        positions = _positions(subject_positions, rows, "prompt")
        if not essence:
            cut = dict.fromkeys(row[: p + 1] for row, p in zip(rows, positions, strict=True))
            essence, essence_positions = list(cut), [len(c) - 1 for c in cut]
        essence_rows = _ids(essence, "essence prompt")
        object.__setattr__(self, "prompts", rows)
        object.__setattr__(self, "subject_positions", positions)
        object.__setattr__(self, "target_id", int(target_id))
        object.__setattr__(self, "essence", essence_rows)
        object.__setattr__(self, "essence_positions", _positions(essence_positions, essence_rows, "essence prompt"))
        object.__setattr__(self, "subject", subject)

    @classmethod
    def from_text(cls, lm: LanguageModel, templates: Sequence[str], subject: str, target: str | int, *,
                  essence_templates: Sequence[str] = ()) -> EditRequest:
        """A request from text templates with ``{}`` where the subject goes (tokenized as ``lm.to_batch`` does);
        ``target`` is a token id or a text that is one token (mind a leading space, e.g. ``" Paris"``).

        Example:
            >>> request = EditRequest.from_text(lm, ["{} lives in"], "Lily", " Rome")  # doctest: +SKIP
        """
        def encode(parts: Sequence[str]) -> tuple[list[list[int]], list[int]]:
            rows, positions = [], []
            for template in parts:
                if template.count("{}") != 1:
                    raise InputError("templates with one '{}' where the subject goes", repr(template),
                                     "e.g. '{} lives in'")
                head = template.split("{}")[0] + subject
                ids, upto = lm.to_batch(template.format(subject)), lm.to_batch(head)
                n = int(upto.attention_mask.sum())
                row = ids.input_ids[0][ids.attention_mask[0].bool()].tolist()
                if row[:n] != upto.input_ids[0][upto.attention_mask[0].bool()].tolist():
                    raise InputError(f"the subject {subject!r} to tokenize the same inside {template!r}",
                                     "other tokens at the subject's end", "put a space or punctuation after '{}'")
                rows.append(row)
                positions.append(n - 1)
            return rows, positions

        prompts, positions = encode(templates)
        essence, essence_positions = encode(essence_templates) if essence_templates else ([], [])
        return cls(prompts, positions, token_id(lm.tokenizer, target), essence=essence,
                   essence_positions=essence_positions, subject=subject)

    @classmethod
    def from_prompts(cls, lm: LanguageModel, prompts: Sequence[str], subject: str, target: str | int) -> EditRequest:
        """A request from prompts that each contain ``subject`` once (found in their tokens, chat-templated
        prompts included); ``target`` as in :meth:`from_text`.

        Example:
            >>> EditRequest.from_prompts(lm, ["The capital of France is"], "France", " Rome")  # doctest: +SKIP
        """
        batch = lm.to_batch(list(prompts), padding_side="right")
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(batch.input_ids, batch.attention_mask, strict=True)]
        spans = token_spans(lm.tokenizer, batch.input_ids, batch.attention_mask, subject)
        return cls(rows, [stop - 1 for _, stop in spans], token_id(lm.tokenizer, target), subject=subject)


def _bos_id(lm: LanguageModel) -> int | None:
    bos = getattr(lm.tokenizer, "bos_token_id", None)
    return bos if bos is not None else getattr(lm.model.config, "bos_token_id", None)


def with_prefixes(lm: LanguageModel, prompts: Sequence[Ids], positions: Sequence[int],
                  prefixes: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[int]]:
    """Every prompt bare, then behind each prefix (after a leading BOS token, where the prompt has one), with the
    shifted subject positions.

    Example:
        >>> import lsi
        >>> from lsi.testing import tiny_model
        >>> lm = lsi.LanguageModel(tiny_model("gpt2"))  # BOS id 1
        >>> with_prefixes(lm, [(1, 7, 8)], [1], [[3, 4]])
        ([[1, 7, 8], [1, 3, 4, 7, 8]], [1, 3])
    """
    bos = _bos_id(lm)
    rows, shifted = [], []
    for prefix in [(), *prefixes]:
        for prompt, p in zip(prompts, positions, strict=True):
            head = 1 if bos is not None and prompt[0] == bos else 0
            rows.append([*prompt[:head], *prefix, *prompt[head:]])
            shifted.append(p + len(prefix))
    return rows, shifted


def sample_prefixes(lm: LanguageModel, corpus: Inputs, n: int = N_PREFIXES, length: int = PREFIX_LENGTH, *,
                    seed: int = 0) -> list[list[int]]:
    """``n`` random windows of ``length`` real tokens (BOS tokens dropped) from the corpus rows, seeded."""
    batch = lm.to_batch(corpus)
    bos = _bos_id(lm)
    rows = [[t for t in ids[mask.bool()].tolist() if t != bos]
            for ids, mask in zip(batch.input_ids.cpu(), batch.attention_mask.cpu(), strict=True)]
    rows = [r for r in rows if r]
    if not rows:
        raise InputError("a corpus with real tokens to sample prefixes from", "none", "pass text or token ids")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        row = rng.choice(rows)
        start = rng.randrange(max(1, len(row) - length + 1))
        out.append(row[start: start + length])
    return out


# -- key statistics -------------------------------------------------------------------------------------------------
def down_projection(lm: LanguageModel, layer: int) -> Writer:
    """The MLP down projection of ``layer`` as a residual writer (``weight``: an ``[out, in]`` view).

    Raises :class:`NotFoldableError` for families whose MLP output is normed before the residual stream.
    """
    if not 0 <= layer < lm.dims.n_layers:
        raise IndexOutOfRangeError(f"a layer in [0, {lm.dims.n_layers - 1}]", str(layer),
                                   f"this model has {lm.dims.n_layers} layers")
    return {w.name: w for w in residual_writers(lm)}[f"blocks.{layer}.mlp.out"]


@dataclass(frozen=True, eq=False)
class KeyStatistics:
    """``C = E[k kᵀ]`` (float64 ``[d_mlp, d_mlp]``) of the down-projection inputs of one layer over ``count``
    corpus tokens; reusable for every edit at that layer, saved as ``.json`` + ``.safetensors``."""

    layer: int
    second_moment: torch.Tensor
    count: int
    model: ModelIdentity

    def check(self, lm: LanguageModel, layer: int) -> None:
        self.model.check(lm, "key statistics computed on")
        if layer != self.layer or self.second_moment.shape[0] != lm.dims.d_mlp:
            raise ModelMismatchError(f"key statistics of layer {layer} (d_mlp={lm.dims.d_mlp})",
                                     f"layer {self.layer}, d_mlp={self.second_moment.shape[0]}",
                                     "compute them with key_statistics(lm, layer, corpus) for this layer")

    @functools.cached_property
    def _factor(self) -> tuple[torch.Tensor, float]:
        """The Cholesky factor of ``C`` (plus ``λ I`` when ``C`` is not positive definite) and ``λ``; computed once."""
        c = self.second_moment.double()
        chol, info = torch.linalg.cholesky_ex(c)
        if int(info) == 0:
            return chol, 0.0
        ridge = RIDGE * float(c.diagonal().mean())
        return torch.linalg.cholesky(c + ridge * torch.eye(len(c), dtype=c.dtype)), ridge

    def solve(self, key: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``(u = C⁻¹ key, ridge λ)`` in float64, ``λ > 0`` only when ``C`` is not positive definite."""
        chol, ridge = self._factor
        return torch.cholesky_solve(key.double().cpu()[:, None], chol)[:, 0], ridge

    def save(self, path: str | Path) -> Path:
        """Write ``path.json`` + ``path.safetensors``; returns the JSON path."""
        return save_bundle(path, {"second_moment": self.second_moment},
                           {"format": FORMAT, "kind": "lsi.key_statistics", "layer": self.layer, "count": self.count,
                            "model": self.model.to_json()})

    @classmethod
    def load(cls, path: str | Path, lm: LanguageModel) -> KeyStatistics:
        """Read statistics written by :meth:`save`, refusing those of another model."""
        tensors, meta = load_bundle(path, what="key statistics written by KeyStatistics.save",
                                    fix="compute them with key_statistics(lm, layer, corpus) and save them",
                                    format=FORMAT)
        if meta.get("kind") != "lsi.key_statistics":
            raise InputError("a key-statistics bundle", f"kind {meta.get('kind')!r}", "load it with its own loader")
        stats = cls(meta["layer"], tensors["second_moment"], meta["count"], ModelIdentity.from_json(meta["model"]))
        stats.check(lm, stats.layer)
        return stats


def key_statistics(lm: LanguageModel, layer: int, corpus: Inputs, *, batch_size: int = 64) -> KeyStatistics:
    """``E[k kᵀ]`` of ``blocks.{layer}.mlp.post`` over every real token of ``corpus``, in float64.

    Example:
        >>> import lsi, torch
        >>> from lsi.testing import tiny_model
        >>> lm = lsi.LanguageModel(tiny_model("llama"))
        >>> stats = key_statistics(lm, 1, [[3, 4, 5], [6, 7]])
        >>> stats.count, tuple(stats.second_moment.shape)
        (5, (48, 48))
    """
    down_projection(lm, layer)
    site = f"blocks.{layer}.mlp.post"
    total = torch.zeros(lm.dims.d_mlp, lm.dims.d_mlp, dtype=torch.float64)
    count = 0
    for batch in lm.batches(corpus, batch_size):
        keys = lm.run_with_cache(batch, [site])[site][batch.attention_mask.bool()].double().cpu()
        total += keys.T @ keys
        count += len(keys)
    return KeyStatistics(layer, total / count, count, ModelIdentity.of(lm))


# -- key, value, update ---------------------------------------------------------------------------------------------
def projected(writer: Writer, key: torch.Tensor) -> torch.Tensor:
    """``W key + b``: what the projection outputs for ``key``, in float64 on the CPU."""
    w = writer.weight.detach().double().cpu()
    k = key.double().cpu()
    if k.shape != (w.shape[1],):
        raise InputError(f"a key of size {w.shape[1]} (the projection's input)", f"size {tuple(k.shape)}",
                         "compute it at this layer's blocks.{l}.mlp.post")
    out = w @ k
    return out if writer.bias is None else out + writer.bias.detach().double().cpu()


def _right_padded(lm: LanguageModel, rows: Sequence[Sequence[int]],
                  positions: Sequence[int]) -> tuple[Batch, torch.Tensor, torch.Tensor]:
    """``rows`` right-padded, the ``[batch, pos]`` mask of ``positions`` (one per row) and each row's last index."""
    batch = lm.to_batch([list(r) for r in rows], padding_side="right")
    where = torch.zeros(batch.input_ids.shape, dtype=torch.bool)
    where[torch.arange(len(rows)), torch.tensor(list(positions))] = True
    return batch, where.to(lm.device), torch.tensor([len(r) - 1 for r in rows], device=lm.device)


def subject_key(lm: LanguageModel, layer: int, rows: Sequence[Sequence[int]], positions: Sequence[int]) -> torch.Tensor:
    """``k*``: the mean of ``blocks.{layer}.mlp.post`` at ``positions`` (one per row), float64 on the CPU."""
    batch, where, _ = _right_padded(lm, rows, positions)
    site = f"blocks.{layer}.mlp.post"
    return lm.run_with_cache(batch, [site])[site][where].double().mean(0).cpu()


@dataclass(frozen=True)
class ValueOptimization:
    """How ``δ`` is optimized (step 2 of the module docstring): Adam ``steps`` with learning rate ``lr`` in units of
    ``|v|`` per step, the KL and weight-decay weights, the clamp ``|δ| <= clamp · |v|`` and the early stop."""

    steps: int = 25
    lr: float = 0.02
    kl_weight: float = 0.0625
    weight_decay: float = 0.01
    clamp: float = 4.0
    stop_nll: float = 0.05

    def __post_init__(self) -> None:
        if self.steps < 0 or not (self.lr > 0 and self.clamp > 0):
            raise InputError("steps >= 0, lr > 0 and clamp > 0", f"steps={self.steps}, lr={self.lr}, "
                             f"clamp={self.clamp}", "e.g. ValueOptimization(steps=25, lr=0.02, clamp=4.0)")
        if min(self.kl_weight, self.weight_decay, self.stop_nll) < 0:
            raise InputError("kl_weight, weight_decay and stop_nll >= 0", f"{self.kl_weight}, {self.weight_decay}, "
                             f"{self.stop_nll}", "use non-negative weights")


@dataclass(frozen=True)
class EditVectors:
    """``k*`` and ``v*`` (float64, CPU), ``|v|`` of the unedited mean value, and the losses of every step (the
    last entry is the final ``δ``'s)."""

    key: torch.Tensor
    value: torch.Tensor
    value_norm: float
    losses: list[dict[str, float]]


def _optimize_delta(lm: LanguageModel, layer: int, request: EditRequest, rows: Sequence[Sequence[int]],
                    positions: Sequence[int],
                    opt: ValueOptimization) -> tuple[torch.Tensor, float, list[dict[str, float]]]:
    """``(δ, |v|, losses)``: Adam on ``δ / |v|`` over the prompt ``rows`` (subject at ``positions``) and the
    request's essence prompts, in one batch."""
    site = f"blocks.{layer}.mlp.out"
    n = len(rows)
    batch, where, last = _right_padded(lm, [*rows, *request.essence], [*positions, *request.essence_positions])
    cache = lm.run_with_cache(batch, [site])
    values = cache[site][:n][where[:n]]
    value_norm = float(values.double().mean(0).norm())
    check_finite(torch.tensor(value_norm), "mean MLP output at the subject")
    if value_norm == 0.0:
        raise InputError("a non-zero MLP output at the last subject token", "|v| = 0",
                         "edit another layer (this MLP writes nothing there)")
    rows_index = torch.arange(len(last), device=lm.device)
    assert cache.logits is not None
    base = cache.logits[rows_index[n:], last[n:]].double().log_softmax(-1)
    dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    scaled = torch.zeros(values.shape[-1], dtype=dtype, device=lm.device, requires_grad=True)  # δ / |v|
    optimizer = torch.optim.Adam([scaled], lr=opt.lr)
    mask = where[..., None]

    def add(x: torch.Tensor) -> torch.Tensor:
        return x + mask.to(x.dtype) * (scaled * value_norm).to(x.dtype)

    losses = []
    while True:
        with torch.enable_grad(), lm.intervene(Apply(site, add)):
            logp = lm.logits_with_grad(batch)[rows_index, last].double().log_softmax(-1)
        nll = -logp[:n, request.target_id].mean()
        kl = kl_divergence(base, logp[n:]).mean()
        decay = scaled.double().pow(2).sum()
        loss = nll + opt.kl_weight * kl + opt.weight_decay * decay
        losses.append({"loss": float(loss.detach()), "nll": float(nll.detach()), "kl": float(kl.detach()),
                       "delta_norm": float(decay.detach().sqrt()) * value_norm})
        if losses[-1]["nll"] < opt.stop_nll or len(losses) > opt.steps:
            break
        (scaled.grad,) = torch.autograd.grad(loss, [scaled])
        optimizer.step()
        with torch.no_grad():
            scaled.mul_(min(1.0, opt.clamp / max(float(scaled.norm()), 1e-12)))
    return scaled.detach().double().cpu() * value_norm, value_norm, losses


def edit_vectors(lm: LanguageModel, request: EditRequest, layer: int, *, prefixes: Sequence[Sequence[int]] = (),
                 optimization: ValueOptimization | None = None) -> EditVectors:
    """``k*`` (:func:`subject_key` over the prompts, bare and behind each prefix) and ``v* = W k* + b + δ``."""
    if not 0 <= request.target_id < lm.dims.vocab:
        raise IndexOutOfRangeError(f"a target id in [0, {lm.dims.vocab - 1}]", str(request.target_id),
                                   "use a token id of this model's vocabulary")
    writer = down_projection(lm, layer)
    rows, positions = with_prefixes(lm, request.prompts, request.subject_positions, prefixes)
    key = subject_key(lm, layer, rows, positions)
    delta, value_norm, losses = _optimize_delta(lm, layer, request, rows, positions,
                                                optimization or ValueOptimization())
    return EditVectors(key, projected(writer, key) + delta, value_norm, losses)


def rank_one_edit(lm: LanguageModel, layer: int, key: torch.Tensor, value: torch.Tensor, stats: KeyStatistics, *,
                  label: str = "rank-one edit", info: dict[str, Any] | None = None) -> WeightEdit:
    """``ΔW = (value − W key − b) uᵀ / (uᵀ key)``, ``u = C⁻¹ key``, on layer ``layer``'s down projection, as a
    :class:`WeightEdit` (in the parameter's own layout): with it, the projection maps ``key`` to ``value``."""
    stats.check(lm, layer)
    writer = down_projection(lm, layer)
    k, v = key.double().cpu(), value.double().cpu()
    if v.shape != (lm.dims.d_model,):
        raise InputError(f"a value of size d_model={lm.dims.d_model}", f"size {tuple(v.shape)}",
                         "compute it at this layer's MLP output")
    u, ridge = stats.solve(k)
    delta = torch.outer(v - projected(writer, k), u) / (u @ k)
    name = f"{writer.path}.weight"
    return WeightEdit.of(lm, {name: delta.T if writer.conv1d else delta}, label=label,
                         info={**(info or {}), "layer": layer, "ridge": ridge})


def rome_edit(lm: LanguageModel, request: EditRequest, layer: int, *, stats: KeyStatistics | None = None,
              corpus: Inputs | None = None, prefixes: Sequence[Sequence[int]] | None = None,
              optimization: ValueOptimization | None = None) -> WeightEdit:
    """ROME at ``layer`` (see the module docstring) as a :class:`WeightEdit` labelled ``"rome"``: the
    :func:`rank_one_edit` of :func:`edit_vectors`.

    ``stats``: :func:`key_statistics` of that layer (computed from ``corpus`` when omitted); ``prefixes``: token
    sequences put before every prompt (default: :func:`sample_prefixes` of ``corpus``, none without a corpus);
    ``optimization``: how ``δ`` is found (default :class:`ValueOptimization`). ``info`` records the layer, subject,
    target id, ``|δ|``, ``|v|``, the number of prefixes, the ridge and the losses of every step.
    """
    if stats is None:
        if corpus is None:
            raise InputError("key statistics or a corpus to compute them from", "neither",
                             "pass stats=key_statistics(lm, layer, corpus) or corpus=...")
        stats = key_statistics(lm, layer, corpus)
    stats.check(lm, layer)
    if prefixes is None:
        prefixes = sample_prefixes(lm, corpus) if corpus is not None else []
    found = edit_vectors(lm, request, layer, prefixes=prefixes, optimization=optimization)
    delta_norm = float((found.value - projected(down_projection(lm, layer), found.key)).norm())
    info = {"subject": request.subject, "target_id": request.target_id, "delta_norm": delta_norm,
            "value_norm": found.value_norm, "prefixes": len(prefixes), "losses": found.losses}
    return rank_one_edit(lm, layer, found.key, found.value, stats, label="rome", info=info)
