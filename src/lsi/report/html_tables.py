"""HTML tables of a run directory: key-value tables (manifest), the metric table (variants × metrics grouped, each
value with its interval, coloured better / worse than the unsteered row), steps, generations and export checksums.
Every piece of text is escaped.

Example:
    >>> number(0.98765), number(123456.0), number(7), number(None)
    ('0.9877', '123,456', '7', '—')
    >>> print(kv_table({"seed": 0, "note": "<b>"}))
    <table class="kv"><tr><th>seed</th><td>0</td></tr><tr><th>note</th><td>&lt;b&gt;</td></tr></table>
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from lsi.report.run_files import GROUPS, REFERENCE_VARIANT

MISSING = "—"


def number(value: float | None) -> str:
    """A measured number for a table cell (4 significant digits; large values in full; ``None`` as —)."""
    if value is None:
        return MISSING
    if isinstance(value, int):
        return f"{value:,}"
    if math.isfinite(value) and abs(value) >= 1e4:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def _value_html(value: Any) -> str:
    if value is None:
        return MISSING
    if isinstance(value, (dict, list)):
        return f"<code>{escape(json.dumps(value))}</code>"
    if isinstance(value, float):
        return number(value)
    return escape(str(value))


def kv_table(mapping: Mapping[str, Any], *, code: bool = False) -> str:
    """A two-column table, one row per key (objects and arrays as JSON; ``code``: every value in ``<code>``)."""
    def cell(value: Any) -> str:
        return f"<code>{escape(str(value))}</code>" if code else _value_html(value)

    rows = "".join(f"<tr><th>{escape(str(k))}</th><td>{cell(v)}</td></tr>" for k, v in mapping.items())
    return f'<table class="kv">{rows}</table>'


def steps_table(steps: Sequence[Mapping[str, Any]]) -> str:
    """The recipe's steps with their status and seconds, and the total."""
    rows = "".join(f'<tr class="{escape(s["status"])}"><td>{escape(s["name"])}</td><td>{escape(s["status"])}</td>'
                   f'<td class="num">{number(s["seconds"])}</td></tr>' for s in steps)
    total = sum(s["seconds"] or 0.0 for s in steps)
    return (f'<table class="steps"><tr><th>step</th><th>status</th><th>seconds</th></tr>{rows}'
            f'<tr class="total"><td>total</td><td></td><td class="num">{number(float(total))}</td></tr></table>')


def ordered_metrics(metrics: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The metrics grouped in the report's group order (their own order within a group)."""
    return sorted(metrics, key=lambda m: GROUPS.index(m["group"]))


def metric_table(results: Sequence[tuple[str | None, Mapping[str, Any]]], metrics: Sequence[Mapping[str, Any]]) -> str:
    """Rows = the variants of each ``(run name, result)`` (a run column when names are given), columns = ``metrics``
    under their groups. Each value shows its interval; its colour says whether it is better or worse than the
    run's unsteered row (pale when the interval contains the unsteered value)."""
    metrics = ordered_metrics(metrics)
    named = any(name is not None for name, _ in results)
    groups: list[tuple[str, int]] = []
    for metric in metrics:
        if groups and groups[-1][0] == metric["group"]:
            groups[-1] = (metric["group"], groups[-1][1] + 1)
        else:
            groups.append((metric["group"], 1))
    lead = '<th rowspan="2">run</th>' if named else ""
    head = (f'<tr>{lead}<th rowspan="2">variant</th>'
            + "".join(f'<th colspan="{n}" class="group">{escape(g)}</th>' for g, n in groups) + "</tr><tr>"
            + "".join(_metric_head(m) for m in metrics) + "</tr>")
    body = []
    for name, result in results:
        reference = next((r for r in result["rows"] if r["variant"] == REFERENCE_VARIANT), None)
        for i, row in enumerate(result["rows"]):
            run_cell = (f'<th rowspan="{len(result["rows"])}" class="run-name">{escape(name)}</th>'
                        if name is not None and i == 0 else "")
            cells = "".join(_metric_cell(row, reference, m) for m in metrics)
            body.append(f"<tr>{run_cell}{_variant_cell(row, result['chosen'])}{cells}</tr>")
    return f'<table class="metrics"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'


def _metric_head(metric: Mapping[str, Any]) -> str:
    arrow = "↑" if metric["higher_is_better"] else "↓"
    return f'<th title="{escape(metric["description"])}">{escape(metric["label"])} {arrow}</th>'


def _variant_cell(row: Mapping[str, Any], chosen: str | None) -> str:
    star = ' <span class="chosen" title="the chosen variant">★</span>' if row["variant"] == chosen else ""
    return (f'<td class="variant" title="{escape(row["description"])}">{escape(row["variant"])}{star} '
            f'<span class="kind {escape(row["kind"])}">{escape(row["kind"])}</span></td>')


def _metric_cell(row: Mapping[str, Any], reference: Mapping[str, Any] | None, metric: Mapping[str, Any]) -> str:
    entry = row["values"].get(metric["key"])
    if entry is None or entry["value"] is None:
        return f'<td class="num na">{MISSING}</td>'
    low, high = entry["low"], entry["high"]
    interval = "" if low is None and high is None else f' <span class="ci">[{number(low)}, {number(high)}]</span>'
    title = "" if entry["n"] is None else f' title="n = {entry["n"]}"'
    verdict = "" if reference is None or reference is row else compare(entry, reference["values"].get(metric["key"]),
                                                                        higher_is_better=metric["higher_is_better"])
    return f'<td class="num {verdict}"{title}>{number(entry["value"])}{interval}</td>'


def compare(entry: Mapping[str, Any], reference: Mapping[str, Any] | None, *, higher_is_better: bool) -> str:
    """``"better"`` / ``"worse"`` than the reference value (with ``" within"`` when ``entry``'s interval contains
    it), or ``""`` when equal or not comparable (missing, NaN, infinite).

    Example:
        >>> ref = {"value": 0.5}
        >>> compare({"value": 0.7, "low": 0.6, "high": 0.8}, ref, higher_is_better=True)
        'better'
        >>> compare({"value": 0.7, "low": 0.4, "high": 0.8}, ref, higher_is_better=False)
        'worse within'
    """
    if reference is None or reference["value"] is None or entry["value"] == reference["value"] \
            or not math.isfinite(entry["value"]) or not math.isfinite(reference["value"]):
        return ""
    better = (entry["value"] > reference["value"]) == higher_is_better
    low, high = entry.get("low"), entry.get("high")
    within = low is not None and high is not None and low <= reference["value"] <= high
    return ("better" if better else "worse") + (" within" if within else "")


def generations_table(generations: Sequence[Mapping[str, Any]]) -> str:
    """Each prompt with the model's text before and after the intervention, side by side."""
    rows = "".join(
        f'<tr><td><pre>{escape(g["prompt"])}</pre></td><td><pre>{escape(g["before"])}</pre></td>'
        f'<td><pre>{escape(g["after"])}</pre></td><td>{escape(g["note"])}</td></tr>' for g in generations)
    return ('<table class="generations"><tr><th>prompt</th><th>before</th><th>after</th><th>note</th></tr>'
            f"{rows}</table>")


def export_block(export: Mapping[str, Any]) -> str:
    """The exported checkpoint's folder, note and sha256 of each file."""
    note = f"<p>{escape(export['note'])}</p>" if export["note"] else ""
    return (f"<p>folder: <code>{escape(export['path'])}</code></p>{note}"
            f"{kv_table(export['files'], code=True)}")
