"""Plain-text rendering of typed records: the ground-truth benchmark's tables, a locate result's top objects and
a steer selection's success-vs-KL curve.

Example:
    >>> from lsi.bench.records import LocateRun
    >>> print(locate_table(LocateRun(tasks=(), skipped_organisms={"toy": "no locate task"})))
        method        P@|G|  AUROC     AP    rho       s
    ----------------------------------------------------
    toy: skipped (no locate task)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from lsi.bench.records import (
    BenchmarkRun,
    EditRow,
    EditRun,
    LocateGrades,
    LocateRun,
    Skipped,
    SteerMethodResult,
    SteerRun,
)
from lsi.locate.result import By, LocateResult
from lsi.steer.selection import Selection

Runs = LocateRun | SteerRun | EditRun


def render(run: BenchmarkRun) -> str:
    """The locate, steer and edit tables of a benchmark run (whichever sides ran)."""
    parts = []
    if run.locate is not None:
        parts.append(locate_table(run.locate))
    if run.steer is not None:
        parts.append(steer_table(run.steer))
    if run.edit is not None:
        parts.append(edit_table(run.edit))
    return "\n\n".join(parts)


# -- shared pieces --------------------------------------------------------------------------------------------------
def _graded(methods: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``(method, result)`` of every method that was not skipped."""
    return [(name, result) for name, result in methods.items() if not isinstance(result, Skipped)]


def _skipped_lines(methods: Mapping[str, Any]) -> list[str]:
    """One table line per reason, naming the methods skipped for it."""
    skipped: dict[str, list[str]] = {}
    for name, result in methods.items():
        if isinstance(result, Skipped):
            skipped.setdefault(result.reason, []).append(name)
    return [f"    skipped ({reason}): {', '.join(names)}" for reason, names in skipped.items()]


def _skipped_organisms(run: Runs) -> list[str]:
    return [f"{name}: skipped ({reason})" for name, reason in run.skipped_organisms.items()]


def settings_text(settings: Mapping[str, Any], *, leave_out: tuple[str, ...] = ()) -> str:
    """``key=value, ...`` for a table row (floats to 6 significant digits).

    Example:
        >>> settings_text({"layer": 2, "alpha": 0.1234567, "norm": 3.0}, leave_out=("norm",))
        'layer=2, alpha=0.123457'
    """
    def text(value: Any) -> str:
        return format(value, ".6g") if isinstance(value, float) else str(value)

    return ", ".join(f"{k}={text(v)}" for k, v in settings.items() if k not in leave_out)


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


# -- locate side ----------------------------------------------------------------------------------------------------
def locate_table(run: LocateRun) -> str:
    """A header line per task, then one row per method (skipped methods last, one line per reason)."""
    width = max([12, *(len(m) for task in run.tasks for m in task.methods)])
    head = f"    {'method':<{width}} {'P@|G|':>6} {'AUROC':>6} {'AP':>6} {'rho':>6} {'s':>7}"
    lines = [head, "-" * len(head)]
    for task in run.tasks:
        lines.append(f"{task.organism} / {task.task}: |U|={task.universe_size}, |G|={len(task.planted)}, "
                     f"oracle margin {task.oracle_margin:+.3f}")
        for method, grades in _graded(task.methods):
            lines.append(_locate_row(method, grades, width))
            if grades.extras is not None and "faithfulness" in grades.extras:
                lines.append(f"      {_curve_line(grades.extras['faithfulness'])}")
        lines.extend(_skipped_lines(task.methods))
    lines.extend(_skipped_organisms(run))
    return "\n".join(lines)


def _locate_row(method: str, grades: LocateGrades, width: int) -> str:
    return (f"    {method:<{width}} {grades.r_precision:>6.3f} {grades.auroc:>6.3f} {grades.average_precision:>6.3f} "
            f"{grades.spearman_vs_oracle:>6.3f} {grades.seconds:>7.2f}")


def _curve_line(curve: Mapping[str, Any]) -> str:
    points = " ".join(f"{f:g}%:{v:.2f}" for f, v in zip(curve["percent_of_edges"], curve["values"], strict=True))
    return f"faithfulness of the top edges (area {curve['area']:.3f}): {points}"


# -- steer side -----------------------------------------------------------------------------------------------------
def _steer_row(name: str, point: Mapping[str, Any], seconds: float, width: int) -> str:
    at = settings_text(point["settings"], leave_out=("norm",))
    return (f"    {name:<{width}} {_cell(point['success'], '.3f'):>7} {_cell(point['generalization'], '.3f'):>7} "
            f"{_cell(point['specificity'], '.3f'):>7} {_cell(point['fluency'], '.3f'):>7} "
            f"{_cell(point['kl'], '.4f'):>7} {_cell(point['dloss'], '+.4f'):>8} {seconds:>6.2f}  {at}").rstrip()


def steer_table(run: SteerRun) -> str:
    """A block per steer task: what each column measures, then the unsteered model, the oracle, and one row per
    method at its best point within the KL budget (skipped methods last, one line per reason)."""
    width = max([22, *(len(m) for task in run.tasks for m in task.methods)])
    head = (f"    {'method':<{width}} {'success':>7} {'general':>7} {'specif':>7} {'fluency':>7} {'KL':>7} "
            f"{'dloss':>8} {'s':>6}  at")
    lines = [head, "-" * len(head)]
    for task in run.tasks:
        lines.append(f"{task.organism} / {task.task} ({task.goal}): best success at KL <= {task.tau:g} "
                     f"nats on the test split")
        lines.extend(f"      {key}: {text}" for key, text in task.metrics.items())
        lines.append(_steer_row("unsteered", task.unsteered.to_json(), task.unsteered_seconds, width))
        if task.oracle is None:
            lines.append(f"    {'oracle':<{width}} {task.oracle_note}")
        else:
            oracle = {**asdict(task.oracle), "kl": None, "dloss": None, "settings": {}}
            lines.append(_steer_row("oracle", oracle, 0.0, width))
            lines.append(f"      oracle: {task.oracle_note}")
        for method, graded in _graded(task.methods):
            lines.append(_steer_method_row(method, graded, task.tau, width))
        lines.extend(_skipped_lines(task.methods))
    lines.extend(_skipped_organisms(run))
    return "\n".join(lines)


def _steer_method_row(method: str, graded: SteerMethodResult, tau: float, width: int) -> str:
    if graded.best is None:
        return f"    {method:<{width}} no candidate within KL <= {tau:g}"
    return _steer_row(method, graded.best.to_json(), graded.seconds, width)


# -- edit side ------------------------------------------------------------------------------------------------------
def _edit_line(name: str, row: EditRow, width: int) -> str:
    m = row.means
    return (f"    {name:<{width}} {m['efficacy']:>6.3f} {m['paraphrase']:>6.3f} {m['neighbourhood']:>6.3f} "
            f"{m['score']:>6.3f} {m['preservation']:>7.3f} {m['kl']:>7.4f} {m['dloss']:>+8.4f} "
            f"{row.seconds:>6.2f}  {settings_text(row.settings)}").rstrip()


def edit_table(run: EditRun) -> str:
    """A block per edit task: what each column measures, the unedited model, then one row per method row (means
    over the requests; skipped methods last, one line per reason)."""
    names = [row for task in run.tasks for _, m in _graded(task.methods) for row in m.rows]
    width = max([16, *(len(n) for n in names)])
    head = (f"    {'method':<{width}} {'ES':>6} {'PS':>6} {'NS':>6} {'S':>6} {'preserv':>7} {'KL':>7} {'dloss':>8} "
            f"{'s':>6}  settings")
    lines = [head, "-" * len(head)]
    for task in run.tasks:
        planted = "" if task.planted_layer is None else f", planted layer {task.planted_layer}"
        lines.append(f"{task.organism} / {task.task}: means over {len(task.requests)} requests{planted}")
        lines.extend(f"      {key}: {text}" for key, text in task.metrics.items())
        lines.append(_edit_line("unedited", task.unedited, width))
        for _, graded in _graded(task.methods):
            lines.extend(_edit_line(row, values, width) for row, values in graded.rows.items())
        lines.extend(_skipped_lines(task.methods))
    lines.extend(_skipped_organisms(run))
    return "\n".join(lines)


# -- library results ------------------------------------------------------------------------------------------------
def locate_result(result: LocateResult, *, k: int = 10, by: By = "abs") -> str:
    """The method, metric and axes of a locate result, then its ``k`` top objects (by ``|score|`` by default).

    Example:
        >>> print(locate_result(LocateResult.over(["a", "b"], [0.5, -2.0], method="demo", metric="m"), k=2))
        demo on m: object[2]
          1. b  -2
          2. a  0.5
    """
    dims = " × ".join(f"{name}[{len(labels)}]" for name, labels in result.axes)
    top = result.top(k, by=by)
    width = max((len(label) for label, _ in top), default=0)
    lines = [f"{result.method} on {result.metric or 'no metric'}: {dims}"]
    lines.extend(f"  {i}. {label:<{width}}  {score:.4g}" for i, (label, score) in enumerate(top, start=1))
    return "\n".join(lines)


def selection_curve(selection: Selection) -> str:
    """One row per measured candidate of a selection (settings, success, KL, Δloss), the chosen one marked ``*``
    and the ones beyond the KL budget ``-``; then the candidates skipped by early stopping."""
    best = selection.best
    lines = [f"{'':2}{'success':>9} {'KL':>9} {'dloss':>9}  settings (KL budget {selection.tau:g})"]
    for point in selection.curve:
        mark = "*" if point is best else "-" if point.kl > selection.tau else " "
        lines.append(f"{mark:2}{point.success:>9.4g} {point.kl:>9.4g} {point.dloss:>+9.4g}  "
                     f"{settings_text(point.settings)}")
    lines.extend(f"{'':2}{'skipped':>9}  {settings_text(s)}" for s in selection.skipped)
    return "\n".join(lines)
