"""Refusal-direction selection (Arditi et al. 2024): which difference in means mediates refusal.

Candidates are ``r_{i,l} = μ_harmful − μ_harmless`` of ``blocks.{l}.resid_pre`` at each post-instruction position
``i`` (the tokens between the end of the instruction and the end of the prompt, e.g. a chat template's
``<end_of_turn> <start_of_turn> model``; ``positions=n`` takes the last ``n`` tokens). Each is scored on
validation prompts by the refusal score ``log p(R) − log(1 − p(R))`` at the last prompt position, ``p(R)`` the
total probability of the refusal tokens:

* ``bypass``: mean refusal score of harmful prompts under :class:`~lsi.steer.directional.DirectionalAblation` of
  ``r`` (lower = refusal removed better);
* ``induce``: mean refusal score of harmless prompts under :class:`~lsi.core.interventions.Add` of
  ``induce_alpha · r`` at layer ``l``'s input, all positions;
* ``kl``: mean KL(base ‖ ablated) of the last-position distribution on harmless prompts.

Candidates with ``l >= max_layer_fraction · L``, ``kl > kl_max`` or ``induce < 0`` are discarded (``filters``
says which; ``"zero"``: the two means are equal, e.g. template tokens at the embedding); the kept candidate of
lowest bypass score is chosen. Every candidate's scores stay in the result (:meth:`RefusalSelection.table`).

Example:
    >>> import lsi
    >>> from lsi.testing import tiny_model
    >>> lm = lsi.LanguageModel(tiny_model("llama"))
    >>> result = select_refusal_direction(lm, [[5, 6, 7], [5, 8, 7]], [[9, 6, 7], [9, 8, 7]], refusal_tokens=[3],
    ...                                   positions=2, kl_max=1.0)
    >>> len(result.candidates)  # 2 layers x 2 post-instruction positions
    4
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lsi.core.identity import ModelIdentity
from lsi.core.interventions import Add
from lsi.core.positions import Index, Positions, PositionSpec, as_positions
from lsi.core.steering import Steering
from lsi.errors import InputError
from lsi.evaluation.functional import kl_divergence, last_token_logits
from lsi.steer.directional import DirectionalAblation
from lsi.steer.directions import diff_in_means_by_site

if TYPE_CHECKING:
    from lsi.core.inputs import Batch, Inputs
    from lsi.core.model import LanguageModel
    from lsi.core.steering import Scope

FILTERS = {"zero": "μ_harmful = μ_harmless (no direction)", "layer": "layer >= max_layer_fraction · n_layers",
           "kl": "KL on harmless prompts under ablation > kl_max",
           "induce": "induce score < 0 (adding induce_alpha · r does not raise refusal)"}


# -- the refusal score ----------------------------------------------------------------------------------------------
def _last_logprobs(lm: LanguageModel, inputs: Inputs | Batch, batch_size: int) -> torch.Tensor:
    """Log-probabilities ``[n, vocab]`` (float64) of the next token after each prompt's last real token."""
    rows = []
    for batch in lm.batches(inputs, batch_size):
        logits = last_token_logits(lm.forward(batch), batch.attention_mask)
        rows.append(logits.double().log_softmax(-1).cpu())
    return torch.cat(rows)


def _scores_from(logprobs: torch.Tensor, refusal: torch.Tensor) -> torch.Tensor:
    """``log p(R) − log(1 − p(R))`` per row, the second term summed over the other tokens (exact near p = 1)."""
    others = torch.ones(logprobs.shape[-1], dtype=torch.bool)
    others[refusal] = False
    return logprobs[:, refusal].logsumexp(-1) - logprobs[:, others].logsumexp(-1)


def _token_id(lm: LanguageModel, token: int | str) -> int:
    """A token id, or the id of the one token a string encodes to."""
    if not isinstance(token, str):
        return int(token)
    if lm.tokenizer is None:
        raise InputError("refusal tokens as ids (the model has no tokenizer)", repr(token), "pass token ids")
    ids = lm.encode(token)
    if len(ids) != 1:
        raise InputError("refusal tokens that are one token each", f"{token!r} -> {len(ids)} tokens {ids}",
                         "pass the first token of the refusal (mind a leading space), or its id")
    return ids[0]


def _refusal_ids(lm: LanguageModel, refusal_tokens: Sequence[int | str]) -> torch.Tensor:
    ids = sorted({_token_id(lm, t) for t in refusal_tokens})
    vocab = lm.dims.vocab
    if not ids or ids[0] < 0 or ids[-1] >= vocab:
        raise InputError(f"refusal token ids in [0, {vocab})", f"{list(refusal_tokens)[:10]}",
                         "pass the ids of the tokens a refusal starts with, e.g. [tokenizer.convert_tokens_to_ids("
                         "'Sorry')]")
    if len(ids) == vocab:
        raise InputError("refusal tokens that leave some other token", "the whole vocabulary", "pass fewer tokens")
    return torch.tensor(ids)


def refusal_score(lm: LanguageModel, prompts: Inputs | Batch, refusal_tokens: Sequence[int | str], *,
                  batch_size: int = 64) -> torch.Tensor:
    """Per prompt ``log p(R) − log(1 − p(R))`` at its last real token (padding-aware), ``p(R)`` the total
    probability of ``refusal_tokens`` (ids, or strings of one token each); ``[n]`` float64, under whatever steering
    is active.

    Example:
        >>> import lsi
        >>> from lsi.testing import tiny_model
        >>> lm = lsi.LanguageModel(tiny_model("llama"))
        >>> tuple(refusal_score(lm, [[5, 6, 7], [8, 9]], [3, 4]).shape)
        (2,)
    """
    return _scores_from(_last_logprobs(lm, prompts, batch_size), _refusal_ids(lm, refusal_tokens))


# -- the result -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class RefusalCandidate:
    """One candidate ``r`` (``direction``, activation units) read at ``blocks.{layer}.resid_pre`` and ``position``;
    its scores (``None`` for a zero direction) and the filters that discarded it (empty: kept)."""

    layer: int
    position: str
    direction: torch.Tensor
    bypass: float | None
    induce: float | None
    kl: float | None
    filters: tuple[str, ...]

    @property
    def kept(self) -> bool:
        return not self.filters

    @property
    def site(self) -> str:
        return f"blocks.{self.layer}.resid_pre"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready row (the direction's norm instead of the vector)."""
        return {"layer": self.layer, "position": self.position, "norm": float(self.direction.norm()),
                "bypass": self.bypass, "induce": self.induce, "kl": self.kl, "filters": list(self.filters)}


@dataclass(frozen=True, eq=False)
class RefusalSelection:
    """Every candidate with its scores and filters, the chosen one (``None`` when every candidate was discarded),
    the unsteered mean refusal scores on the validation prompts (``baseline``) and the protocol's settings."""

    candidates: tuple[RefusalCandidate, ...]
    chosen: RefusalCandidate | None
    baseline: dict[str, float]
    settings: dict[str, Any]
    model: ModelIdentity

    def pick(self) -> RefusalCandidate:
        """The chosen candidate; :class:`InputError` (with how many each filter discarded) when there is none."""
        if self.chosen is None:
            counts = {f: sum(f in c.filters for c in self.candidates) for f in FILTERS}
            settings = {key: self.settings[key] for key in ("kl_max", "max_layer_fraction", "induce_alpha")
                        if key in self.settings}
            raise InputError("a refusal direction that passed the filters",
                             f"all {len(self.candidates)} candidates discarded (by filter: {counts}; settings "
                             f"{settings})", "look at result.table(); relax the filter that discarded most: kl "
                             "(raise kl_max), layer (raise max_layer_fraction), induce (raise induce_alpha); or use "
                             "more (or other) contrast prompts")
        return self.chosen

    @property
    def direction(self) -> torch.Tensor:
        """The chosen ``r`` (activation units)."""
        return self.pick().direction

    def ablation(self, *, model: LanguageModel | ModelIdentity | None = None) -> DirectionalAblation:
        """Directional ablation of the chosen direction at every layer's input and attention / MLP output (made
        for ``model``, default the model it was selected on)."""
        return DirectionalAblation(self.direction, model=model or self.model)

    def addition(self, alpha: float = 1.0, *, positions: PositionSpec = "all", scope: Scope = "all",
                 model: LanguageModel | ModelIdentity | None = None) -> Add:
        """``x <- x + alpha · r`` at the chosen layer's input (``alpha=1``: as the induce score measured it; made for
        ``model``, default the model it was selected on)."""
        chosen = self.pick()
        return Add(chosen.site, chosen.direction, alpha, positions=positions, scope=scope,
                         model=model or self.model)

    def rows(self) -> list[dict[str, Any]]:
        """Every candidate as a JSON-ready row, with ``chosen`` marking the chosen one."""
        return [{**c.as_dict(), "chosen": c is self.chosen} for c in self.candidates]

    def table(self) -> str:
        """A plain-text table of every candidate (``*`` = chosen) and what each filter means."""
        def cell(value: float | None) -> str:
            return "-" if value is None else f"{value:+.3f}"

        lines = [f"refusal direction: unsteered refusal score {self.baseline['harmful']:+.3f} (harmful) / "
                 f"{self.baseline['harmless']:+.3f} (harmless); lowest bypass among kept candidates",
                 f"  {'layer':>5} {'pos':>6} {'|r|':>8} {'bypass':>8} {'induce':>8} {'KL':>8}  discarded by"]
        for c in self.candidates:
            mark = "*" if c is self.chosen else " "
            lines.append(f"{mark} {c.layer:>5} {c.position:>6} {float(c.direction.norm()):>8.3f} {cell(c.bypass):>8} "
                         f"{cell(c.induce):>8} {cell(c.kl):>8}  {', '.join(c.filters)}".rstrip())
        lines.extend(f"  {name}: {meaning}" for name, meaning in FILTERS.items())
        return "\n".join(lines)

    def __repr__(self) -> str:
        chosen = "none kept" if self.chosen is None else (f"layer {self.chosen.layer}, position "
                                                          f"{self.chosen.position}, bypass {self.chosen.bypass:+.3f}")
        return f"RefusalSelection({len(self.candidates)} candidates; chosen: {chosen})"


# -- the protocol ---------------------------------------------------------------------------------------------------
def _position_list(positions: int | Sequence[PositionSpec]) -> list[Positions]:
    if isinstance(positions, bool):
        raise InputError("positions: a count n >= 1 or a list of selectors", repr(positions), "e.g. positions=3")
    if isinstance(positions, int):
        if positions < 1:
            raise InputError("a number of post-instruction tokens >= 1", str(positions),
                             "count the template tokens after the instruction, e.g. positions=3")
        return [Index(-k) for k in range(positions, 0, -1)]
    chosen = [as_positions(p) for p in positions]
    if not chosen:
        raise InputError("at least one post-instruction position", "none", "e.g. positions=[-2, -1]")
    return chosen


def select_refusal_direction(lm: LanguageModel, harmful: Inputs | Batch, harmless: Inputs | Batch, *,
                             refusal_tokens: Sequence[int | str], positions: int | Sequence[PositionSpec] = 1,
                             layers: Sequence[int] | None = None, max_layer_fraction: float = 0.8,
                             kl_max: float = 0.1, induce_alpha: float = 1.0,
                             harmful_val: Inputs | Batch | None = None,
                             harmless_val: Inputs | Batch | None = None, batch_size: int = 64) -> RefusalSelection:
    """Select the refusal direction (see the module docstring). ``refusal_tokens``: ids, or strings of one token
    each; ``positions``: the number of post-instruction tokens at the end of every prompt, or a list of selectors;
    ``layers``: the layers whose input is read (default all); ``induce_alpha``: the strength of the addition the
    induce score measures (a model whose refusal needs more than ``1 · r`` to be induced needs a larger one); the
    validation prompts default to ``harmful`` / ``harmless`` themselves."""
    n_layers = lm.dims.n_layers
    chosen_layers = list(range(n_layers)) if layers is None else [int(layer) for layer in layers]
    bad = [layer for layer in chosen_layers if not 0 <= layer < n_layers]
    if bad or not chosen_layers:
        raise InputError(f"layers in [0, {n_layers})", str(bad or "none"), "e.g. layers=range(lm.dims.n_layers)")
    refusal = _refusal_ids(lm, refusal_tokens)
    selectors = _position_list(positions)
    harmful_val = harmful if harmful_val is None else harmful_val
    harmless_val = harmless if harmless_val is None else harmless_val

    def scores(prompts: Inputs | Batch, steering: Steering | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Last-position log-probs and refusal scores of ``prompts`` under ``steering``."""
        with steering.apply(lm) if steering is not None else nullcontext():
            logprobs = _last_logprobs(lm, prompts, batch_size)
        return logprobs, _scores_from(logprobs, refusal)

    base_harmless, harmless_scores = scores(harmless_val)
    baseline = {"harmful": float(scores(harmful_val)[1].mean()), "harmless": float(harmless_scores.mean())}
    sites = [f"blocks.{layer}.resid_pre" for layer in chosen_layers]
    by_position = [diff_in_means_by_site(lm, harmful, harmless, sites, positions=position, batch_size=batch_size)
                   for position in selectors]
    candidates = []
    for layer, site in zip(chosen_layers, sites, strict=True):
        for position, directions in zip(selectors, by_position, strict=True):
            r = directions[site]
            filters = ["layer"] if layer >= max_layer_fraction * n_layers else []
            if float(r.norm()) <= 1e-6:
                candidates.append(RefusalCandidate(layer, str(position), r, None, None, None, ("zero", *filters)))
                continue
            ablation = DirectionalAblation(r)
            bypass = float(scores(harmful_val, ablation)[1].mean())
            kl = float(kl_divergence(base_harmless, scores(harmless_val, ablation)[0]).mean())
            induce = float(scores(harmless_val, Add(site, r, induce_alpha))[1].mean())
            filters += ["kl"] * (kl > kl_max) + ["induce"] * (induce < 0)
            candidates.append(RefusalCandidate(layer, str(position), r, bypass, induce, kl, tuple(filters)))
    kept = [c for c in candidates if c.kept]
    best = min(kept, key=lambda c: (c.bypass or 0.0, c.kl or 0.0), default=None)  # kept ones have scores
    settings = {"positions": [str(p) for p in selectors],
                "layers": chosen_layers, "max_layer_fraction": max_layer_fraction, "kl_max": kl_max,
                "induce_alpha": induce_alpha,
                "refusal_tokens": refusal.tolist()}
    return RefusalSelection(tuple(candidates), best, baseline, settings, ModelIdentity.of(lm))
