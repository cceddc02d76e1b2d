"""The ground-truth benchmark: every registered locate, steer and edit method on every organism task it applies to.

Locate: scores are graded against the planted components with precision@|G| (R-precision), AUROC, average
precision and the Spearman correlation with the oracle's scores. For tasks whose truth is the least important
components (redundant layers), every method's scores are negated before grading.

Steer: every candidate steering a method proposes is measured on the task's test split (exact success,
generalization, specificity, fluency; KL(base ‖ steered) and Δ cross-entropy on a held-out corpus), giving a
success-vs-KL curve; the grade is the best target success at KL ≤ τ with the other metrics at that point, next to
the unsteered model, the task's oracle (or why it has none) and a random direction of equal norm.

Edit: every knowledge-edit method rewrites each request of the task (one or more rows per method, e.g. one per
layer) and is graded CounterFact-style by its means over the requests (:mod:`lsi.bench.edit_tasks`): efficacy,
paraphrase, neighbourhood, ``S`` = their harmonic mean, preservation of the subject's other facts, KL(base ‖ edited)
and Δ cross-entropy on held-out text, next to the unedited model.

:func:`run_benchmark` runs every side (``kind="all"``) or one; its JSON keeps the locate result at the top level
and adds the steer result under ``"steer"`` and the edit result under ``"edit"``.

Example:
    >>> result = run_groundtruth(methods=[], organisms=["layer_redundancy"])  # doctest: +SKIP
    >>> result["tasks"][0]["methods"]["oracle"]["auroc"]  # doctest: +SKIP
    1.0
    >>> steer = run_steer_groundtruth(methods=["directional_ablation"], organisms=["refusal_gate"])  # doctest: +SKIP
    >>> steer["tasks"][0]["methods"]["directional_ablation"]["best"]["success"]  # doctest: +SKIP
    1.0
    >>> edit = run_edit_groundtruth(methods=["rome"], organisms=["fact_world"])  # doctest: +SKIP
    >>> edit["tasks"][0]["methods"]["rome"]["rows"]["rome"]["efficacy"]  # doctest: +SKIP
    0.984375
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from lsi.bench import metrics
from lsi.bench.edit_methods import EDIT, EditMethod, get_edit_methods
from lsi.bench.edit_tasks import CaseScores, EditTask, measure_case, summarize
from lsi.bench.registry import LOCATE, LocateMethod, MethodOutput, Scores, get_locate_methods
from lsi.bench.steer_registry import STEER, SteerMethod, get_steer_methods
from lsi.bench.steer_tasks import Point, SteerTask, measure, split_reference
from lsi.bench.tasks import LocateTask
from lsi.core.bundle import write_json_atomic
from lsi.errors import InputError
from lsi.steer.selection import best_at_kl, reference

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel

SCHEMA_VERSION = 3  # 2: the steer side (under "steer" in run_benchmark's result); 3: the edit side (under "edit")
Kind = Literal["locate", "steer", "edit", "all"]
SIDES = ("locate", "steer", "edit")
_GRADES = ("r_precision", "auroc", "average_precision", "spearman_vs_oracle")


def _grade(scores: Scores, oracle: Scores, task: LocateTask) -> dict[str, float]:
    sign = -1.0 if task.planted_are_least_important else 1.0
    signed = {u: sign * s for u, s in scores.items()}
    truth = set(task.planted)
    return {"r_precision": metrics.r_precision(signed, truth), "auroc": metrics.auroc_of(signed, truth),
            "average_precision": metrics.average_precision(signed, truth),
            "spearman_vs_oracle": metrics.spearman(scores, oracle)}


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


def _graded(draws: Draws, seconds: float, oracle: Scores, task: LocateTask) -> dict[str, Any]:
    graded = [_grade(_scores(o), oracle, task) for o in draws]
    out: dict[str, Any] = {k: sum(g[k] for g in graded) / len(graded) for k in _GRADES}
    out["seconds"] = seconds
    if isinstance(draws[0], MethodOutput):
        out["extras"] = draws[0].extras
    return out


def _run_method(lm: LanguageModel, task: LocateTask, method: LocateMethod, oracle: Scores) -> dict[str, Any]:
    reason = method.applies(task)
    return {"skipped": reason} if reason is not None else _graded(*_timed_run(lm, task, method), oracle, task)


def run_groundtruth(*, methods: list[str] | None = None, organisms: list[str] | None = None) -> dict[str, Any]:
    """Grade locate methods on the organisms' locate tasks; returns the result as JSON-ready data."""
    oracle_method, *others = get_locate_methods(methods)  # the oracle first: run once, graded like the others
    result: dict[str, Any] = {"schema": SCHEMA_VERSION, "tasks": [], "skipped_organisms": {}}
    skip = "no locate task: its ground truth grades steer methods or SAEs"
    for name, lm, task in _organism_tasks(organisms, "locate_tasks", skip, result["skipped_organisms"]):
        oracle_draws, oracle_seconds = _timed_run(lm, task, oracle_method)
        oracle = _scores(oracle_draws[0])
        result["tasks"].append({
            "organism": name, "task": task.name, "description": task.description,
            "universe_size": len(task.universe), "planted": sorted(task.planted),
            "planted_are_least_important": task.planted_are_least_important,
            "oracle_scores": oracle, "oracle_margin": oracle_margin(oracle, task),
            "methods": {oracle_method.name: _graded(oracle_draws, oracle_seconds, oracle, task),
                        **{m.name: _run_method(lm, task, m, oracle) for m in others}},
        })
    return result


def _organism_tasks(organisms: list[str] | None, field: str, skip: str,
                    skipped: dict[str, str]) -> Iterator[tuple[str, Any, Any]]:
    """``(organism, model, task)`` for every task the organisms declare in ``field`` (``"locate_tasks"``,
    ``"steer_tasks"`` or ``"edit_tasks"``); organisms that declare none are recorded in ``skipped`` with the reason
    ``skip``."""
    from lsi.organisms.registry import ORGANISMS, get_organism, ground_truth, load_organism

    for name in list(ORGANISMS) if organisms is None else organisms:
        make_tasks = getattr(get_organism(name), field)
        if make_tasks is None:
            skipped[name] = skip
            continue
        lm = load_organism(name)
        for task in make_tasks(lm, ground_truth(name)):
            yield name, lm, task


def write_json(result: dict[str, Any], path: str | Path) -> None:
    """Write atomically (a temporary file, then a rename)."""
    write_json_atomic(path, result)


def render_table(result: dict[str, Any]) -> str:
    """A plain-text table: a header line per task, then one row per method (skipped methods last, one line)."""
    width = max([12, *(len(m) for task in result["tasks"] for m in task["methods"])])
    head = f"    {'method':<{width}} {'P@|G|':>6} {'AUROC':>6} {'AP':>6} {'rho':>6} {'s':>7}"
    lines = [head, "-" * len(head)]
    for task in result["tasks"]:
        lines.append(f"{task['organism']} / {task['task']}: |U|={task['universe_size']}, |G|={len(task['planted'])}, "
                     f"oracle margin {task['oracle_margin']:+.3f}")
        for method, grades in _graded_methods(task):
            lines.append(f"    {method:<{width}} {grades['r_precision']:>6.3f} {grades['auroc']:>6.3f} "
                         f"{grades['average_precision']:>6.3f} {grades['spearman_vs_oracle']:>6.3f} "
                         f"{grades['seconds']:>7.2f}")
            if "faithfulness" in grades.get("extras", {}):
                lines.append(f"      {_curve_line(grades['extras']['faithfulness'])}")
        lines.extend(_skipped_lines(task))
    lines.extend(_skipped_organisms(result))
    return "\n".join(lines)


def _graded_methods(task: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(method, result)`` of every method of a task's result that was not skipped."""
    return [(method, graded) for method, graded in task["methods"].items() if "skipped" not in graded]


def _skipped_lines(task: dict[str, Any]) -> list[str]:
    """One table line per reason, naming the methods of a task's result skipped for it."""
    skipped: dict[str, list[str]] = {}
    for method, graded in task["methods"].items():
        if "skipped" in graded:
            skipped.setdefault(graded["skipped"], []).append(method)
    return [f"    skipped ({reason}): {', '.join(methods)}" for reason, methods in skipped.items()]


def _skipped_organisms(result: dict[str, Any]) -> list[str]:
    return [f"{name}: skipped ({reason})" for name, reason in result["skipped_organisms"].items()]


def _settings_text(settings: dict[str, Any], *, leave_out: tuple[str, ...] = ()) -> str:
    """``key=value, ...`` for a table row (floats to 6 significant digits)."""
    def text(value: Any) -> str:
        return format(value, ".6g") if isinstance(value, float) else str(value)

    return ", ".join(f"{k}={text(v)}" for k, v in settings.items() if k not in leave_out)


# -- steer side -----------------------------------------------------------------------------------------------------
def _mean_point(points: list[Point]) -> dict[str, Any]:
    """A point as JSON, or the mean of several draws' points (a metric is ``None`` if any draw lacks it)."""
    if len(points) == 1:
        return points[0].as_dict()
    rows = [p.as_dict() for p in points]
    mean = {k: None if any(r[k] is None for r in rows) else sum(r[k] for r in rows) / len(rows)
            for k in rows[0] if k != "settings"}
    return {"settings": {"mean_of_draws": len(rows)}, **mean}


def _run_steer_method(lm: LanguageModel, task: SteerTask, method: SteerMethod, ref: Any) -> dict[str, Any]:
    reason = method.applies(task)
    if reason is not None:
        return {"skipped": reason}
    start = time.perf_counter()
    curves = [[measure(lm, task.test, ref, c.steering, c.settings) for c in method.run(lm, task, seed)]
              for seed in range(method.draws)]
    seconds = round((time.perf_counter() - start) / method.draws, 3)
    best = [p for p in (best_at_kl(curve, task.tau) for curve in curves) if p is not None]
    return {"best": _mean_point(best) if best else None, "draws_within_budget": len(best),
            "curves": [[p.as_dict() for p in curve] for curve in curves], "seconds": seconds}


def grade_steer_task(lm: LanguageModel, task: SteerTask, methods: list[SteerMethod]) -> dict[str, Any]:
    """Every method's curve on the test split and its best point at KL ≤ ``task.tau``, with the unsteered model and
    the oracle. Methods run baselines last (so a method's seconds include the dev choices a baseline reuses) and are
    listed baselines first."""
    start = time.perf_counter()
    ref = split_reference(lm, task.test)
    unsteered = measure(lm, task.test, ref, None).as_dict()
    unsteered["seconds"] = round(time.perf_counter() - start, 3)
    run_order = sorted(methods, key=lambda m: m.name in STEER.baselines)
    graded = {m.name: _run_steer_method(lm, task, m, ref) for m in run_order}
    return {"organism": task.organism, "task": task.name, "goal": task.goal, "description": task.description,
            "tau": task.tau, "metrics": dict(task.metrics), "unsteered": unsteered,
            "oracle": None if task.oracle is None else asdict(task.oracle), "oracle_note": task.oracle_note,
            "methods": {m.name: graded[m.name] for m in methods}}


def run_steer_groundtruth(*, methods: list[str] | None = None, organisms: list[str] | None = None,
                          tau: float | None = None) -> dict[str, Any]:
    """Grade steer methods on the organisms' steer tasks (``tau``: the KL budget, default each task's own, 0.1
    nats); returns the result as JSON-ready data."""
    if tau is not None and not tau > 0:
        raise InputError("a KL budget tau > 0 (nats)", repr(tau), "use e.g. --tau 0.1")
    chosen = get_steer_methods(methods)
    result: dict[str, Any] = {"schema": SCHEMA_VERSION, "tasks": [], "skipped_organisms": {}}
    for _, lm, task in _organism_tasks(organisms, "steer_tasks", "no steer task", result["skipped_organisms"]):
        task = task if tau is None else dataclasses.replace(task, tau=tau)
        result["tasks"].append(grade_steer_task(lm, task, chosen))
    return result


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _steer_row(name: str, point: dict[str, Any], seconds: float, width: int) -> str:
    at = _settings_text(point["settings"], leave_out=("norm",))
    return (f"    {name:<{width}} {_cell(point['success'], '.3f'):>7} {_cell(point['generalization'], '.3f'):>7} "
            f"{_cell(point['specificity'], '.3f'):>7} {_cell(point['fluency'], '.3f'):>7} "
            f"{_cell(point['kl'], '.4f'):>7} {_cell(point['dloss'], '+.4f'):>8} {seconds:>6.2f}  {at}").rstrip()


def render_steer_table(result: dict[str, Any]) -> str:
    """A block per steer task: what each column measures, then the unsteered model, the oracle, and one row per
    method at its best point within the KL budget (skipped methods last, one line per reason)."""
    width = max([22, *(len(m) for task in result["tasks"] for m in task["methods"])])
    head = (f"    {'method':<{width}} {'success':>7} {'general':>7} {'specif':>7} {'fluency':>7} {'KL':>7} "
            f"{'dloss':>8} {'s':>6}  at")
    lines = [head, "-" * len(head)]
    for task in result["tasks"]:
        lines.append(f"{task['organism']} / {task['task']} ({task['goal']}): best success at KL <= {task['tau']:g} "
                     f"nats on the test split")
        lines.extend(f"      {key}: {text}" for key, text in task["metrics"].items())
        lines.append(_steer_row("unsteered", task["unsteered"], task["unsteered"]["seconds"], width))
        oracle = task["oracle"]
        if oracle is None:
            lines.append(f"    {'oracle':<{width}} {task['oracle_note']}")
        else:
            lines.append(_steer_row("oracle", {**oracle, "kl": None, "dloss": None, "settings": {}}, 0.0, width))
            lines.append(f"      oracle: {task['oracle_note']}")
        for method, graded in _graded_methods(task):
            if graded["best"] is None:
                lines.append(f"    {method:<{width}} no candidate within KL <= {task['tau']:g}")
            else:
                lines.append(_steer_row(method, graded["best"], graded["seconds"], width))
        lines.extend(_skipped_lines(task))
    lines.extend(_skipped_organisms(result))
    return "\n".join(lines)


# -- edit side ------------------------------------------------------------------------------------------------------
def _settings_summary(values: Sequence[dict[str, Any]]) -> dict[str, Any]:
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


def _edit_row(scores: list[CaseScores], settings: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    return {**summarize(scores), "settings": _settings_summary(settings), "seconds": round(seconds, 3),
            "per_case": [{**dataclasses.asdict(s), **extra} for s, extra in zip(scores, settings, strict=True)]}


def _run_edit_method(lm: LanguageModel, task: EditTask, method: EditMethod, ref: Any) -> dict[str, Any]:
    reason = method.applies(task)
    if reason is not None:
        return {"skipped": reason}
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
    return {"rows": {row: _edit_row(scores[row], settings[row], seconds[row]) for row in scores}}


def grade_edit_task(lm: LanguageModel, task: EditTask, methods: list[EditMethod]) -> dict[str, Any]:
    """Every method's rows, next to the unedited model: means over the task's requests (and per request)."""
    ref = reference(lm, task.heldout)
    start = time.perf_counter()
    unedited = [measure_case(lm, case, ref, None) for case in task.cases]
    return {"organism": task.organism, "task": task.name, "description": task.description,
            "metrics": dict(task.metrics), "planted_layer": task.planted_layer,
            "requests": [{"subject": c.request.subject, "relation": c.relation, "true_id": c.true_id,
                          "new_id": c.new_id} for c in task.cases],
            "unedited": _edit_row(unedited, [{} for _ in unedited], time.perf_counter() - start),
            "methods": {m.name: _run_edit_method(lm, task, m, ref) for m in methods}}


def run_edit_groundtruth(*, methods: list[str] | None = None, organisms: list[str] | None = None) -> dict[str, Any]:
    """Grade edit methods on the organisms' edit tasks; returns the result as JSON-ready data."""
    chosen = get_edit_methods(methods)
    result: dict[str, Any] = {"schema": SCHEMA_VERSION, "tasks": [], "skipped_organisms": {}}
    for _, lm, task in _organism_tasks(organisms, "edit_tasks", "no edit task", result["skipped_organisms"]):
        result["tasks"].append(grade_edit_task(lm, task, chosen))
    return result


def _edit_line(name: str, row: dict[str, Any], width: int) -> str:
    at = _settings_text(row["settings"])
    return (f"    {name:<{width}} {row['efficacy']:>6.3f} {row['paraphrase']:>6.3f} {row['neighbourhood']:>6.3f} "
            f"{row['score']:>6.3f} {row['preservation']:>7.3f} {row['kl']:>7.4f} {row['dloss']:>+8.4f} "
            f"{row['seconds']:>6.2f}  {at}").rstrip()


def render_edit_table(result: dict[str, Any]) -> str:
    """A block per edit task: what each column measures, the unedited model, then one row per method row (means
    over the requests; skipped methods last, one line per reason)."""
    names = [row for task in result["tasks"] for m in task["methods"].values() for row in m.get("rows", {})]
    width = max([16, *(len(n) for n in names)])
    head = (f"    {'method':<{width}} {'ES':>6} {'PS':>6} {'NS':>6} {'S':>6} {'preserv':>7} {'KL':>7} {'dloss':>8} "
            f"{'s':>6}  settings")
    lines = [head, "-" * len(head)]
    for task in result["tasks"]:
        planted = "" if task["planted_layer"] is None else f", planted layer {task['planted_layer']}"
        lines.append(f"{task['organism']} / {task['task']}: means over {len(task['requests'])} requests{planted}")
        lines.extend(f"      {key}: {text}" for key, text in task["metrics"].items())
        lines.append(_edit_line("unedited", task["unedited"], width))
        for _, graded in _graded_methods(task):
            lines.extend(_edit_line(row, values, width) for row, values in graded["rows"].items())
        lines.extend(_skipped_lines(task))
    lines.extend(_skipped_organisms(result))
    return "\n".join(lines)


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
                  tau: float | None = None) -> dict[str, Any]:
    """Run the locate, steer and / or edit side (``kind``): the locate result's keys at the top level, the steer
    result under ``"steer"``, the edit result under ``"edit"``, and ``"kinds"`` naming the sides that ran."""
    from lsi.organisms.registry import get_organism

    for name in organisms or []:
        get_organism(name)  # unknown names fail before any work
    sides = _sides(methods, kind)
    result: dict[str, Any] = {"schema": SCHEMA_VERSION, "kinds": list(sides)}
    if "locate" in sides:
        result.update(run_groundtruth(methods=sides["locate"], organisms=organisms))
    if "steer" in sides:
        result["steer"] = run_steer_groundtruth(methods=sides["steer"], organisms=organisms, tau=tau)
    if "edit" in sides:
        result["edit"] = run_edit_groundtruth(methods=sides["edit"], organisms=organisms)
    return result


def render(result: dict[str, Any]) -> str:
    """The locate, steer and edit tables of a :func:`run_benchmark` result (whichever ran)."""
    parts = []
    if "locate" in result["kinds"]:
        parts.append(render_table(result))
    if "steer" in result["kinds"]:
        parts.append(render_steer_table(result["steer"]))
    if "edit" in result["kinds"]:
        parts.append(render_edit_table(result["edit"]))
    return "\n\n".join(parts)


def _curve_line(curve: dict[str, Any]) -> str:
    points = " ".join(f"{f:g}%:{v:.2f}" for f, v in zip(curve["percent_of_edges"], curve["values"], strict=True))
    return f"faithfulness of the top edges (area {curve['area']:.3f}): {points}"
