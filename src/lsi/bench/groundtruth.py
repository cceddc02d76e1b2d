"""The ground-truth benchmark: every registered locate, steer and edit method on every organism task it applies to.

Locate: scores are graded against the planted components with precision@|G| (R-precision), AUROC, average
precision and the Spearman correlation with the oracle's scores. For tasks whose truth is the least important
components (redundant layers), every method's scores are negated before grading.

Steer: every candidate steering a method proposes is measured on the task's test split (exact success,
generalization, specificity, fluency; KL(base ‖ steered) and Δ cross-entropy on a held-out corpus), giving a
success-vs-KL curve; the grade is the best target success at KL ≤ τ with the other metrics at that point, next to
the unsteered model, the task's oracle (or why it has none) and a random direction of equal norm.

Edit: every knowledge-edit method rewrites each request of the task (one or more rows per method, e.g. one per
layer) and is graded CounterFact-style by its means over the requests (:mod:`lsi.evaluation.edit`): efficacy,
paraphrase, neighbourhood, ``S`` = their harmonic mean, preservation of the subject's other facts, KL(base ‖ edited)
and Δ cross-entropy on held-out text, next to the unedited model.

:func:`run_benchmark` runs every side (``kind="all"``) or one and returns a :class:`~lsi.bench.records.BenchmarkRun`
(typed records; its JSON keeps the locate result at the top level and adds the steer result under ``"steer"`` and
the edit result under ``"edit"``); :mod:`lsi.report.text` renders it.

Example:
    >>> result = run_groundtruth(methods=[], organisms=["layer_redundancy"])  # doctest: +SKIP
    >>> result.tasks[0].methods["oracle"].auroc  # doctest: +SKIP
    1.0
    >>> steer = run_steer_groundtruth(methods=["directional_ablation"], organisms=["refusal_gate"])  # doctest: +SKIP
    >>> steer.tasks[0].methods["directional_ablation"].best.success  # doctest: +SKIP
    1.0
    >>> edit = run_edit_groundtruth(methods=["rome"], organisms=["fact_world"])  # doctest: +SKIP
    >>> edit.tasks[0].methods["rome"].rows["rome"].means["efficacy"]  # doctest: +SKIP
    0.984375
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from lsi.bench.edit_methods import EDIT, EditMethod, get_edit_methods
from lsi.bench.records import (
    BenchmarkRun,
    EditMethodResult,
    EditRow,
    EditRun,
    EditTaskResult,
    LocateGrades,
    LocateRun,
    LocateTaskResult,
    Skipped,
    SteerMethodResult,
    SteerRun,
    SteerTaskResult,
)
from lsi.bench.registry import LOCATE, LocateMethod, MethodOutput, Scores, get_locate_methods
from lsi.bench.steer_registry import STEER, SteerMethod, get_steer_methods
from lsi.core.bundle import write_json_atomic
from lsi.errors import InputError
from lsi.evaluation import ranking
from lsi.evaluation.edit import CaseScores, EditTask, measure_case, summarize
from lsi.evaluation.locate import LocateTask
from lsi.evaluation.steer import CurvePoint, SteerScores, SteerTask, best_at_kl, measure, reference, split_reference
from lsi.organisms.registry import ORGANISMS, get_organism, ground_truth, load_organism

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel

Kind = Literal["locate", "steer", "edit", "all"]
SIDES = ("locate", "steer", "edit")
_GRADES = ("r_precision", "auroc", "average_precision", "spearman_vs_oracle")


def _grade(scores: Scores, oracle: Scores, task: LocateTask) -> dict[str, float]:
    sign = -1.0 if task.planted_are_least_important else 1.0
    signed = {u: sign * s for u, s in scores.items()}
    truth = set(task.planted)
    return {"r_precision": ranking.r_precision(signed, truth), "auroc": ranking.auroc_of(signed, truth),
            "average_precision": ranking.average_precision(signed, truth),
            "spearman_vs_oracle": ranking.spearman(scores, oracle)}


def oracle_margin(oracle: Scores, task: LocateTask) -> float:
    """How clearly the oracle separates the planted components: (weakest planted - strongest other) / largest
    score, with the sign flipped for least-important tasks. Near 0 means the organism barely separates them."""
    sign = -1.0 if task.planted_are_least_important else 1.0
    planted = [sign * oracle[u] for u in task.planted]
    others = [sign * s for u, s in oracle.items() if u not in task.planted]
    scale = max(abs(s) for s in oracle.values()) or 1.0
    return (min(planted) - max(others)) / scale


def _scores(output: Scores | MethodOutput) -> Scores:
    return output.scores if isinstance(output, MethodOutput) else output


Draws = list[Scores | MethodOutput]


def _timed_run(lm: LanguageModel, task: LocateTask, method: LocateMethod) -> tuple[Draws, float]:
    """The method's output per draw, and its seconds per draw."""
    start = time.perf_counter()
    draws = [method.run(lm, task, seed) for seed in range(method.draws)]
    return draws, round((time.perf_counter() - start) / method.draws, 3)


def _graded(draws: Draws, seconds: float, oracle: Scores, task: LocateTask) -> LocateGrades:
    graded = [_grade(_scores(o), oracle, task) for o in draws]
    means = {k: sum(g[k] for g in graded) / len(graded) for k in _GRADES}
    extras = draws[0].extras if isinstance(draws[0], MethodOutput) else None
    return LocateGrades(**means, seconds=seconds, extras=extras)


def _run_method(lm: LanguageModel, task: LocateTask, method: LocateMethod, oracle: Scores) -> LocateGrades | Skipped:
    reason = method.applies(task)
    return Skipped(reason) if reason is not None else _graded(*_timed_run(lm, task, method), oracle, task)


def run_groundtruth(*, methods: list[str] | None = None, organisms: list[str] | None = None) -> LocateRun:
    """Grade locate methods on the organisms' locate tasks."""
    oracle_method, *others = get_locate_methods(methods)  # the oracle first: run once, graded like the others
    tasks: list[LocateTaskResult] = []
    skipped: dict[str, str] = {}
    skip = "no locate task: its ground truth grades steer methods or SAEs"
    for name, lm, task in _organism_tasks(organisms, "locate_tasks", skip, skipped):
        oracle_draws, oracle_seconds = _timed_run(lm, task, oracle_method)
        oracle = _scores(oracle_draws[0])
        tasks.append(LocateTaskResult(
            organism=name, task=task.name, description=task.description, universe_size=len(task.universe),
            planted=tuple(sorted(task.planted)), planted_are_least_important=task.planted_are_least_important,
            oracle_scores=oracle, oracle_margin=oracle_margin(oracle, task),
            methods={oracle_method.name: _graded(oracle_draws, oracle_seconds, oracle, task),
                     **{m.name: _run_method(lm, task, m, oracle) for m in others}}))
    return LocateRun(tuple(tasks), skipped)


def _organism_tasks(organisms: list[str] | None, field: str, skip: str,
                    skipped: dict[str, str]) -> Iterator[tuple[str, Any, Any]]:
    """``(organism, model, task)`` for every task the organisms declare in ``field`` (``"locate_tasks"``,
    ``"steer_tasks"`` or ``"edit_tasks"``); organisms that declare none are recorded in ``skipped`` with the reason
    ``skip``."""
    for name in list(ORGANISMS) if organisms is None else organisms:
        make_tasks = getattr(get_organism(name), field)
        if make_tasks is None:
            skipped[name] = skip
            continue
        lm = load_organism(name)
        for task in make_tasks(lm, ground_truth(name)):
            yield name, lm, task


def write_json(run: BenchmarkRun, path: str | Path) -> None:
    """Write the run's JSON atomically (a temporary file, then a rename)."""
    write_json_atomic(path, run.to_json())


# -- steer side -----------------------------------------------------------------------------------------------------
def _mean_point(points: list[CurvePoint]) -> CurvePoint:
    """A point, or the mean of several draws' points (a metric is ``None`` if any draw lacks it)."""
    if len(points) == 1:
        return points[0]
    rows = [p.to_json() for p in points]
    mean = {k: None if any(r[k] is None for r in rows) else sum(r[k] for r in rows) / len(rows)
            for k in rows[0] if k != "settings"}
    return CurvePoint.from_json({"settings": {"mean_of_draws": len(rows)}, **mean})


def _run_steer_method(lm: LanguageModel, task: SteerTask, method: SteerMethod,
                      ref: Any) -> SteerMethodResult | Skipped:
    reason = method.applies(task)
    if reason is not None:
        return Skipped(reason)
    start = time.perf_counter()
    curves = [tuple(measure(lm, task.test, ref, c.steering, c.settings) for c in method.run(lm, task, seed))
              for seed in range(method.draws)]
    seconds = round((time.perf_counter() - start) / method.draws, 3)
    best = [p for p in (best_at_kl(curve, task.tau) for curve in curves) if p is not None]
    return SteerMethodResult(_mean_point(best) if best else None, len(best), tuple(curves), seconds)


def grade_steer_task(lm: LanguageModel, task: SteerTask, methods: list[SteerMethod]) -> SteerTaskResult:
    """Every method's curve on the test split and its best point at KL ≤ ``task.tau``, with the unsteered model and
    the oracle. Methods run baselines last (so a method's seconds include the dev choices a baseline reuses) and are
    listed baselines first."""
    start = time.perf_counter()
    ref = split_reference(lm, task.test)
    unsteered = measure(lm, task.test, ref, None)
    unsteered_seconds = round(time.perf_counter() - start, 3)
    run_order = sorted(methods, key=lambda m: m.name in STEER.baselines)
    graded = {m.name: _run_steer_method(lm, task, m, ref) for m in run_order}
    oracle = None if task.oracle is None else SteerScores(**dataclasses.asdict(task.oracle))
    return SteerTaskResult(task.organism, task.name, task.goal, task.description, task.tau, dict(task.metrics),
                           unsteered, unsteered_seconds, oracle, task.oracle_note,
                           {m.name: graded[m.name] for m in methods})


def run_steer_groundtruth(*, methods: list[str] | None = None, organisms: list[str] | None = None,
                          tau: float | None = None) -> SteerRun:
    """Grade steer methods on the organisms' steer tasks (``tau``: the KL budget, default each task's own, 0.1
    nats)."""
    if tau is not None and not tau > 0:
        raise InputError("a KL budget tau > 0 (nats)", repr(tau), "use e.g. --tau 0.1")
    chosen = get_steer_methods(methods)
    tasks: list[SteerTaskResult] = []
    skipped: dict[str, str] = {}
    for _, lm, task in _organism_tasks(organisms, "steer_tasks", "no steer task", skipped):
        task = task if tau is None else dataclasses.replace(task, tau=tau)
        tasks.append(grade_steer_task(lm, task, chosen))
    return SteerRun(tuple(tasks), skipped)


# -- edit side ------------------------------------------------------------------------------------------------------
def settings_summary(values: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per setting over the cases: the value when all agree; else for ``layer`` (the layer each request was edited
    at) the count of each layer, for other numbers the mean, for anything else the count of each value."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for v in values for k in v):
        seen = [v[key] for v in values if key in v]
        numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in seen)
        if all(x == seen[0] for x in seen):
            out[key] = seen[0]
        elif numbers and key != "layer":
            out[key] = sum(seen) / len(seen)
        else:
            out[key] = {str(x): n for x, n in sorted(Counter(seen).items())}
    return out


def _edit_row(scores: list[CaseScores], settings: list[dict[str, Any]], seconds: float) -> EditRow:
    return EditRow(summarize(scores), settings_summary(settings), round(seconds, 3),
                   tuple(zip(scores, settings, strict=True)))


def _run_edit_method(lm: LanguageModel, task: EditTask, method: EditMethod, ref: Any) -> EditMethodResult | Skipped:
    reason = method.applies(task)
    if reason is not None:
        return Skipped(reason)
    scores: dict[str, list[CaseScores]] = {}
    settings: dict[str, list[dict[str, Any]]] = {}
    seconds: dict[str, float] = {}
    for case in task.cases:
        start = time.perf_counter()
        outputs = method.run(lm, task, case)
        share = (time.perf_counter() - start) / max(1, len(outputs))
        for out in outputs:
            scores.setdefault(out.row, []).append(measure_case(lm, case, ref, out.steering))
            settings.setdefault(out.row, []).append(out.settings)
            seconds[out.row] = seconds.get(out.row, 0.0) + share / len(task.cases)
    return EditMethodResult({row: _edit_row(scores[row], settings[row], seconds[row]) for row in scores})


def grade_edit_task(lm: LanguageModel, task: EditTask, methods: list[EditMethod]) -> EditTaskResult:
    """Every method's rows, next to the unedited model: means over the task's requests (and per request)."""
    ref = reference(lm, task.heldout)
    start = time.perf_counter()
    unedited = [measure_case(lm, case, ref, None) for case in task.cases]
    requests = tuple({"subject": c.request.subject, "relation": c.relation, "true_id": c.true_id,
                      "new_id": c.new_id} for c in task.cases)
    return EditTaskResult(task.organism, task.name, task.description, dict(task.metrics), task.planted_layer,
                          requests, _edit_row(unedited, [{} for _ in unedited], time.perf_counter() - start),
                          {m.name: _run_edit_method(lm, task, m, ref) for m in methods})


def run_edit_groundtruth(*, methods: list[str] | None = None, organisms: list[str] | None = None) -> EditRun:
    """Grade edit methods on the organisms' edit tasks."""
    chosen = get_edit_methods(methods)
    tasks: list[EditTaskResult] = []
    skipped: dict[str, str] = {}
    for _, lm, task in _organism_tasks(organisms, "edit_tasks", "no edit task", skipped):
        tasks.append(grade_edit_task(lm, task, chosen))
    return EditRun(tuple(tasks), skipped)


# -- every side -----------------------------------------------------------------------------------------------------
def _sides(methods: list[str] | None, kind: str) -> dict[str, list[str] | None]:
    """The sides to run and the method names each gets. With ``kind="all"`` each side takes the names registered
    on it, and a side none of the (non-empty) names belongs to is left out; an empty list runs the baselines."""
    if kind not in get_args(Kind):
        raise InputError(f"a kind in {get_args(Kind)}", repr(kind), "use --kind locate, steer, edit or all")
    if kind != "all" or methods is None:
        return {side: methods for side in (SIDES if kind == "all" else (kind,))}
    registered = {registry.side: set(registry.load()) for registry in (LOCATE, STEER, EDIT)}
    unknown = [n for n in methods if not any(n in names for names in registered.values())]
    if unknown:
        listed = ", ".join(f"{side} ones from {sorted(names)}" for side, names in registered.items())
        raise InputError(f"method names: {listed}", str(unknown),
                         "pass --methods with registered names (baselines are always included)")
    named = {side: [n for n in methods if n in names] for side, names in registered.items()}
    return {side: names for side, names in named.items() if names or not methods}


def run_benchmark(*, methods: list[str] | None = None, organisms: list[str] | None = None, kind: str = "all",
                  tau: float | None = None) -> BenchmarkRun:
    """Run the locate, steer and / or edit side (``kind``); the run names the sides that ran."""
    for name in organisms or []:
        get_organism(name)  # unknown names fail before any work
    sides = _sides(methods, kind)
    return BenchmarkRun(
        tuple(sides),
        locate=run_groundtruth(methods=sides["locate"], organisms=organisms) if "locate" in sides else None,
        steer=run_steer_groundtruth(methods=sides["steer"], organisms=organisms, tau=tau) if "steer" in sides else None,
        edit=run_edit_groundtruth(methods=sides["edit"], organisms=organisms) if "edit" in sides else None)
