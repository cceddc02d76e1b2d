"""Causal tracing (Meng et al. 2022, ROME): which states carry a fact from the subject to the answer.

Corrupt: add Gaussian noise of std ``noise_scale × σ`` (σ = the empirical std of the embeddings over the
prompts' real tokens) to the embeddings of the subject tokens. Restore: one state (``kind``: the residual stream
after a layer, the MLP output or the attention output; with ``window > 1`` that state in the layers
``l - window // 2 .. l + (window - 1) // 2``) at one position, copied from the clean run. Then

    IE(l, i) = P_restored(o) − P_corrupt(o),    TE = P_clean(o) − P_corrupt(o),

with P(o) the probability of the target token after the last real token, averaged over noise samples (each
restoration uses the same noise as the corrupted run it is compared with) and then over prompts. Every
restoration of every noise sample is one copy in an expanded batch (see :mod:`lsi.locate.patching`).

Subjects and targets may be written as text: ``subject="France"`` is found in each prompt's tokens
(:func:`lsi.core.spans.token_span`; an error if it is absent or occurs twice), ``target=" Paris"`` must be one
token. Results label their cells with the restored site and the position, e.g. ``blocks.12.mlp.out@5``.

Example:
    >>> import lsi
    >>> from lsi.testing import tiny_model
    >>> lm = lsi.LanguageModel(tiny_model("gpt2"))
    >>> effects = trace_effects(lm, [[5, 6, 7, 8], [5, 9, 9, 8]], [(1, 3), (1, 2)], 4, positions="subject_last")
    >>> effects.ie.shape, effects.argmax_layer("subject_last").shape  # [prompts, layers, positions], [prompts]
    (torch.Size([2, 2, 1]), torch.Size([2]))
    >>> result = causal_tracing(lm, [[5, 6, 7, 8]], [(1, 3)], 4, kind="resid", noise_samples=2)
    >>> result.shape, result.labels[:2]  # site × position
    ((2, 4), ['blocks.0.resid_post@0', 'blocks.0.resid_post@1'])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

import torch

from lsi.core.inputs import Batch
from lsi.core.interventions import Apply
from lsi.core.positions import Index
from lsi.core.spans import token_spans
from lsi.errors import InputError
from lsi.evaluation.functional import last_token_logits
from lsi.locate.metrics import TokensOrText, as_token_ids, per_row_ids
from lsi.locate.patching import DEFAULT_BATCH_SIZE, Write, run_patched
from lsi.locate.result import LocateResult

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel

TraceKind = Literal["resid", "mlp", "attn"]
KIND_SITES = {"resid": "resid_post", "mlp": "mlp.out", "attn": "attn.out"}
SubjectSpec = str | Sequence[str] | torch.Tensor | Sequence[tuple[int, int]]


@dataclass(frozen=True)
class TraceEffects:
    """Per-prompt causal-tracing effects.

    ``ie``: ``[prompts, layers, positions]`` indirect effects averaged over noise samples (NaN where a prompt has
    no such position); ``p_clean`` / ``p_corrupt``: ``[prompts]`` target probabilities (``p_corrupt`` averaged
    over noise samples); ``positions``: the column labels.
    """

    ie: torch.Tensor
    p_clean: torch.Tensor
    p_corrupt: torch.Tensor
    positions: tuple[str, ...]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def te(self) -> torch.Tensor:
        """Total effect per prompt: P_clean(o) − P_corrupt(o)."""
        return self.p_clean - self.p_corrupt

    def result(self) -> LocateResult:
        """IE averaged over prompts as a ``site × position`` result (one restored site per layer, e.g.
        ``blocks.3.mlp.out``); TE and the probabilities in settings."""
        sites = tuple(f"blocks.{i}.{KIND_SITES[self.settings['kind']]}" for i in range(self.ie.shape[1]))
        return LocateResult(self.ie.nanmean(0), (("site", sites), ("position", self.positions)),
                            method="causal_tracing", metric="p(target)",
                            settings={**self.settings, "te": float(self.te.mean()),
                                      "p_clean": float(self.p_clean.mean()),
                                      "p_corrupt": float(self.p_corrupt.mean()), "n_prompts": len(self.ie)})

    def argmax_layer(self, position: str = "subject_last") -> torch.Tensor:
        """Per prompt, the layer whose restoration at ``position`` (a column label) has the largest IE."""
        if position not in self.positions:
            raise InputError(f"a traced position label from {list(self.positions)}", repr(position),
                             "trace with positions='subject_last' (or pick an existing label)")
        return self.ie[:, :, self.positions.index(position)].argmax(1)


def causal_tracing(lm: LanguageModel, prompts: Any, subject: SubjectSpec, target: TokensOrText, *,
                   kind: TraceKind = "mlp", window: int = 1, positions: str | Sequence[int] = "each",
                   noise_samples: int = 10, noise_scale: float = 3.0, seed: int = 0,
                   batch_size: int = DEFAULT_BATCH_SIZE) -> LocateResult:
    """Mean indirect effect over prompts, ``site × position`` (TE, P_clean, P_corrupt in the settings); the
    arguments are :func:`trace_effects`'s.

    Example:
        >>> result = causal_tracing(lm, "The capital of France is", "France", " Paris")  # doctest: +SKIP
        >>> result.top(1)  # doctest: +SKIP
        [('blocks.0.mlp.out@3', 0.766...)]
    """
    return trace_effects(lm, prompts, subject, target, kind=kind, window=window, positions=positions,
                         noise_samples=noise_samples, noise_scale=noise_scale, seed=seed,
                         batch_size=batch_size).result()


def trace_effects(lm: LanguageModel, prompts: Any, subject: SubjectSpec, target: TokensOrText, *,
                  kind: TraceKind = "mlp", window: int = 1, positions: str | Sequence[int] = "each",
                  noise_samples: int = 10, noise_scale: float = 3.0, seed: int = 0,
                  batch_size: int = DEFAULT_BATCH_SIZE) -> TraceEffects:
    """Causal tracing with per-prompt results.

    ``prompts``: anything ``lm.to_batch`` takes (the target is predicted after each prompt's last real token);
    ``subject``: the subject's text (one string for every prompt, or one per prompt), a bool mask ``[prompts, pos]``
    on the padded batch, or one ``(start, stop)`` real-token span per prompt; ``target``: one token id or one-token
    string (``" Paris"``), or one per prompt. ``positions``: ``"each"`` (every real-token index),
    ``"subject_last"`` (the last subject token of each prompt) or a list of real-token indices (negative from the
    end). Noise is drawn with ``seed``; ``noise_samples`` samples per prompt.
    """
    if kind not in KIND_SITES:
        raise InputError(f"kind in {sorted(KIND_SITES)}", repr(kind), "e.g. kind='mlp' (MLP outputs)")
    for name, value in (("window", window), ("noise_samples", noise_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} >= 1", repr(value), f"e.g. {name}=1")
    batch = lm.to_batch(prompts)
    n, n_layers = len(batch.lengths), lm.dims.n_layers
    subject_mask = _subject_mask(lm, subject, batch)
    targets = per_row_ids(as_token_ids(target, lm.tokenizer), n)
    sites = [f"blocks.{layer}.{KIND_SITES[kind]}" for layer in range(n_layers)]
    clean = lm.run_with_cache(batch, ["embed", *sites])
    assert clean.logits is not None
    p_clean = _target_prob(clean.logits, batch, targets)
    std = float(clean["embed"][batch.attention_mask.bool()].std())
    noise = subject_noise(subject_mask, clean["embed"].shape[-1], samples=noise_samples, std=noise_scale * std,
                          seed=seed).to(lm.device)
    base = batch.repeat(noise_samples)
    labels, groups = _columns(positions, batch, subject_mask)
    runs: list[list[Write]] = [[]]  # the corrupted run itself, then one restoration per (layer, column)
    for layer in range(n_layers):
        lo, hi = max(0, layer - window // 2), min(n_layers, layer - (-window // 2))
        runs += [[Write(sites[m], None, where.repeat(noise_samples, 1)) for m in range(lo, hi)] for where in groups]
    sources = {site: clean.full(site).repeat(noise_samples, *[1] * (clean.full(site).dim() - 1)) for site in sites}
    probs = run_patched(lm, base, runs, sources, lambda lg, b: _target_prob(lg, b, targets.repeat(noise_samples)),
                        setting=noise_setting(lm, noise), batch_size=batch_size).view(len(runs), noise_samples, n)
    p_corrupt = probs[0]
    ie = (probs[1:] - p_corrupt).mean(1).view(n_layers, len(groups), n).permute(2, 0, 1)
    present = torch.stack([g.any(1) for g in groups], 1)  # [prompts, columns]
    ie = ie.masked_fill(~present[:, None, :].to(ie.device), float("nan"))
    return TraceEffects(ie.cpu(), p_clean.cpu(), p_corrupt.mean(0).cpu(), tuple(labels),
                        {"kind": kind, "site": f"blocks.{{l}}.{KIND_SITES[kind]}", "window": window,
                         "noise_samples": noise_samples, "noise_scale": noise_scale, "noise_std": noise_scale * std,
                         "seed": seed})


def subject_noise(subject_mask: torch.Tensor, d_model: int, *, samples: int, std: float,
                  seed: int) -> torch.Tensor:
    """Gaussian noise ``[samples * prompts, pos, d_model]`` (sample-major rows), zero outside the subject tokens."""
    gen = torch.Generator().manual_seed(seed)
    mask = subject_mask.repeat(samples, 1)
    return torch.randn(*mask.shape, d_model, generator=gen) * std * mask[..., None].cpu()


def noise_setting(lm: LanguageModel, noise: torch.Tensor) -> Callable[[], AbstractContextManager[Any]]:
    """A setting adding ``noise`` to the embeddings; a batch of k copies of the rows gets the same noise per copy."""
    def add(x: torch.Tensor) -> torch.Tensor:
        return x + noise.to(x).repeat(x.shape[0] // noise.shape[0], 1, 1)

    return lambda: lm.intervene(Apply("embed", add))


def _subject_mask(lm: LanguageModel, subject: SubjectSpec, batch: Batch) -> torch.Tensor:
    real = batch.attention_mask.bool().cpu()
    if isinstance(subject, torch.Tensor):
        if subject.shape != real.shape:
            raise InputError(f"a subject mask shaped like the padded prompts {tuple(real.shape)}",
                             f"shape {tuple(subject.shape)}", "build it on lm.to_batch(prompts), or pass spans")
        mask = subject.bool().cpu() & real
    else:
        texts = isinstance(subject, str) or all(isinstance(text, str) for text in subject)
        spans = (token_spans(lm.tokenizer, batch.input_ids, batch.attention_mask, cast("str | list[str]", subject))
                 if texts else list(cast("Sequence[tuple[int, int]]", subject)))
        if len(spans) != len(real):
            raise InputError(f"one (start, stop) subject span per prompt ({len(real)})", f"{len(spans)} spans",
                             "give each prompt's subject tokens as real-token indices")
        index = batch.position_ids.cpu()
        starts, stops = (torch.tensor([int(span[i]) for span in spans])[:, None] for i in (0, 1))
        mask = (index >= starts) & (index < stops) & real
    empty = (~mask.any(1)).nonzero().flatten().tolist()
    if empty:
        raise InputError("at least one real subject token per prompt", f"none in prompts {empty[:5]}",
                         "check the spans are real-token indices (start < stop) inside each prompt")
    return mask


def _target_prob(logits: torch.Tensor, batch: Batch, targets: torch.Tensor) -> torch.Tensor:
    probs = last_token_logits(logits, batch.attention_mask).float().softmax(-1)
    return probs[torch.arange(len(probs), device=probs.device), targets.to(probs.device)]


def _columns(positions: str | Sequence[int], batch: Batch,
             subject: torch.Tensor) -> tuple[list[str], list[torch.Tensor]]:
    real = batch.attention_mask.bool().cpu()
    index = batch.position_ids.cpu().masked_fill(~real, -1)
    if isinstance(positions, str) and positions == "each":
        return [str(i) for i in range(max(batch.lengths))], [index == i for i in range(max(batch.lengths))]
    if isinstance(positions, str) and positions == "subject_last":
        cols = torch.arange(real.shape[1]).expand_as(real)
        last = torch.where(subject, cols, -1).max(1).values
        return ["subject_last"], [cols == last[:, None]]
    if isinstance(positions, str) or not all(isinstance(p, int) for p in positions) or not positions:
        raise InputError("positions 'each', 'subject_last' or a list of real-token indices", repr(positions),
                         "e.g. positions='subject_last' or positions=[0, -1]")
    ids, mask = batch.input_ids.cpu(), batch.attention_mask.cpu()
    return [str(p) for p in positions], [Index(p).mask(ids, mask) for p in positions]
