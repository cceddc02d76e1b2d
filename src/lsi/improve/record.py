"""The result of a recipe run, as typed records that serialise to ``result.json`` (schema 1).

A result is a table (rows = the steered variants and the baselines, columns = metrics in groups), the curves the
choice was made on (with the chosen point), locate heatmaps, generations before / after, the export and notes. The
HTML report (:mod:`lsi.report.html`) renders exactly this.

Example:
    >>> from lsi.improve.stats import Estimate
    >>> m = Metric("acc", "accuracy", "capability", True)
    >>> r = Result("kept accuracy", (m,), (Row("unsteered", "baseline", {"acc": Estimate(0.9)}),), "unsteered")
    >>> Result.from_json(r.to_json()) == r
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lsi.errors import InputError
from lsi.improve.stats import Estimate

SCHEMA = 1
GROUPS = ("target", "generalization", "specificity", "side effect", "capability", "cost")
KINDS = ("method", "baseline")


@dataclass(frozen=True)
class Metric:
    """A column of the table: ``group`` is one of :data:`GROUPS`."""

    key: str
    label: str
    group: str
    higher_is_better: bool
    description: str = ""

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise InputError(f"a metric group in {GROUPS}", repr(self.group), "pick the closest group")


@dataclass(frozen=True)
class Row:
    """One variant (a steering, or a baseline) with its measured values (missing key: not measured)."""

    variant: str
    kind: str
    values: Mapping[str, Estimate]
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"a row kind in {KINDS}", repr(self.kind), "'method' or 'baseline'")


@dataclass(frozen=True)
class Point:
    x: float
    y: float
    label: str = ""


@dataclass(frozen=True)
class Series:
    name: str
    points: tuple[Point, ...]


@dataclass(frozen=True)
class Curve:
    """A selection or dose-response curve; ``chosen`` = (series name, point index) of the chosen point."""

    title: str
    x_label: str
    y_label: str
    series: tuple[Series, ...]
    chosen: tuple[str, int] | None = None


@dataclass(frozen=True)
class Heatmap:
    """Values ``z[row][col]`` over ``y`` (rows) × ``x`` (columns) labels; ``hover`` texts shaped like ``z``."""

    title: str
    x_label: str
    y_label: str
    x: tuple[str, ...]
    y: tuple[str, ...]
    z: tuple[tuple[float | None, ...], ...]
    hover: tuple[tuple[str, ...], ...] | None = None


@dataclass(frozen=True)
class Generation:
    prompt: str
    before: str
    after: str
    note: str = ""


@dataclass(frozen=True)
class Export:
    """The exported checkpoint: its directory (relative to the run) and a sha256 per file."""

    path: str
    files: Mapping[str, str]
    note: str = ""


@dataclass(frozen=True)
class Result:
    headline: str
    metrics: tuple[Metric, ...]
    rows: tuple[Row, ...]
    chosen: str
    curves: tuple[Curve, ...] = ()
    heatmaps: tuple[Heatmap, ...] = ()
    generations: tuple[Generation, ...] = ()
    export: Export | None = None
    notes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        keys = {m.key for m in self.metrics}
        for row in self.rows:
            unknown = set(row.values) - keys
            if unknown:
                raise InputError(f"row values for the declared metrics {sorted(keys)}",
                                 f"{sorted(unknown)} in row {row.variant!r}", "declare the metric first")
        if self.chosen not in {row.variant for row in self.rows}:
            raise InputError("the chosen variant among the rows", repr(self.chosen), "name one of the rows")

    def row(self, variant: str) -> Row:
        """The row called ``variant``."""
        for row in self.rows:
            if row.variant == variant:
                return row
        raise InputError(f"a variant in {[r.variant for r in self.rows]}", repr(variant), "pick one of them")

    def value(self, variant: str, key: str) -> float | None:
        """The point value of metric ``key`` in row ``variant`` (``None``: not measured)."""
        estimate = self.row(variant).values.get(key)
        return None if estimate is None else estimate.value

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "headline": self.headline,
            "metrics": [vars(m) for m in self.metrics],
            "rows": [{"variant": r.variant, "kind": r.kind, "description": r.description,
                      "values": {k: v.to_json() for k, v in r.values.items()}} for r in self.rows],
            "chosen": self.chosen,
            "curves": [{"title": c.title, "x_label": c.x_label, "y_label": c.y_label,
                        "series": [{"name": s.name, "points": [vars(p) for p in s.points]} for s in c.series],
                        "chosen": None if c.chosen is None else {"series": c.chosen[0], "index": c.chosen[1]}}
                       for c in self.curves],
            "heatmaps": [{"title": h.title, "x_label": h.x_label, "y_label": h.y_label, "x": list(h.x),
                          "y": list(h.y), "z": [list(r) for r in h.z],
                          "hover": None if h.hover is None else [list(r) for r in h.hover]} for h in self.heatmaps],
            "generations": [vars(g) for g in self.generations],
            "export": None if self.export is None else {"path": self.export.path, "files": dict(self.export.files),
                                                        "note": self.export.note},
            "notes": list(self.notes),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Result:
        if data.get("schema") != SCHEMA:
            raise InputError(f"a result of schema {SCHEMA}", f"schema {data.get('schema')!r}",
                             "rerun the recipe with this version of lsi")
        export = data.get("export")
        return cls(
            data["headline"], tuple(Metric(**m) for m in data["metrics"]),
            tuple(Row(r["variant"], r["kind"], {k: Estimate.from_json(v) for k, v in r["values"].items()},
                      r.get("description", "")) for r in data["rows"]),
            data["chosen"],
            tuple(Curve(c["title"], c["x_label"], c["y_label"],
                        tuple(Series(s["name"], tuple(Point(**p) for p in s["points"])) for s in c["series"]),
                        None if c["chosen"] is None else (c["chosen"]["series"], c["chosen"]["index"]))
                  for c in data.get("curves", [])),
            tuple(Heatmap(h["title"], h["x_label"], h["y_label"], tuple(h["x"]), tuple(h["y"]),
                          tuple(tuple(r) for r in h["z"]),
                          None if h.get("hover") is None else tuple(tuple(r) for r in h["hover"]))
                  for h in data.get("heatmaps", [])),
            tuple(Generation(**g) for g in data.get("generations", [])),
            None if export is None else Export(export["path"], dict(export["files"]), export.get("note", "")),
            tuple(data.get("notes", [])),
        )


def table_text(result: Result, *, columns: Sequence[str] | None = None, intervals: bool = False) -> str:
    """The result's table as plain text: one line per row (``*`` marks the chosen one), ``value`` per metric, or
    ``value [low, high]`` with ``intervals``."""
    metrics = [m for m in result.metrics if columns is None or m.key in columns]
    width = max(len(r.variant) for r in result.rows) + 2

    def cell(e: Estimate | None) -> str:
        if e is None or e.value is None:
            return "—"
        if not intervals or e.low is None or e.high is None:
            return f"{e.value:.3g}"
        return f"{e.value:.3g} [{e.low:.3g}, {e.high:.3g}]"

    cells = [[cell(r.values.get(m.key)) for m in metrics] for r in result.rows]
    widths = [max(len(m.label), *(len(c[i]) for c in cells)) for i, m in enumerate(metrics)]
    lines = [" " * width + "  ".join(m.label.ljust(w) for m, w in zip(metrics, widths, strict=True))]
    for row, row_cells in zip(result.rows, cells, strict=True):
        mark = "*" if row.variant == result.chosen else " "
        lines.append(f"{mark}{row.variant:<{width - 1}}" + "  ".join(c.ljust(w) for c, w in
                                                                    zip(row_cells, widths, strict=True)))
    return "\n".join(line.rstrip() for line in lines)
