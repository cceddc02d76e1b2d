"""Magnitude analysis: static weight statistics, activation statistics over datasets, and LAPE.

Training-free scores. Weight statistics read ``lm.weights``; activation statistics stream a dataset through
``run_with_cache`` batch by batch and count real tokens only (padding is masked out, so left- and right-padded
batches give the same numbers). A neuron is *active* on a token when its ``mlp.post`` value is > 0 (for gated
MLPs that value is ``act(gate) * up``).

Example:
    >>> import lsi
    >>> from lsi.testing import tiny_model
    >>> lm = lsi.LanguageModel(tiny_model("gpt2"))
    >>> weight_norms(lm, "heads", of="OV").shape
    (2, 4)
    >>> r = activation_stats(lm, [[5, 6, 7], [8, 9]], "blocks.0.mlp.post", stat="frequency")
    >>> r.labels[0], r.shape
    ('blocks.0.mlp.post[0]', (48,))
    >>> probs = activation_probability(lm, {"a": [[5, 6, 7]], "b": [[8, 9, 10]]})
    >>> sorted(lape_neurons(probs, top_rate=0.05))
    ['a', 'b']
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch

from lsi.core.positions import PositionSpec, as_positions
from lsi.core.sites import Site
from lsi.errors import InputError, SiteUnavailableError
from lsi.locate.result import LocateResult

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel, SiteSpec

What = Literal["neurons", "heads", "rows"]
Norm = Literal["l2", "linf", "kurtosis", "outliers"]
Stat = Literal["mean_abs", "frequency", "mean"]
_OF: dict[str, tuple[str, ...]] = {"neurons": ("value", "key", "gate"), "heads": ("OV", "QK", "Q", "K", "V", "O"),
                                   "rows": ("W_in", "W_gate", "W_out", "W_E", "W_U")}
_STATS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mean_abs": torch.abs, "mean": lambda x: x, "frequency": lambda x: (x > 0).double()}


# -- static weights -----------------------------------------------------------------------------------------------
def _check_norm(norm: str) -> None:
    if norm not in get_args(Norm):
        raise InputError(f"norm one of {list(get_args(Norm))}", repr(norm), "pick one of them")


def vector_stat(x: torch.Tensor, norm: Norm, k: float = 3.0) -> torch.Tensor:
    """A statistic of each row of ``x`` ``[n, d]``: L2 or L∞ norm, kurtosis ``E[c⁴] / E[c²]²`` (c = x − row
    mean; 3 for a Gaussian), or the number of entries more than ``k`` row standard deviations from the row mean."""
    _check_norm(norm)
    x = x.double()
    if norm == "l2":
        return x.norm(dim=-1)
    if norm == "linf":
        return x.abs().amax(-1)
    centred = x - x.mean(-1, keepdim=True)
    var = centred.pow(2).mean(-1)
    if norm == "kurtosis":
        return centred.pow(4).mean(-1) / var.pow(2)
    return (centred.abs() > k * var.sqrt()[:, None]).sum(-1).double()


def weight_norms(lm: LanguageModel, what: What = "neurons", *, of: str | None = None, norm: Norm = "l2",
                 k: float = 3.0) -> LocateResult:
    """Per-object statistics of raw weights (norm scales not folded in); see :func:`vector_stat` for ``norm``.

    ``what="neurons"``: each neuron's ``of="value"`` (column of W_out), ``"key"`` (row of W_in) or ``"gate"``
    vector, labelled ``blocks.{l}.mlp.post[j]``. ``what="heads"``: each head's ``of="OV"``, ``"QK"``, ``"Q"``,
    ``"O"`` matrix (layer × head grid) or ``"K"`` / ``"V"`` (layer × kv_head grid: under grouped-query attention
    several query heads share one). ``what="rows"``: rows of ``of="W_in"``, ``"W_gate"``, ``"W_out"`` (layer ×
    row grid) or ``"W_E"`` / ``"W_U"``, oriented as ``lm.weights`` returns them.

    Example: ``weight_norms(lm, "heads", of="OV", norm="linf").top(3)``.
    """
    choices = _OF.get(what)
    if choices is None:
        raise InputError("what='neurons', 'heads' or 'rows'", repr(what), "pick one of them")
    of = of or choices[0]
    if of not in choices:
        raise InputError(f"of= one of {list(choices)} for what={what!r}", repr(of), f"e.g. of={choices[0]!r}")
    _check_norm(norm)
    settings: dict[str, Any] = {"what": what, "of": of, "norm": norm, **({"k": k} if norm == "outliers" else {})}
    stat = partial(vector_stat, norm=norm, k=k)
    layers = tuple(str(layer) for layer in range(lm.dims.n_layers))
    if what == "neurons":
        scores = torch.cat([stat(_neuron_vectors(lm, layer, of)) for layer in range(lm.dims.n_layers)])
        return LocateResult.over(_neuron_labels(lm), scores, method="weight_norms", **settings)
    if what == "heads":
        per_layer = [_head_stats(lm, layer, of, stat) for layer in range(lm.dims.n_layers)]
        axis = "kv_head" if of in ("K", "V") else "head"
        heads = tuple(str(h) for h in range(len(per_layer[0])))
        return LocateResult(torch.stack(per_layer), (("layer", layers), (axis, heads)), method="weight_norms",
                            settings=settings)
    if of in ("W_E", "W_U"):
        scores = stat(getattr(lm.weights, of))
        return LocateResult.over([str(i) for i in range(len(scores))], scores, method="weight_norms", axis="row",
                                 **settings)
    grid = torch.stack([stat(_layer_weight(lm, layer, of)) for layer in range(lm.dims.n_layers)])
    rows = tuple(str(i) for i in range(grid.shape[1]))
    return LocateResult(grid, (("layer", layers), ("row", rows)), method="weight_norms", settings=settings)


def _layer_weight(lm: LanguageModel, layer: int, name: str) -> torch.Tensor:
    w = getattr(lm.weights, name)(layer)
    if w is None:
        raise SiteUnavailableError(f"a gated MLP for {name}", f"{lm.family} has no gate projection",
                                   "use 'key' / 'W_in' (the input projection) instead")
    return w


def _neuron_vectors(lm: LanguageModel, layer: int, part: str) -> torch.Tensor:
    if part == "value":
        return lm.weights.W_out(layer).T
    return _layer_weight(lm, layer, "W_in" if part == "key" else "W_gate")


def _head_stats(lm: LanguageModel, layer: int, of: str, stat: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    w = lm.weights
    if of in ("OV", "QK"):  # one head at a time: a circuit is d_model × d_model
        circuit = w.OV if of == "OV" else w.QK
        return torch.cat([stat(circuit(layer, h).reshape(1, -1)) for h in range(lm.dims.n_heads)])
    return stat(getattr(w, f"W_{of}")(layer).flatten(1))


def _neuron_labels(lm: LanguageModel) -> list[str]:
    return [f"blocks.{layer}.mlp.post[{j}]" for layer in range(lm.dims.n_layers) for j in range(lm.dims.d_mlp)]


# -- streaming over a dataset -------------------------------------------------------------------------------------
def unit_sites(lm: LanguageModel, sites: SiteSpec, *, neurons: bool = False) -> list[Site]:
    """Concrete sites with one value per token and unit (``[batch, pos, units]``); ``neurons=True``: only
    ``mlp.post`` / ``mlp.pre``."""
    concrete = lm.resolve_sites(sites)
    for s in concrete:
        if len(s.info.shape) != 3 or s.info.position_axis != 1 or (neurons and s.info.index_name != "d_mlp"):
            want = "neuron sites like 'blocks.*.mlp.post'" if neurons else \
                "sites with one value per token and unit, like 'blocks.0.mlp.post' or 'blocks.0.resid_post'"
            raise InputError(want, f"{s} (shape {' × '.join(s.info.shape)})",
                             "pass mlp.post sites" if neurons else "pass such sites (per-head sites: use attn.out)")
    return concrete


def unit_values(cache: Any, site: Site) -> torch.Tensor:
    """A unit site's cached value ``[batch, pos, units]``, kept 3-d when the site picks one unit."""
    value = cache.full(site)
    idx = site.indices()
    return value if idx is None else value[..., list(idx)]


def _token_means(lm: LanguageModel, dataset: Any, sites: list[Site], stat: Stat, positions: PositionSpec,
                 batch_size: int) -> tuple[list[torch.Tensor], int]:
    """Mean of ``stat`` over the selected real tokens of the dataset, per site (streamed), and the token count."""
    fn = _STATS.get(stat)
    if fn is None:
        raise InputError(f"stat one of {sorted(_STATS)}", repr(stat), "pick one of them")
    select = as_positions(positions)
    totals: list[torch.Tensor] = [torch.zeros((), dtype=torch.float64)] * len(sites)
    count = 0
    for batch in lm.batches(dataset, batch_size):
        cache = lm.run_with_cache(batch, sites)
        chosen = select.mask(batch.input_ids, batch.attention_mask)
        totals = [t + fn(unit_values(cache, s)[chosen].double()).sum(0).cpu() for t, s in zip(totals, sites,
                                                                                                  strict=True)]
        count += int(chosen.sum())
    return [t / require_tokens(count) for t in totals], count


def require_tokens(count: int) -> int:
    """``count``, refused when no token was selected."""
    if count == 0:
        raise InputError("at least one selected real token", "none", "pass non-empty inputs or other positions")
    return count


def _unit_result(sites: list[Site], values: list[torch.Tensor], method: str, **settings: Any) -> LocateResult:
    """Neuron sites: one flat axis labelled ``blocks.{l}.mlp.post[j]``; other sites: a site × dim grid."""
    if all(s.info.index_name == "d_mlp" for s in sites):
        labels = [f"{s.without_index()}[{j}]" for s, v in zip(sites, values, strict=True)
                  for j in (s.indices() or range(len(v)))]
        return LocateResult.over(labels, torch.cat(values), method=method, **settings)
    widths = {len(v) for v in values}
    if len(widths) != 1 or any(s.info.index_name == "d_mlp" for s in sites):
        raise InputError("sites of one width (all neuron sites, or all residual-width sites)",
                         ", ".join(f"{s} ({len(v)})" for s, v in zip(sites, values, strict=True)),
                         "compute neuron and residual-width sites in separate calls")
    dims = tuple(str(i) for i in range(widths.pop()))
    return LocateResult(torch.stack(values), (("site", tuple(str(s) for s in sites)), ("dim", dims)),
                        method=method, settings=settings)


# -- activation statistics ----------------------------------------------------------------------------------------
def activation_stats(lm: LanguageModel, dataset: Any, sites: SiteSpec, *, stat: Stat = "mean_abs",
                     positions: PositionSpec = None, batch_size: int = 32) -> LocateResult:
    """Mean |activation| (``"mean_abs"``), mean activation (``"mean"``) or activation frequency P(act > 0)
    (``"frequency"``) of every unit of ``sites`` over the real tokens of ``dataset`` (``positions`` narrows them,
    e.g. ``"last"``).

    Example: ``activation_stats(lm, texts, "blocks.*.mlp.post", stat="frequency").top(10)``.
    """
    concrete = unit_sites(lm, sites)
    values, n = _token_means(lm, dataset, concrete, stat, positions, batch_size)
    return _unit_result(concrete, values, "activation_stats", stat=stat, positions=str(as_positions(positions)),
                        n_tokens=n)


def activation_contrast(lm: LanguageModel, dataset_a: Any, dataset_b: Any, sites: SiteSpec, *,
                        stat: Stat = "mean", positions: PositionSpec = None, batch_size: int = 32) -> LocateResult:
    """``stat`` on ``dataset_a`` minus ``stat`` on ``dataset_b``, per unit (e.g. style-A vs style-B neurons).

    Example: ``activation_contrast(lm, formal, casual, "blocks.*.mlp.post", stat="frequency").top(10)``.
    """
    concrete = unit_sites(lm, sites)
    a, n_a = _token_means(lm, dataset_a, concrete, stat, positions, batch_size)
    b, n_b = _token_means(lm, dataset_b, concrete, stat, positions, batch_size)
    return _unit_result(concrete, [x - y for x, y in zip(a, b, strict=True)], "activation_contrast", stat=stat,
                        positions=str(as_positions(positions)), n_tokens_a=n_a, n_tokens_b=n_b)


# -- LAPE (Tang et al. 2024) --------------------------------------------------------------------------------------
def activation_probability(lm: LanguageModel, datasets: Mapping[str, Any], sites: SiteSpec = "blocks.*.mlp.post",
                           *, batch_size: int = 32) -> LocateResult:
    """p[j, k] = P(neuron j > 0 | language k) over the real tokens of each dataset: a neuron × language grid.

    Tang et al. count ``act(gate) > 0`` for gated MLPs; pass ``sites="blocks.*.mlp.pre"`` for that reading
    (SiLU(g) > 0 exactly when g > 0).

    Example: ``probs = activation_probability(lm, {"en": english, "fr": french})``.
    """
    if len(datasets) < 2:
        raise InputError("datasets of at least two languages", f"{len(datasets)} ({list(datasets)})",
                         "pass a mapping {language: inputs} with two or more languages")
    concrete = unit_sites(lm, sites, neurons=True)
    columns, counts = [], {}
    for language, data in datasets.items():
        values, counts[str(language)] = _token_means(lm, data, concrete, "frequency", None, batch_size)
        columns.append(_unit_result(concrete, values, "activation_probability"))
    return LocateResult(torch.stack([c.scores for c in columns], -1),
                        (("neuron", tuple(columns[0].labels)), ("language", tuple(str(k) for k in datasets))),
                        method="activation_probability", settings={"n_tokens": counts})


def _probabilities(probs: LocateResult) -> tuple[torch.Tensor, tuple[str, ...], tuple[str, ...]]:
    names = tuple(name for name, _ in probs.axes)
    if names != ("neuron", "language") or probs.shape[1] < 2:
        raise InputError("a neuron × language grid of at least two languages (from activation_probability)",
                         f"axes {names} shaped {probs.shape}", "build it with activation_probability(lm, datasets)")
    return probs.scores.double(), probs.axes[0][1], probs.axes[1][1]


def _check_rate(rate: float, name: str) -> float:
    if not 0 < rate <= 1:
        raise InputError(f"{name} in (0, 1]", str(rate), f"e.g. {name}=0.95")
    return rate


def _quantile(values: torch.Tensor, rate: float, name: str) -> float:
    """The ``round(n * rate)``-th smallest value (Tang et al.'s ``kthvalue`` quantile)."""
    flat = values.flatten()
    return float(flat.kthvalue(max(1, round(len(flat) * _check_rate(rate, name)))).values)


def _lape_parts(p: torch.Tensor, filter_rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LAPE entropy per neuron and the neurons kept by the filter (some language's p above the quantile)."""
    q = torch.nan_to_num(p / p.sum(-1, keepdim=True), nan=0.0)
    entropy = -(q * torch.where(q > 0, q.log(), torch.zeros_like(q))).sum(-1)
    return entropy, (p > _quantile(p, filter_rate, "filter_rate")).any(-1)


def lape_scores(probs: LocateResult, *, filter_rate: float = 0.95, language: str | None = None,
                activation_bar: float = 0.95) -> LocateResult:
    """−LAPE per neuron (higher = more language-specific); neurons dropped by the filter score ``−log K − 1``,
    below every kept one. With ``language``, only neurons whose p for that language exceeds the
    ``activation_bar`` quantile keep their score: the top n are LAPE's selection for that language.

    Example: ``lape_scores(probs, language="fr").top(20)``.
    """
    p, labels, languages = _probabilities(probs)
    entropy, kept = _lape_parts(p, filter_rate)
    settings: dict[str, Any] = {"filter_rate": filter_rate}
    if language is not None:
        if language not in languages:
            raise InputError(f"a language from {list(languages)}", repr(language), "pick one of the grid's")
        kept &= p[:, languages.index(language)] > _quantile(p, activation_bar, "activation_bar")
        settings |= {"language": language, "activation_bar": activation_bar}
    floor = -torch.log(torch.tensor(float(len(languages)))) - 1
    return LocateResult.over(labels, torch.where(kept, -entropy, floor), method="lape", **settings)


def lape_neurons(probs: LocateResult, *, filter_rate: float = 0.95, top_rate: float = 0.01,
                 activation_bar: float = 0.95) -> dict[str, list[str]]:
    """LAPE's neurons per language: of the neurons kept by the filter, the lowest-entropy ``top_rate`` fraction of
    all neurons; each goes to every language whose p exceeds the ``activation_bar`` quantile of all p.

    Example: ``lape_neurons(probs)["fr"]`` (labels like ``'blocks.3.mlp.post[17]'``, lowest entropy first).
    """
    p, labels, languages = _probabilities(probs)
    entropy, kept = _lape_parts(p, filter_rate)
    n = round(len(labels) * _check_rate(top_rate, "top_rate"))
    order = torch.argsort(torch.where(kept, entropy, torch.inf), stable=True)[:n]
    selected = order[kept[order]]
    bar = _quantile(p, activation_bar, "activation_bar")
    return {lang: [labels[j] for j in selected.tolist() if p[j, k] > bar] for k, lang in enumerate(languages)}
