"""The ground-truth benchmark: every registered locate method on every organism task it applies to.

Scores are graded against the planted components with precision@|G| (R-precision), AUROC, average precision and
the Spearman correlation with the oracle's scores. For tasks whose truth is the least important components
(redundant layers), every method's scores are negated before grading.

Example:
    >>> result = run_groundtruth(methods=[], organisms=["layer_redundancy"])  # doctest: +SKIP
    >>> result["tasks"][0]["methods"]["oracle"]["auroc"]  # doctest: +SKIP
    1.0
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from lsi.bench import metrics
from lsi.bench.registry import LocateMethod, Scores, get_locate_methods
from lsi.bench.tasks import LocateTask

SCHEMA_VERSION = 1
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


def _run_method(lm: Any, task: LocateTask, method: LocateMethod, oracle: Scores) -> dict[str, Any]:
    reason = method.applies(task)
    if reason is not None:
        return {"skipped": reason}
    start = time.perf_counter()
    graded = [_grade(method.run(lm, task, seed), oracle, task) for seed in range(method.draws)]
    out: dict[str, Any] = {k: sum(g[k] for g in graded) / len(graded) for k in _GRADES}
    out["seconds"] = round((time.perf_counter() - start) / method.draws, 3)
    return out


def run_groundtruth(*, methods: list[str] | None = None, organisms: list[str] | None = None) -> dict[str, Any]:
    """Grade locate methods on the organisms' locate tasks; returns the result as JSON-ready data."""
    from lsi.organisms.registry import ORGANISMS, get_organism, ground_truth, load_organism

    chosen = get_locate_methods(methods)
    names = list(ORGANISMS) if organisms is None else organisms
    result: dict[str, Any] = {"schema": SCHEMA_VERSION, "tasks": [], "skipped_organisms": {}}
    for name in names:
        organism = get_organism(name)
        if organism.locate_tasks is None:
            result["skipped_organisms"][name] = "no locate task: its ground truth grades steer methods or SAEs"
            continue
        lm = load_organism(name)
        for task in organism.locate_tasks(lm, ground_truth(name)):
            oracle = chosen[0].run(lm, task, 0)  # get_locate_methods puts the oracle first
            result["tasks"].append({
                "organism": name, "task": task.name, "description": task.description,
                "universe_size": len(task.universe), "planted": sorted(task.planted),
                "planted_are_least_important": task.planted_are_least_important,
                "oracle_scores": oracle, "oracle_margin": oracle_margin(oracle, task),
                "methods": {m.name: _run_method(lm, task, m, oracle) for m in chosen},
            })
    return result


def write_json(result: dict[str, Any], path: str | Path) -> None:
    """Write atomically (a temporary file, then a rename)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, target)


def render_table(result: dict[str, Any]) -> str:
    """A plain-text table: a header line per task, then one row per method (skipped methods last, one line)."""
    width = max([12, *(len(m) for task in result["tasks"] for m in task["methods"])])
    head = f"    {'method':<{width}} {'P@|G|':>6} {'AUROC':>6} {'AP':>6} {'rho':>6} {'s':>7}"
    lines = [head, "-" * len(head)]
    for task in result["tasks"]:
        lines.append(f"{task['organism']} / {task['task']}: |U|={task['universe_size']}, |G|={len(task['planted'])}, "
                     f"oracle margin {task['oracle_margin']:+.3f}")
        skipped: dict[str, list[str]] = {}
        for method, grades in task["methods"].items():
            if "skipped" in grades:
                skipped.setdefault(grades["skipped"], []).append(method)
            else:
                lines.append(f"    {method:<{width}} {grades['r_precision']:>6.3f} {grades['auroc']:>6.3f} "
                             f"{grades['average_precision']:>6.3f} {grades['spearman_vs_oracle']:>6.3f} "
                             f"{grades['seconds']:>7.2f}")
        lines.extend(f"    skipped ({reason}): {', '.join(methods)}" for reason, methods in skipped.items())
    for name, reason in result["skipped_organisms"].items():
        lines.append(f"{name}: skipped ({reason})")
    return "\n".join(lines)
