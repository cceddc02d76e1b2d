"""Persona vectors (Chen et al. 2025): a trait's direction from responses that show it, to steer, monitor and
screen fine-tuning data.

An *exchange* is a ``(prompt, response)`` pair, each text (the prompt tokenized with the tokenizer's special
tokens, the response without) or token ids. Everything here reads the response tokens only:

* :func:`persona_vectors`: per site, the mean activation over the response tokens of trait-expressing exchanges
  minus the same mean over non-expressing ones (each response's mean over its tokens, averaged over responses);
* :func:`projections`: ``activation · v̂`` per input at chosen positions (default: the last token);
  :func:`response_projections`: the same on each exchange's mean over its response tokens;
* :func:`monitor_trait`: how well the projection at the last prompt token predicts whether the model's response will
  express the trait (AUROC for binary labels, Pearson and Spearman correlation);
* :func:`projection_shift`: the mean response projection of a fine-tuning set minus that of the model's own
  responses to the same prompts; :func:`screen_datasets` fine-tunes on each candidate set (the model restored
  after each) and correlates that shift with the trait shift the fine-tuning caused.

Example:
    >>> import lsi
    >>> from lsi.testing import tiny_model
    >>> lm = lsi.LanguageModel(tiny_model("llama"))
    >>> v = persona_vectors(lm, [([1, 2], [10, 11])], [([1, 2], [12, 13])], "blocks.*.resid_post")
    >>> list(v), tuple(v["blocks.0.resid_post"].shape)
    (['blocks.0.resid_post', 'blocks.1.resid_post'], (32,))
    >>> tuple(projections(lm, [[1, 2, 10], [1, 2, 12]], "blocks.1.resid_post", v["blocks.1.resid_post"]).shape)
    (2,)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from lsi.core.positions import PositionSpec
from lsi.errors import InputError
from lsi.evaluation.ranking import auroc, rank_correlation
from lsi.steer.directions import _check_vector_site, _sums, one_site, site_features
from lsi.steer.finetune import masked_finetune

if TYPE_CHECKING:
    from lsi.core.inputs import Batch, Inputs
    from lsi.core.model import LanguageModel
    from lsi.core.sites import Site
    from lsi.steer.finetune import ParameterMask

Text = str | Sequence[int]
Exchange = tuple[Text, Text]  # (prompt, response)


# -- exchanges as token ids -----------------------------------------------------------------------------------------
def _ids(lm: LanguageModel, text: Text, *, prompt: bool) -> list[int]:
    if isinstance(text, str):
        return lm.encode(text, add_special_tokens=prompt)
    return [int(i) for i in text]


def _encoded(lm: LanguageModel, exchanges: Sequence[Exchange]) -> list[tuple[list[int], list[int]]]:
    """``(prompt ids, response ids)`` per exchange; refuses an empty set, prompt or response."""
    if not exchanges:
        raise InputError("at least one (prompt, response) exchange", "none", "pass a list of (prompt, response) pairs")
    out = []
    for i, pair in enumerate(exchanges):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise InputError("(prompt, response) pairs", f"item {i}: {pair!r}", "pair each prompt with its response")
        prompt, response = _ids(lm, pair[0], prompt=True), _ids(lm, pair[1], prompt=False)
        if not prompt or not response:
            raise InputError("a non-empty prompt and response in every exchange",
                             f"exchange {i} with {len(prompt)} prompt and {len(response)} response tokens",
                             "drop empty exchanges")
        out.append((prompt, response))
    return out


def _response_features(lm: LanguageModel, exchanges: Sequence[Exchange], sites: list[Site],
                       batch_size: int) -> dict[Site, torch.Tensor]:
    """Per site ``[n, d]`` (float64): each exchange's mean value over its response tokens, read in the forward pass
    of prompt + response; exchanges with equally long prompts share passes."""
    encoded = _encoded(lm, exchanges)
    by_start: dict[int, list[int]] = {}
    for i, (prompt, _) in enumerate(encoded):
        by_start.setdefault(len(prompt), []).append(i)
    rows: dict[Site, list[torch.Tensor | None]] = {s: [None] * len(encoded) for s in sites}
    for start, members in by_start.items():
        texts = [encoded[i][0] + encoded[i][1] for i in members]
        means = [{s: sums[s] / counts[:, None] for s in sites}
                 for sums, counts in _sums(lm, texts, sites, slice(start, None), batch_size)]
        for s in sites:
            for i, row in zip(members, torch.cat([m[s] for m in means]), strict=True):
                rows[s][i] = row
    return {s: torch.stack([r for r in v if r is not None]) for s, v in rows.items()}


def _unit(vector: torch.Tensor) -> torch.Tensor:
    v = vector.detach().double().cpu().flatten()
    norm = float(v.norm())
    if not (math.isfinite(norm) and norm > 0):
        raise InputError("a finite non-zero direction", f"norm {norm}", "pass a persona vector (persona_vectors)")
    return v / norm


# -- vectors and projections ----------------------------------------------------------------------------------------
def persona_vectors(lm: LanguageModel, expressing: Sequence[Exchange], neutral: Sequence[Exchange],
                    sites: str | Site | Sequence[str | Site], *, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Per concrete site ``sites`` names (patterns expand, e.g. ``"blocks.*.resid_post"``): the mean over the
    ``expressing`` exchanges of their response tokens' mean activation, minus the same over ``neutral`` ones.

    One forward pass per batch of exchanges whatever the number of sites. Returns float32 CPU vectors in activation
    units (add one with ``alpha=1`` to move the neutral mean onto the expressing one).

    Example:
        >>> import lsi
        >>> from lsi.testing import tiny_model
        >>> lm = lsi.LanguageModel(tiny_model("llama"))
        >>> e = lm.weights.W_E
        >>> v = persona_vectors(lm, [([3], [10])], [([4], [11])], "blocks.0.resid_pre")["blocks.0.resid_pre"]
        >>> torch.allclose(v, e[10] - e[11])  # the embedding of the response tokens
        True
    """
    concrete = [_check_vector_site(lm, s) for s in lm.resolve_sites(sites)]
    pos = _response_features(lm, expressing, concrete, batch_size)
    neg = _response_features(lm, neutral, concrete, batch_size)
    return {str(s): (pos[s].mean(0) - neg[s].mean(0)).float() for s in concrete}


def projections(lm: LanguageModel, inputs: Inputs | Batch, site: str | Site, vector: torch.Tensor, *,
                positions: PositionSpec = "last", batch_size: int = 64) -> torch.Tensor:
    """``activation · v̂`` per input ``[n]`` (float32, CPU): the site's value at ``positions`` (their mean when
    several are selected) on the unit vector of ``vector``.

    Example:
        >>> import lsi
        >>> from lsi.testing import tiny_model
        >>> lm = lsi.LanguageModel(tiny_model("llama"))
        >>> e = lm.weights.W_E
        >>> p = projections(lm, [[3, 10]], "blocks.0.resid_pre", torch.eye(32)[5])
        >>> torch.allclose(p, e[10, 5:6])
        True
    """
    features = site_features(lm, inputs, site, positions=positions, batch_size=batch_size).double()
    return (features @ _unit(vector)).float()


def response_projections(lm: LanguageModel, exchanges: Sequence[Exchange], site: str | Site,
                         vector: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
    """Per exchange: the mean over its response tokens of ``site``'s value, on ``v̂`` ``[n]`` (float64, CPU).

    Example:
        >>> import lsi
        >>> from lsi.testing import tiny_model
        >>> lm = lsi.LanguageModel(tiny_model("llama"))
        >>> e = lm.weights.W_E
        >>> p = response_projections(lm, [([3], [10, 11])], "blocks.0.resid_pre", torch.eye(32)[5])
        >>> torch.allclose(p, (e[10, 5:6] + e[11, 5:6]).double() / 2)
        True
    """
    s = one_site(lm, site)
    return _response_features(lm, exchanges, [s], batch_size)[s] @ _unit(vector)


# -- monitoring -----------------------------------------------------------------------------------------------------
def _correlations(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Pearson and Spearman correlation; nan where either side is constant."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    pearson = float("nan") if a.std() == 0 or b.std() == 0 else float(np.corrcoef(a, b)[0, 1])
    return pearson, rank_correlation(a.tolist(), b.tolist())


def _finite(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else value


@dataclass(frozen=True)
class Monitoring:
    """How well the last-prompt-token projection predicts trait expression: AUROC (``None`` unless the labels are
    binary with both classes), Pearson and Spearman correlation (nan where a side is constant), per-prompt values."""

    site: str
    auroc: float | None
    pearson: float
    spearman: float
    projections: tuple[float, ...]
    labels: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values (nan written as ``None``)."""
        return {"site": self.site, "auroc": self.auroc, "pearson": _finite(self.pearson),
                "spearman": _finite(self.spearman), "n": len(self.labels), "projections": list(self.projections),
                "labels": list(self.labels)}


def monitor_trait(lm: LanguageModel, prompts: Inputs | Batch, labels: Sequence[float], site: str | Site,
            vector: torch.Tensor, *, batch_size: int = 64) -> Monitoring:
    """Score the projection at each prompt's last token (:func:`projections`) against ``labels``: whether the
    model's response to the prompt expressed the trait (0 / 1) or a continuous trait score, one per prompt.

    Example:
        >>> import lsi
        >>> from lsi.testing import tiny_model
        >>> lm = lsi.LanguageModel(tiny_model("llama"))
        >>> e = lm.weights.W_E
        >>> m = monitor_trait(lm, [[3], [4], [5]], [1, 0, 0], "blocks.0.resid_pre", e[3] - e[4])
        >>> m.auroc
        1.0
    """
    s = one_site(lm, site)
    values = projections(lm, prompts, s, vector, batch_size=batch_size).tolist()
    y = [float(v) for v in labels]
    if len(y) != len(values) or len(y) < 2:
        raise InputError("one label per prompt, at least two prompts", f"{len(y)} labels for {len(values)} prompts",
                         "label every prompt by its response")
    binary = set(y) == {0.0, 1.0}
    score = auroc([p for p, t in zip(values, y, strict=True) if t],
                  [p for p, t in zip(values, y, strict=True) if not t]) if binary else None
    pearson, spearman = _correlations(values, y)
    return Monitoring(str(s), score, pearson, spearman, tuple(values), tuple(y))


# -- data screening -------------------------------------------------------------------------------------------------
def own_responses(lm: LanguageModel, prompts: Sequence[Text], *, max_new_tokens: int, seed: int | None = None,
                  ) -> list[Exchange]:
    """The model's own ``(prompt ids, response ids)`` to ``prompts``: greedy (``seed=None``) or sampled with
    ``seed``, each response cut after its first end-of-sequence token (the generation config's). Steerings
    applied to ``lm`` act on it.

    Example:
        >>> import lsi
        >>> from lsi.testing import tiny_model
        >>> lm = lsi.LanguageModel(tiny_model("llama"))
        >>> own_responses(lm, [[1, 2, 3]], max_new_tokens=4)  # greedy: the end-of-sequence token (2) at once
        [([1, 2, 3], [2])]
    """
    encoded = [_ids(lm, p, prompt=True) for p in prompts]
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        ids = lm.generate(encoded, max_new_tokens=max_new_tokens, do_sample=seed is not None)
    eos = lm.model.generation_config.eos_token_id  # where generate stops: an id, a list of ids or None
    stops = set() if eos is None else {eos} if isinstance(eos, int) else set(eos)
    out: list[Exchange] = []
    for prompt, row in zip(encoded, ids[:, max(len(p) for p in encoded):].tolist(), strict=True):
        end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        out.append((prompt, row[:end]))
    return out


def projection_shift(lm: LanguageModel, dataset: Sequence[Exchange], site: str | Site, vector: torch.Tensor, *,
                     seed: int | None = None, max_new_tokens: int | None = None, batch_size: int = 64) -> float:
    """Mean response projection (on ``v̂``) of the ``dataset``'s responses minus that of the model's own responses
    to the same prompts (:func:`own_responses`, as long as the longest dataset response unless
    ``max_new_tokens``): how far the set would pull the model along the trait direction.

    Example:
        >>> import lsi
        >>> from lsi.testing import tiny_model
        >>> lm = lsi.LanguageModel(tiny_model("llama"))
        >>> v = torch.randn(32, generator=torch.Generator().manual_seed(0))
        >>> isinstance(projection_shift(lm, [([1, 2], [5, 6])], "blocks.1.resid_post", v), float)
        True
    """
    encoded = _encoded(lm, dataset)
    longest = max(len(r) for _, r in encoded)
    own = own_responses(lm, [p for p, _ in encoded], max_new_tokens=max_new_tokens or longest, seed=seed)
    data = response_projections(lm, encoded, site, vector, batch_size=batch_size)
    base = response_projections(lm, own, site, vector, batch_size=batch_size)
    return float(data.mean() - base.mean())


def response_loss(lm: LanguageModel, dataset: Sequence[Exchange]) -> Callable[[LanguageModel], torch.Tensor]:
    """The supervised fine-tuning loss of a set of exchanges: mean negative log-likelihood of the response tokens
    given the prompt (a ``loss_fn`` for :func:`lsi.steer.finetune.masked_finetune`)."""
    encoded = _encoded(lm, dataset)
    batch = lm.to_batch([p + r for p, r in encoded], padding_side="right")
    starts = torch.tensor([len(p) for p, _ in encoded], device=batch.input_ids.device)
    mask = batch.attention_mask.bool()
    scored = (mask[:, :-1] & mask[:, 1:] & (batch.position_ids[:, 1:] >= starts[:, None]))
    targets = batch.input_ids[:, 1:][scored]

    def loss(model: LanguageModel) -> torch.Tensor:
        logprobs = model.logits_with_grad(batch)[:, :-1].float().log_softmax(-1)[scored]
        return -logprobs.gather(-1, targets[:, None]).mean()

    return loss


@dataclass(frozen=True)
class ScreenedSet:
    """One candidate set: its projection shift, the trait after fine-tuning on it, and the final training loss."""

    name: str
    projection_shift: float
    trait_after: float
    trait_shift: float
    final_loss: float


@dataclass(frozen=True)
class Screening:
    """Candidate fine-tuning sets screened by projection shift, against the trait shift fine-tuning caused."""

    site: str
    trait_before: float
    sets: tuple[ScreenedSet, ...]
    pearson: float
    spearman: float
    settings: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values (nan written as ``None``)."""
        return {"site": self.site, "trait_before": self.trait_before, "pearson": _finite(self.pearson),
                "spearman": _finite(self.spearman), "settings": self.settings,
                "sets": [vars(s) for s in self.sets]}


def screen_datasets(lm: LanguageModel, candidates: Mapping[str, Sequence[Exchange]], site: str | Site,
                    vector: torch.Tensor, *, measure: Callable[[LanguageModel], float], steps: int = 20,
                    lr: float = 1e-3, mask: ParameterMask | None = None, seed: int = 0,
                    max_new_tokens: int | None = None) -> Screening:
    """Per candidate set: :func:`projection_shift` (own responses sampled with ``seed``), then ``steps`` of
    fine-tuning on it (:func:`response_loss` with :func:`~lsi.steer.finetune.masked_finetune`, every parameter
    unless ``mask``) and ``measure(lm)`` under the trained change; returns the shifts and their correlation.
    The model's weights are restored bit-exactly after each set.

    Example:
        >>> screening = screen_datasets(lm, {"all": expressing, "none": neutral}, site, v,
        ...                             measure=lambda m: trait_rate(m))  # doctest: +SKIP
        >>> screening.pearson  # doctest: +SKIP
    """
    if len(candidates) < 2:
        raise InputError("at least two candidate sets", f"{len(candidates)}", "screen several sets to rank them")
    s = str(one_site(lm, site))
    before = float(measure(lm))
    screened = []
    for name, dataset in candidates.items():
        shift = projection_shift(lm, dataset, s, vector, seed=seed, max_new_tokens=max_new_tokens)
        trained = masked_finetune(lm, response_loss(lm, dataset), mask, steps=steps, lr=lr, seed=seed)
        with lm.intervene(trained.edit):
            after = float(measure(lm))
        screened.append(ScreenedSet(name, shift, after, after - before, trained.losses[-1].target))
    pearson, spearman = _correlations([x.projection_shift for x in screened], [x.trait_shift for x in screened])
    settings = {"steps": steps, "lr": lr, "seed": seed, "mask": None if mask is None else list(mask.targets)}
    return Screening(s, before, tuple(screened), pearson, spearman, settings)
