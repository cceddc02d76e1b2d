"""Gradient detection: gradient norm, gradient × input, integrated gradients, attribution patching, and
parameter gradient norms (METHODS.md Locate §3) — first-order proxies for how much an object matters to a
scalar metric F, from one or a few backward passes.

Objects: a site without a head or neuron axis is one object (``embed``, ``blocks.2.resid_pre``,
``blocks.1.mlp.out``, ``ln_final``); a site with one is an object per head or neuron (``blocks.0.attn.head_out``
means every head; ``blocks.0.mlp.post[3,7]`` two neurons). Labels are site strings; ``positions="each"`` adds
a ``position`` axis (real-token positions, counted as position selectors count them whatever the padding side, so
cells read ``blocks.0.resid_pre@3``). Padding tokens never count.

Over a dataset the per-row scores are summed (``aggregate="abs"``: their absolute values). For a metric that
averages over rows, as the ready-made metrics do, row b's gradient is 1/N of that row's own gradient, so the sums
are the dataset means of each row's own score (or of its absolute value).

Example:
    >>> import lsi
    >>> from lsi.testing import tiny_model
    >>> from lsi.locate.metrics import logit_diff
    >>> lm = lsi.LanguageModel(tiny_model("llama"))
    >>> r = gradient_x_input(lm, [[5, 6, 7, 8]], logit_diff(3, 4), "blocks.*.attn.head_out")
    >>> r.labels[:2], r.settings["aggregate"]
    (['blocks.0.attn.head_out[0]', 'blocks.0.attn.head_out[1]'], 'signed')
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

from lsi.arch.dims import out_in
from lsi.core.inputs import Batch, Inputs
from lsi.core.interventions import Set
from lsi.core.model import evaluate
from lsi.core.runs import ContextFactory, Run, as_run, check_aligned
from lsi.core.sites import Site
from lsi.errors import InputError, ShapeMismatchError
from lsi.locate.metrics import metric_name
from lsi.locate.result import LocateResult

if TYPE_CHECKING:
    from lsi.core.model import GradResult, LanguageModel, Metric, SiteSpec

PositionMode = Literal["all", "each"]
Aggregate = Literal["signed", "abs"]
Direction = Literal["noise", "denoise"]
Baseline = Literal["zeros"] | torch.Tensor | Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class _Group:
    """Objects of one concrete site: the whole site (``units is None``) or some of its heads / neurons."""

    site: Site
    units: tuple[int, ...] | None

    @property
    def labels(self) -> list[str]:
        if self.units is None:
            return [str(self.site)]
        return [str(Site(self.site.kind, self.site.layer, u)) for u in self.units]

    def per_unit(self, x: torch.Tensor) -> torch.Tensor:
        """``[batch, pos, n_objects]``: ``x`` (shaped like the site) summed over everything but rows, positions
        and the chosen units."""
        info = self.site.info
        if self.units is None:
            x = x.movedim(info.position_axis, 1).unsqueeze(2)
        else:
            assert info.index_axis is not None
            x = x.movedim((info.position_axis, info.index_axis), (1, 2))[:, :, list(self.units)]
        return x.reshape(*x.shape[:3], -1).sum(-1)

    def unit_mask(self, like: torch.Tensor) -> torch.Tensor:
        """Boolean tensor broadcastable to the site's value: True on the chosen units (everywhere if whole)."""
        axis = self.site.info.index_axis
        if self.units is None or axis is None:
            return torch.ones((), dtype=torch.bool, device=like.device)
        shape = [1] * like.dim()
        shape[axis] = like.shape[axis]
        mask = torch.zeros(shape, dtype=torch.bool, device=like.device)
        mask.index_fill_(axis, torch.tensor(self.units, device=like.device), True)
        return mask


def _groups(lm: LanguageModel, sites: SiteSpec) -> list[_Group]:
    """The objects ``sites`` names, grouped by concrete site (repeats dropped, order kept)."""
    units: dict[Site, list[int] | None] = {}
    for s in lm.resolve_sites(sites):
        base, name = s.without_index(), s.info.index_name
        if name is None:
            units[base] = None
            continue
        size = lm.dims.size(name)
        assert size is not None
        chosen = units.setdefault(base, [])
        assert chosen is not None
        chosen.extend(u for u in (s.indices() or range(size)) if u not in chosen)
    return [_Group(site, None if u is None else tuple(u)) for site, u in units.items()]


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise InputError(f"{name} in {allowed}", repr(value), f"pass e.g. {name}={allowed[0]!r}")


def _summed(contrib: torch.Tensor, batch: Batch, positions: PositionMode,
            per_row: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``[batch, pos, n]`` -> ``[n]`` (``"all"``) or ``[n, real position]`` (``"each"``): ``per_row`` of each
    row's value over its real tokens (summed over them for ``"all"``), then summed over rows."""
    real = batch.attention_mask.bool().to(contrib.device)
    if positions == "all":
        return per_row((contrib * real[..., None]).sum(1)).sum(0)
    aligned = contrib.new_zeros(contrib.shape[0], int(real.sum(1).max()), contrib.shape[2])
    rows, cols = real.nonzero(as_tuple=True)
    aligned[rows, batch.position_ids.to(contrib.device)[rows, cols]] = contrib[rows, cols]
    return per_row(aligned).sum(0).T


def _keep(x: torch.Tensor) -> torch.Tensor:
    return x


def _per_row(aggregate: Aggregate) -> Callable[[torch.Tensor], torch.Tensor]:
    return torch.abs if aggregate == "abs" else _keep


def _result(groups: list[_Group], scores: list[torch.Tensor], positions: PositionMode, *, method: str,
            metric: object, **settings: Any) -> LocateResult:
    labels = tuple(label for g in groups for label in g.labels)
    axes: tuple[tuple[str, tuple[str, ...]], ...] = (("site", labels),)
    if positions == "each":
        axes += (("position", tuple(str(p) for p in range(scores[0].shape[1]))),)
    return LocateResult(torch.cat(scores), axes, method=method, metric=metric_name(metric),
                        settings={"positions": positions, **settings})


def _baseline_value(baseline: Baseline, site: Site, like: torch.Tensor) -> torch.Tensor:
    """The baseline õ for ``site``, shaped like its value ``like``."""
    if isinstance(baseline, str):
        _check_choice("baseline", baseline, ("zeros",))
        return torch.zeros_like(like)
    if isinstance(baseline, Mapping):
        if str(site) not in baseline:
            raise InputError(f"a baseline value for {site}", f"keys {list(baseline)}",
                             f"cache {site} in the baseline run (e.g. lm.run_with_cache(corrupted, {str(site)!r}))")
        value = baseline[str(site)]
        if value.shape != like.shape:
            raise ShapeMismatchError(f"a baseline for {site} shaped like its value {tuple(like.shape)}",
                                     f"shape {tuple(value.shape)}",
                                     "run the baseline inputs with the same rows and token length, without positions=")
        return value.to(like)
    try:
        return torch.as_tensor(baseline).to(like).expand_as(like)
    except RuntimeError:
        raise ShapeMismatchError(f"a baseline tensor broadcastable to {tuple(like.shape)} at {site}",
                                 f"shape {tuple(torch.as_tensor(baseline).shape)}",
                                 f"give one vector of shape {tuple(like.shape[-1:])} or the full shape") from None


def _first_order(groups: list[_Group], run: GradResult, baseline: Baseline) -> list[torch.Tensor]:
    """``∇_o F · (o − õ)`` per group, as ``[batch, pos, n_objects]``."""
    out = []
    for g in groups:
        o = run.activations.full(g.site)
        out.append(g.per_unit(run.grads.full(g.site) * (o - _baseline_value(baseline, g.site, o))))
    return out


def gradient_x_input(lm: LanguageModel, inputs: Inputs | Batch, metric: Metric, sites: SiteSpec, *,
                     baseline: Baseline = "zeros", positions: PositionMode = "all",
                     aggregate: Aggregate = "signed") -> LocateResult:
    """Gradient × input ``∇_o F · (o − õ)`` per object: the first-order estimate of F(o) − F(õ), how much F drops
    when the object is set to the baseline õ (``"zeros"``: zero ablation; a tensor; or a mapping such as an
    :class:`~lsi.ActivationCache` of another run, e.g. a layer's input as the baseline of its output).

    Example:
        >>> r = gradient_x_input(lm, ids, logit_diff(3, 4), "blocks.*.mlp.post", aggregate="abs")  # doctest: +SKIP
        >>> r.top(5)  # doctest: +SKIP
    """
    _check_choice("positions", positions, ("all", "each"))
    _check_choice("aggregate", aggregate, ("signed", "abs"))
    groups, batch = _groups(lm, sites), lm.to_batch(inputs)
    run = lm.run_with_grads(batch, metric, [g.site for g in groups])
    scores = [_summed(c, batch, positions, _per_row(aggregate)) for c in _first_order(groups, run, baseline)]
    return _result(groups, scores, positions, method="gradient_x_input", metric=metric, aggregate=aggregate,
                   baseline=_describe(baseline), metric_value=float(run.value))


def gradient_norm(lm: LanguageModel, inputs: Inputs | Batch, metric: Metric, sites: SiteSpec, *,
                  positions: PositionMode = "all") -> LocateResult:
    """Gradient norm ``||∇_o F||`` per object and row (over its positions, or per position), summed over rows.

    Example:
        >>> r = gradient_norm(lm, ids, logit_diff(3, 4), "blocks.*.resid_pre", positions="each")  # doctest: +SKIP
    """
    _check_choice("positions", positions, ("all", "each"))
    groups, batch = _groups(lm, sites), lm.to_batch(inputs)
    run = lm.run_with_grads(batch, metric, [g.site for g in groups])
    scores = [_summed(g.per_unit(run.grads.full(g.site).square()), batch, positions, torch.sqrt) for g in groups]
    return _result(groups, scores, positions, method="gradient_norm", metric=metric,
                   aggregate="sum over rows of each row's norm", metric_value=float(run.value))


def integrated_gradients(lm: LanguageModel, inputs: Inputs | Batch, metric: Metric, site: str | Site, *,
                         baseline: Baseline = "zeros", steps: int = 32, positions: PositionMode = "all",
                         aggregate: Aggregate = "signed", steps_per_batch: int | None = None) -> LocateResult:
    """Integrated gradients ``IG_k = (o − õ)_k ∫_0^1 ∂F(õ + α(o − õ))/∂o_k dα`` at one site, per object.

    The integral is a midpoint Riemann sum over ``steps`` values α = (j + ½) / steps (error O(1/steps²) for a
    smooth F), computed by setting the site's value along the path: ``steps_per_batch`` steps (default all) run
    as one forward and backward over the batch repeated that many times. With an index (``...head_out[2]``)
    only those heads / neurons move; the rest keep their values. Completeness Σ_k IG_k = F(o) − F(õ) is checked:
    ``settings`` records both sides and ``completeness_error`` (absolute and relative); read it with
    :func:`completeness_error`. ``baseline`` is as in :func:`gradient_x_input`; zeros are a poor baseline for
    residual states (the norms that read them are scale-invariant, so F changes abruptly near α = 0 and the
    Riemann sum misses it; the completeness error shows it): use another run's values there.

    Example:
        >>> corrupt = lm.run_with_cache(corrupted_ids, "blocks.1.mlp.out")  # doctest: +SKIP
        >>> r = integrated_gradients(lm, ids, metric, "blocks.1.mlp.out", baseline=corrupt)  # doctest: +SKIP
        >>> completeness_error(r, relative=True) < 1e-3  # doctest: +SKIP
    """
    _check_choice("positions", positions, ("all", "each"))
    _check_choice("aggregate", aggregate, ("signed", "abs"))
    for name, value in (("steps", steps), ("steps_per_batch", steps if steps_per_batch is None else steps_per_batch)):
        if not isinstance(value, int) or value < 1:
            raise InputError(f"{name} >= 1 (an int)", repr(value), f"e.g. {name}=32")
    groups = _groups(lm, site)
    if len(groups) != 1:
        raise InputError("one concrete site (one layer)", f"{[str(g.site) for g in groups]}",
                         "call integrated_gradients once per site")
    group, batch = groups[0], lm.to_batch(inputs)
    plain = lm.run_with_cache(batch, group.site)
    o = plain.full(group.site)
    start = torch.where(group.unit_mask(o), _baseline_value(baseline, group.site, o), o)
    grad_sum = torch.zeros_like(o)
    for alphas in ((torch.arange(steps, dtype=o.dtype, device=o.device) + 0.5) / steps).split(steps_per_batch or steps):
        grad_sum += _path_grads(lm, batch, metric, group.site, start, o, alphas)
    contrib = group.per_unit((o - start) * grad_sum / steps)
    with lm.intervene(Set(group.site, start)):
        f_start = float(evaluate(metric, lm.forward(batch), batch))
    assert plain.logits is not None
    f_input = float(evaluate(metric, plain.logits, batch))
    total = float(contrib.sum())
    error = abs(total - (f_input - f_start))
    return _result(groups, [_summed(contrib, batch, positions, _per_row(aggregate))], positions,
                   method="integrated_gradients", metric=metric, aggregate=aggregate, baseline=_describe(baseline),
                   steps=steps, rule="midpoint", f_input=f_input, f_baseline=f_start, ig_sum=total,
                   completeness_error=error, relative_completeness_error=error / max(abs(f_input - f_start), 1e-12))


def _path_grads(lm: LanguageModel, batch: Batch, metric: Metric, site: Site, start: torch.Tensor,
                end: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Σ over ``alphas`` of ∂F/∂x at x = start + α (end − start): one forward of the batch repeated per α."""
    k, rows = len(alphas), batch.input_ids.shape[0]
    shape = (k, *[1] * end.dim())
    path = (start + alphas.view(shape) * (end - start)).flatten(0, 1)
    repeated = batch.repeat(k)

    def summed(logits: torch.Tensor, _: Batch) -> torch.Tensor:
        return torch.stack([evaluate(metric, logits[i * rows:(i + 1) * rows], batch) for i in range(k)]).sum()

    with lm.intervene(Set(site, path)):
        grads = lm.run_with_grads(repeated, summed, site).grads.full(site)
    return grads.view(k, *end.shape).sum(0)


def completeness_error(result: LocateResult, *, relative: bool = False) -> float:
    """``|Σ IG − (F(o) − F(õ))|`` of an :func:`integrated_gradients` result (``relative``: divided by
    ``|F(o) − F(õ)|``)."""
    key = "relative_completeness_error" if relative else "completeness_error"
    if key not in result.settings:
        raise InputError("a result of integrated_gradients", f"a result of {result.method}",
                         "run integrated_gradients to get a completeness check")
    return float(result.settings[key])


def attribution_patching(lm: LanguageModel, clean: Inputs | Batch | Run, corrupted: Inputs | Batch | Run,
                         metric: Metric, sites: SiteSpec, *, positions: PositionMode = "all",
                         direction: Direction = "denoise", normalize: bool = True,
                         clean_setting: ContextFactory | None = None,
                         corrupted_setting: ContextFactory | None = None) -> LocateResult:
    """Attribution patching: ``ΔF ≈ (o_source − o_base) · ∇_o F|base`` for every object at once, from one forward
    of the source run and one forward and backward of the base run.

    The first-order estimate of exact activation patching, with its semantics and labels: ``direction="noise"``
    patches corrupted values into the clean run (base = clean: (o_corrupt − o_clean) · ∇F|clean),
    ``"denoise"`` clean values into the corrupted run; each object at every position at once
    (``positions="all"``) or at each position (``"each"``). Scores are normalized as patching's,
    (F_patched − F_corrupt) / (F_clean − F_corrupt) with F_patched ≈ F_base + ΔF: denoising, 0 = no effect and
    1 = the object alone restores the clean behaviour; noising, 1 = no effect and 0 = the object carries the whole
    difference. ``normalize=False`` gives ΔF = F_patched − F_base itself. Denoising is the default: at a clean
    run whose behaviour is near its ceiling the gradient saturates and noising estimates miss most of the effect.

    ``clean`` and ``corrupted`` are inputs of the same shape, or runs with ``.inputs`` and ``.setting`` (e.g.
    noise on the subject embeddings; :class:`lsi.core.runs.Run`); ``clean_setting`` / ``corrupted_setting``
    give a setting to plain inputs.

    Example:
        >>> heads = "blocks.*.attn.head_out"
        >>> r = attribution_patching(lm, clean_ids, corrupt_ids, logit_diff(3, 4), heads)  # doctest: +SKIP
        >>> r.top(3, by="abs")  # doctest: +SKIP
    """
    _check_choice("positions", positions, ("all", "each"))
    _check_choice("direction", direction, ("noise", "denoise"))
    clean_run, corrupt_run = as_run(clean, clean_setting), as_run(corrupted, corrupted_setting)
    clean_batch, corrupt_batch = lm.to_batch(clean_run.inputs), lm.to_batch(corrupt_run.inputs)
    check_aligned(clean_batch, corrupt_batch)
    pairs = [(clean_run, clean_batch), (corrupt_run, corrupt_batch)]
    (base, base_batch), (source, source_batch) = pairs if direction == "noise" else pairs[::-1]
    groups = _groups(lm, sites)
    with source.setting():
        cache = lm.run_with_cache(source_batch, [g.site for g in groups])
    with base.setting():
        run = lm.run_with_grads(base_batch, metric, [g.site for g in groups])
    f_base = float(run.value)
    assert cache.logits is not None
    f_source = float(evaluate(metric, cache.logits, source_batch))
    f_clean, f_corrupt = (f_base, f_source) if direction == "noise" else (f_source, f_base)
    scores = [_summed(-c, base_batch, positions, _keep) for c in _first_order(groups, run, cache)]
    if normalize:
        if f_clean == f_corrupt:
            raise InputError("clean and corrupted runs whose metric differs (normalized scores divide by "
                             "F_clean − F_corrupt)", f"F = {f_clean:.6g} for both",
                             "check the corruption changes the behaviour the metric reads, or pass normalize=False")
        scores = [(f_base + s - f_corrupt) / (f_clean - f_corrupt) for s in scores]
    return _result(groups, scores, positions, method="attribution_patching", metric=metric, direction=direction,
                   normalized=normalize, f_clean=f_clean, f_corrupt=f_corrupt)


def parameter_gradients(lm: LanguageModel, inputs: Inputs | Batch, metric: Metric, *,
                        params: str | Sequence[str] = "*", per: Literal["tensor", "row"] = "tensor") -> LocateResult:
    """Parameter gradient norms ``||∇_W F||`` per parameter tensor, or per row (``per="row"``).

    ``params`` are glob patterns over ``model.named_parameters()`` names. Rows are taken in the ``[out, in]``
    layout whatever the storage (GPT-2's Conv1D is transposed): one per output unit — a neuron of an up or gate
    projection, a token of an embedding, a residual dimension of a down projection; 1-d parameters give one row
    per entry. Labels: parameter names, with ``[i]`` per row.

    Example:
        >>> r = parameter_gradients(lm, ids, logit_diff(3, 4), params="*mlp*", per="row")  # doctest: +SKIP
    """
    _check_choice("per", per, ("tensor", "row"))
    patterns = [params] if isinstance(params, str) else list(params)
    chosen = [(n, p) for n, p in lm.model.named_parameters() if any(fnmatch.fnmatch(n, pat) for pat in patterns)]
    if not chosen:
        names = [n for n, _ in lm.model.named_parameters()][:3]
        raise InputError("glob patterns matching parameter names", repr(params), f"names look like {names}")
    batch = lm.to_batch(inputs)
    flags = [p.requires_grad for _, p in chosen]
    try:
        for _, p in chosen:
            p.requires_grad_(True)
        with torch.enable_grad():
            value = evaluate(metric, lm.logits_with_grad(batch), batch)
            grads = torch.autograd.grad(value, [p for _, p in chosen], allow_unused=True)
    finally:
        for (_, p), flag in zip(chosen, flags, strict=True):
            p.requires_grad_(flag)
    labels: list[str] = []
    norms: list[torch.Tensor] = []
    for (name, p), g in zip(chosen, grads, strict=True):
        g = torch.zeros_like(p) if g is None else g.detach()
        if per == "tensor":
            labels.append(name)
            norms.append(g.norm().reshape(1))
            continue
        rows = out_in(g, lm.model.get_submodule(name.rpartition(".")[0]))
        labels.extend(f"{name}[{i}]" for i in range(rows.shape[0]))
        norms.append(rows.reshape(rows.shape[0], -1).norm(dim=1))
    return LocateResult.over(labels, torch.cat(norms), method="parameter_gradients", metric=metric_name(metric),
                             axis="parameter", per=per, metric_value=float(value.detach()))


def _describe(baseline: Baseline) -> str:
    if isinstance(baseline, str):
        return baseline
    if isinstance(baseline, Mapping):
        return "values of another run"
    return f"a tensor of shape {tuple(torch.as_tensor(baseline).shape)}"
