"""Causal attribution by intervention: activation patching and zero / mean / resample ablation.

Every patched or ablated run is one copy of the inputs inside an expanded batch: a forward holds several copies,
and an :class:`~lsi.core.interventions.Apply` per site writes the replacement value into only the rows,
positions and heads / neurons assigned to each copy. The numbers equal one forward per patch up to float
round-off (the test compares them at ``atol=1e-5``).

Objects are named by sites: ``"blocks.*.resid_pre"`` (one object per layer), ``"blocks.1.attn.head_out[2]"``
(one head), ``"blocks.0.mlp.post[3,7]"`` (two neurons patched together). A kind with a head or neuron axis given
without an index (``"blocks.*.attn.head_out"``, ``"blocks.*.mlp.post"``) means every head / neuron separately.

``positions`` (real-token indices, whatever the padding side):

- ``"all"``: each object is patched at every real position at once; result axis ``site``.
- ``"each"``: each object at each position separately; axes ``site × position`` (a row shorter than a position
  is left unpatched there).
- a list such as ``[0, -1, "last", lsi.Match(7)]``: one column per entry, the entry's positions at once.
- one selector (``"last"``, an int, a tuple of ints, a slice, ``lsi.Match``): only those positions, patched at
  once; axis ``site``.

Example:
    >>> import lsi
    >>> from lsi.testing import tiny_model
    >>> from lsi.locate.metrics import logit_diff
    >>> lm = lsi.LanguageModel(tiny_model("llama"))
    >>> r = activation_patching(lm, [[5, 6, 7, 8]], [[5, 9, 7, 8]], logit_diff(8, 9), "blocks.*.resid_pre",
    ...                         positions="each")
    >>> r.shape
    (2, 4)
    >>> round(float(r.scores[0, 1]), 4)  # the clean embedding of the changed token restores everything
    1.0
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from lsi.core.inputs import Batch
from lsi.core.interventions import Apply
from lsi.core.model import evaluate
from lsi.core.positions import as_positions
from lsi.core.runs import ContextFactory, as_run, check_aligned
from lsi.core.sites import Site
from lsi.errors import InputError
from lsi.locate.metrics import metric_name
from lsi.locate.result import LocateResult

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel, Metric, SiteSpec

Direction = Literal["denoise", "noise"]
AblationKind = Literal["zero", "mean", "resample"]
DEFAULT_BATCH_SIZE = 128  # rows per forward, chosen on one CPU thread: see benchmarks/README.md (bench_patching.py)


# -- the batched engine --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Write:
    """One replacement inside a patched run: a concrete site without index, the heads / neurons on its index
    axis (``None``: the whole value) and the positions (``[batch, pos]`` bool; ``None``: every real token)."""

    site: str
    units: tuple[int, ...] | None = None
    where: torch.Tensor | None = None


PatchedRun = Sequence[Write]


def run_patched(lm: LanguageModel, batch: Batch, runs: Sequence[PatchedRun], sources: Mapping[str, torch.Tensor],
                score: Callable[[torch.Tensor, Batch], torch.Tensor], *, setting: ContextFactory = nullcontext,
                batch_size: int = DEFAULT_BATCH_SIZE) -> torch.Tensor:
    """``score(logits, batch)`` of every patched run, stacked: ``[len(runs), *score_shape]``.

    Run ``r`` is ``batch`` in ``setting`` with each write of ``runs[r]`` replacing the site's value by
    ``sources[site]`` (a tensor broadcastable to the site's value for ``batch``). A forward holds
    ``max(1, batch_size // len(batch))`` runs. A setting that cannot take the expanded batch (e.g. noise shaped
    for the original rows) is retried with one run per forward, with a warning.
    """
    if batch_size < 1:
        raise InputError("batch_size >= 1 (rows per forward)", str(batch_size), "e.g. batch_size=128")
    copies = max(1, batch_size // batch.input_ids.shape[0])
    out: list[torch.Tensor] = []
    start = 0
    while start < len(runs):
        chunk = runs[start:start + copies]
        try:
            logits = _forward_copies(lm, batch, chunk, sources, setting)
        except RuntimeError:
            if copies == 1 or setting is nullcontext:
                raise
            warnings.warn(f"the run's setting does not accept a batch of {len(chunk)} copies of the inputs; "
                          "running one patched copy per forward (make the setting broadcast over repeated "
                          "batches to batch it)", stacklevel=2)
            copies = 1
            continue
        out.extend(score(copy, batch) for copy in logits)
        start += len(chunk)
    return torch.stack(out)


def _forward_copies(lm: LanguageModel, batch: Batch, chunk: Sequence[PatchedRun],
                    sources: Mapping[str, torch.Tensor], setting: ContextFactory) -> torch.Tensor:
    k, b = len(chunk), batch.input_ids.shape[0]
    expanded = batch.repeat(k)
    sites = dict.fromkeys(w.site for run in chunk for w in run)
    real = batch.attention_mask.bool()
    ops = [Apply(site, _writer(site, chunk, sources[site], real)) for site in sites]
    with setting(), lm.intervene(*ops):
        logits = lm.forward(expanded)
    return logits.view(k, b, *logits.shape[1:])


def _writer(site: str, chunk: Sequence[PatchedRun], source: torch.Tensor,
            real: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The Apply function for one site: copy ``j`` of the expanded batch takes ``source`` where run ``j`` writes."""
    writes = [[w for w in run if w.site == site] for run in chunk]
    per_unit = any(w.units is not None for ws in writes for w in ws)

    def write(x: torch.Tensor) -> torch.Tensor:
        k, b, rest = len(chunk), real.shape[0], x.shape[2:]
        n_units = rest[0] if per_unit else 1
        mask = torch.zeros(k, b, x.shape[1], n_units, dtype=torch.bool, device=x.device)
        for j, ws in enumerate(writes):
            for w in ws:
                where = (real if w.where is None else w.where.to(real.device) & real).to(x.device)
                units = slice(None) if w.units is None else list(w.units)
                mask[j, :, :, units] |= where[..., None]
        mask = mask.view(k, b, x.shape[1], n_units, *[1] * (len(rest) - 1))
        return torch.where(mask, source.to(x), x.view(k, b, *x.shape[1:])).view_as(x)

    return write


# -- objects and positions -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Object:
    label: str
    site: str
    units: tuple[int, ...] | None


def _objects(lm: LanguageModel, sites: SiteSpec) -> list[_Object]:
    """One object per concrete site, or per head / neuron for unindexed kinds that have such an axis."""
    if not isinstance(sites, (str, Site)) and len(sites) == 0:
        raise InputError("at least one site", "an empty list", "e.g. sites='blocks.*.resid_pre'")
    out: dict[str, _Object] = {}
    for s in lm.resolve_sites(sites):
        key = str(s.without_index())
        if s.index is not None:
            units: list[tuple[int, ...] | None] = [s.indices()]
        elif s.info.index_name is not None:
            units = [(u,) for u in range(int(lm.dims.size(s.info.index_name)))]  # type: ignore[arg-type]
        else:
            units = [None]
        for u in units:
            label = key if u is None else str(Site(s.kind, s.layer, u[0] if len(u) == 1 else u))
            out.setdefault(label, _Object(label, key, u))
    return list(out.values())


PositionsArg = Any  # "all" | "each" | a position selector | a list of selectors (see the module docstring)


def position_groups(positions: PositionsArg, batch: Batch) -> tuple[list[str] | None, list[torch.Tensor | None]]:
    """(column labels or ``None`` for no position axis, one ``[batch, pos]`` mask per column; ``None`` = all)."""
    if isinstance(positions, str) and positions == "all":
        return None, [None]
    ids, mask = batch.input_ids, batch.attention_mask
    if isinstance(positions, str) and positions == "each":
        index = batch.position_ids.masked_fill(~mask.bool(), -1)
        n = max(batch.lengths)
        return [str(i) for i in range(n)], [index == i for i in range(n)]
    if isinstance(positions, list):
        if not positions:
            raise InputError("at least one position", "an empty list", "e.g. positions=[0, -1] or 'each'")
        selectors = [as_positions(p) for p in positions]
        return [str(p) for p in selectors], [p.mask(ids, mask) for p in selectors]
    return None, [as_positions(positions).mask(ids, mask)]


# -- runs ----------------------------------------------------------------------------------------------------------

def _measure(lm: LanguageModel, batch: Batch, setting: ContextFactory, metric: Metric, *,
             cache: list[str] | None = None) -> tuple[float, dict[str, torch.Tensor]]:
    """The metric of one plain run in its setting, and the full values of ``cache`` sites."""
    with setting():
        if cache:
            run = lm.run_with_cache(batch, cache)
            logits, values = run.logits, {site: run.full(site) for site in cache}
        else:
            logits, values = lm.forward(batch), {}
    assert logits is not None
    return float(evaluate(metric, logits, batch)), values


def _grid(objects: list[_Object], columns: list[str] | None, values: torch.Tensor) -> tuple[Any, torch.Tensor]:
    axes: tuple[Any, ...] = (("site", tuple(o.label for o in objects)),)
    if columns is None:
        return axes, values.view(len(objects))
    return (*axes, ("position", tuple(columns))), values.view(len(objects), len(columns))


def _runs(objects: list[_Object], groups: list[torch.Tensor | None]) -> list[PatchedRun]:
    return [[Write(o.site, o.units, where)] for o in objects for where in groups]


def _positions_setting(positions: PositionsArg) -> Any:
    if isinstance(positions, list):
        return [str(as_positions(p)) for p in positions]
    return positions if isinstance(positions, str) else str(as_positions(positions))


# -- activation patching -------------------------------------------------------------------------------------------

def activation_patching(lm: LanguageModel, clean: Any, corrupted: Any, metric: Metric, sites: SiteSpec, *,
                        positions: PositionsArg = "all", direction: Direction = "denoise",
                        clean_setting: ContextFactory | None = None, corrupted_setting: ContextFactory | None = None,
                        batch_size: int = DEFAULT_BATCH_SIZE) -> LocateResult:
    """Patch each object between a clean and a corrupted run; scores = (F_patched − F_corrupt) / (F_clean − F_corrupt).

    ``direction="denoise"``: run the corrupted input with one object taken from the clean run. A score near 1
    means that object alone restores the clean behaviour (it is *sufficient*); near 0, it carries none of it.
    ``direction="noise"``: run the clean input with one object taken from the corrupted run. A score near 1 means
    the behaviour survives without the object's clean value; near 0 (or below), the object is *necessary*.

    ``clean`` / ``corrupted`` are inputs (same token length, row by row) or Run-like objects with ``.inputs``
    and ``.setting`` (a context-manager factory, e.g. noise on the subject embeddings); ``clean_setting`` /
    ``corrupted_setting`` give a setting for plain inputs. ``metric(logits, batch)`` returns a scalar.
    Settings of the result: ``direction``, ``positions``, ``f_clean``, ``f_corrupt``, ``f_patched`` (the raw
    metric of every patched run, shaped like the scores) and ``patched_runs``: patches that would write exactly
    the values the patched run already has (e.g. positions before the corrupted token) are not run, their metric
    is the unpatched run's.

    Example (the module example's ``lm``; every head, all positions at once):
        >>> r = activation_patching(lm, [[5, 6, 7, 8]], [[5, 9, 7, 8]], logit_diff(8, 9),  # doctest: +SKIP
        ...                         "blocks.*.attn.head_out")
        >>> r.labels[:2]  # doctest: +SKIP
        ['blocks.0.attn.head_out[0]', 'blocks.0.attn.head_out[1]']
    """
    if direction not in ("denoise", "noise"):
        raise InputError("direction 'denoise' or 'noise'", repr(direction),
                         "denoise: patch clean values into the corrupted run; noise: corrupted into clean")
    clean_run, corrupt_run = as_run(clean, clean_setting), as_run(corrupted, corrupted_setting)
    clean_batch, corrupt_batch = lm.to_batch(clean_run.inputs), lm.to_batch(corrupt_run.inputs)
    check_aligned(clean_batch, corrupt_batch)
    objects = _objects(lm, sites)
    keys = list(dict.fromkeys(o.site for o in objects))
    f_clean, clean_values = _measure(lm, clean_batch, clean_run.setting, metric, cache=keys)
    f_corrupt, corrupt_values = _measure(lm, corrupt_batch, corrupt_run.setting, metric, cache=keys)
    if f_clean == f_corrupt:
        raise InputError("clean and corrupted runs whose metric differs (scores divide by F_clean − F_corrupt)",
                         f"F = {f_clean:.6g} for both", "check the corruption changes the behaviour the metric reads")
    base, base_setting, f_base, base_values, sources = (
        (corrupt_batch, corrupt_run.setting, f_corrupt, corrupt_values, clean_values) if direction == "denoise"
        else (clean_batch, clean_run.setting, f_clean, clean_values, corrupt_values))
    columns, groups = position_groups(positions, base)
    runs = _runs(objects, groups)
    # a patch that writes the values the base run already has leaves it unchanged: its metric is F_base
    changes = _changed_cells(sources, base_values)
    effective = [i for i, run in enumerate(runs) if _changes_anything(run[0], changes[run[0].site], base)]
    patched = torch.full((len(runs),), f_base)
    if effective:
        patched[effective] = run_patched(lm, base, [runs[i] for i in effective], sources,
                                         lambda lg, b: evaluate(metric, lg, b), setting=base_setting,
                                         batch_size=batch_size).float().cpu()
    axes, raw = _grid(objects, columns, patched)
    return LocateResult((raw - f_corrupt) / (f_clean - f_corrupt), axes, method="activation_patching",
                        metric=metric_name(metric),
                        settings={"direction": direction, "positions": _positions_setting(positions),
                                  "f_clean": f_clean, "f_corrupt": f_corrupt, "f_patched": raw,
                                  "n_inputs": len(base.lengths), "patched_runs": len(effective)})


def _changed_cells(sources: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per site, where the source differs from the base run: ``[batch, pos, units or 1]`` bool."""
    out = {}
    for site, value in sources.items():
        differs = (value != base[site]).cpu()
        per_unit = Site.parse(site).info.index_axis is not None
        if not per_unit:
            out[site] = differs.flatten(2).any(-1, keepdim=True)
        else:  # [batch, pos, units, ...]
            out[site] = differs if differs.dim() == 3 else differs.flatten(3).any(-1)
    return out


def _changes_anything(write: Write, changed: torch.Tensor, batch: Batch) -> bool:
    units = changed if write.units is None else changed[:, :, list(write.units)]
    where = batch.attention_mask.bool().cpu() if write.where is None else write.where.cpu()
    return bool((units.any(-1) & where).any())


# -- ablation ------------------------------------------------------------------------------------------------------

def ablation(lm: LanguageModel, inputs: Any, metric: Metric, sites: SiteSpec, *, kind: AblationKind = "zero",
             reference: Any = None, positions: PositionsArg = "all", setting: ContextFactory | None = None,
             seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE) -> LocateResult:
    """Ablate each object alone; scores = ΔF = F(ablated) − F(clean) (negative: the object supports F).

    ``kind``: ``"zero"`` (x ← 0); ``"mean"`` (x ← the site's mean over the rows and real positions of
    ``reference``); ``"resample"`` (each input row takes, at every real-token position, the value of one random
    other row of ``reference`` at the same real-token position; donors are drawn with ``seed`` among the rows at
    least as long). ``reference`` defaults to the inputs themselves (run in their setting); a given reference is
    run without a setting. ``inputs`` may be a Run-like object (``.inputs``, ``.setting``).
    Settings of the result: ``kind``, ``positions``, ``f_clean``, ``f_ablated`` (raw metric per object), ``seed``.

    Example (the module example's ``lm``):
        >>> r = ablation(lm, [[5, 6, 7, 8], [4, 6, 2, 8]], logit_diff(8, 9), "blocks.1.mlp.out",  # doctest: +SKIP
        ...              kind="mean")
        >>> r.labels, r.settings["kind"]  # doctest: +SKIP
        (['blocks.1.mlp.out'], 'mean')
    """
    if kind not in ("zero", "mean", "resample"):
        raise InputError("kind 'zero', 'mean' or 'resample'", repr(kind), "e.g. kind='mean'")
    run = as_run(inputs, setting)
    raw_inputs, run_setting = run.inputs, run.setting
    batch = lm.to_batch(raw_inputs)
    objects = _objects(lm, sites)
    keys = list(dict.fromkeys(o.site for o in objects))
    own_stats = kind != "zero" and reference is None
    f_clean, own = _measure(lm, batch, run_setting, metric, cache=keys if own_stats else None)
    if kind == "zero":
        sources = {key: torch.zeros(()) for key in keys}
    else:
        ref_batch = batch if reference is None else lm.to_batch(reference)
        values = own if reference is None else _cache(lm, ref_batch, keys)
        if kind == "mean":
            real = ref_batch.attention_mask.bool()
            sources = {key: values[key][real.to(values[key].device)].mean(0) for key in keys}
        else:
            rows, cols = _donors(batch, ref_batch, seed, exclude_self=reference is None)
            sources = {key: values[key][rows, cols] for key in keys}
    columns, groups = position_groups(positions, batch)
    ablated = run_patched(lm, batch, _runs(objects, groups), sources, lambda lg, b: evaluate(metric, lg, b),
                          setting=run_setting, batch_size=batch_size).float()
    axes, raw = _grid(objects, columns, ablated)
    return LocateResult(raw - f_clean, axes, method=f"{kind}_ablation", metric=metric_name(metric),
                        settings={"kind": kind, "positions": _positions_setting(positions), "f_clean": f_clean,
                                  "f_ablated": raw, "n_inputs": len(batch.lengths), "seed": seed})


def _cache(lm: LanguageModel, batch: Batch, sites: list[str]) -> dict[str, torch.Tensor]:
    run = lm.run_with_cache(batch, sites)
    return {site: run.full(site) for site in sites}


def _donors(batch: Batch, ref: Batch, seed: int, *, exclude_self: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference row, reference column) for every cell of ``batch``: one random donor row per input row, at
    least as long, read at the same real-token index."""
    lengths = torch.tensor(batch.lengths)
    ref_lengths = torch.tensor(ref.lengths)
    allowed = ref_lengths[None, :] >= lengths[:, None]
    if exclude_self:
        allowed &= ~torch.eye(len(lengths), len(ref_lengths), dtype=torch.bool)
    stuck = (~allowed.any(1)).nonzero().flatten().tolist()
    if stuck:
        raise InputError("for every input, another reference input at least as long (resample ablation reads the "
                         "donor at the same real-token positions)",
                         f"no donor for rows {stuck[:5]} (lengths {[batch.lengths[r] for r in stuck[:5]]}; longest "
                         f"reference {max(ref.lengths)})",
                         "pass reference= with more (or longer) inputs, or use equal-length inputs")
    draw = torch.rand(allowed.shape, generator=torch.Generator().manual_seed(seed))
    donor = torch.where(allowed, draw, -1.0).argmax(1)
    # column of the i-th real token of each reference row
    real_cols = torch.sort((~ref.attention_mask.bool().cpu()).long(), dim=1, stable=True).indices
    index = batch.position_ids.cpu().clamp(max=real_cols.shape[1] - 1)
    rows = donor[:, None].expand_as(index)
    return rows, real_cols[rows, index]
