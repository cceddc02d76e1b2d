"""Reading a run directory for the HTML report: ``run.json`` (the manifest) and ``result.json`` (the measured
result), checked against schema version 1 so that the renderer can rely on every field it reads.

Unknown keys are allowed (a recipe may record more than the report shows); missing keys, wrong types, unknown
metric groups and inconsistent shapes raise :class:`~lsi.errors.InputError` naming the file and the field.

Example:
    >>> check({"n": 3}, {"n": int}, "demo.json")
    >>> check({"n": "3"}, {"n": int}, "demo.json")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    lsi.errors.InputError: expected demo.json: n to be an integer; found a string ('3'). Fix: ...
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lsi.errors import InputError

SCHEMA_VERSION = 1
GROUPS = ("target", "generalization", "specificity", "side effect", "capability", "cost")
"""Metric groups, in the order the report shows them."""
REFERENCE_VARIANT = "unsteered"
"""The row every other row is compared with (better / worse colouring)."""

_FIX = "rewrite the run directory with the lsi version that reads it (rerun the recipe into a new directory)"


# -- a small schema language ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Nullable:
    """``None`` or a value matching ``spec``."""

    spec: Any


@dataclass(frozen=True)
class ListOf:
    """A JSON array whose every item matches ``spec``."""

    spec: Any


@dataclass(frozen=True)
class MapOf:
    """A JSON object with any keys whose every value matches ``spec``."""

    spec: Any


@dataclass(frozen=True)
class OneOf:
    """One of a few strings."""

    choices: tuple[str, ...]


class Number:
    """An integer or a float (not a boolean)."""


_NAMES = {str: "a string", int: "an integer", bool: "a boolean", dict: "an object", Number: "a number"}

STEP = {"name": str, "status": OneOf(("done", "pending")), "seconds": Nullable(Number)}
RUN = {
    "schema": int, "name": str, "scenario": str, "recipe": str, "description": str,
    "model": {"spec": str, "family": Nullable(str), "identity": dict},
    "config": dict, "data": MapOf(str), "versions": MapOf(str), "seed": int,
    "started": str, "finished": Nullable(str), "steps": ListOf(STEP),
}
METRIC = {"key": str, "label": str, "group": OneOf(GROUPS), "higher_is_better": bool, "description": str}
VALUE = {"value": Nullable(Number), "low": Nullable(Number), "high": Nullable(Number), "n": Nullable(int)}
ROW = {"variant": str, "kind": OneOf(("method", "baseline")), "description": str, "values": MapOf(Nullable(VALUE))}
POINT = {"x": Number, "y": Number, "label": str}
CURVE = {
    "title": str, "x_label": str, "y_label": str,
    "series": ListOf({"name": str, "points": ListOf(POINT)}),
    "chosen": Nullable({"series": str, "index": int}),
}
HEATMAP = {
    "title": str, "x_label": str, "y_label": str, "x": ListOf(str), "y": ListOf(str),
    "z": ListOf(ListOf(Nullable(Number))), "hover": Nullable(ListOf(ListOf(str))),
}
RESULT = {
    "schema": int, "headline": str, "metrics": ListOf(METRIC), "rows": ListOf(ROW), "chosen": Nullable(str),
    "curves": ListOf(CURVE), "heatmaps": ListOf(HEATMAP),
    "generations": ListOf({"prompt": str, "before": str, "after": str, "note": str}),
    "export": Nullable({"path": str, "files": MapOf(str), "note": str}),
    "notes": ListOf(str),
}


def _describe(spec: Any) -> str:
    if isinstance(spec, Nullable):
        return f"null or {_describe(spec.spec)}"
    if isinstance(spec, ListOf):
        return "an array"
    if isinstance(spec, OneOf):
        return "one of " + ", ".join(repr(c) for c in spec.choices)
    if isinstance(spec, (MapOf, Mapping)):
        return "an object"
    return _NAMES[spec]


def _found(value: Any) -> str:
    kind = {type(None): "null", bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "an object"}[type(value)]
    text = repr(value)
    return kind if isinstance(value, (list, dict)) or value is None else f"{kind} ({text[:60]})"


def _matches(value: Any, spec: Any) -> bool:
    if spec is Number:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if spec is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(spec, OneOf):
        return value in spec.choices
    if isinstance(spec, (Mapping, MapOf)) or spec is dict:
        return isinstance(value, dict)
    if isinstance(spec, ListOf):
        return isinstance(value, list)
    return isinstance(value, spec)


def check(value: Any, spec: Any, where: str, path: str = "") -> None:
    """Raise :class:`InputError` unless ``value`` matches ``spec`` (a type, a ``{key: spec}`` object whose keys are
    all required, or :class:`Nullable` / :class:`ListOf` / :class:`MapOf` / :class:`OneOf` / :class:`Number`)."""
    if isinstance(spec, Nullable):
        if value is not None:
            check(value, spec.spec, where, path)
        return
    if not _matches(value, spec):
        raise InputError(f"{where}: {path or 'the top level'} to be {_describe(spec)}", _found(value), _FIX)
    if isinstance(spec, Mapping):
        for key, sub in spec.items():
            if key not in value:
                raise InputError(f"{where}: {_join(path, key)} ({_describe(sub)})", "no such key", _FIX)
            check(value[key], sub, where, _join(path, key))
    elif isinstance(spec, MapOf):
        for key, item in value.items():
            check(item, spec.spec, where, _join(path, key))
    elif isinstance(spec, ListOf):
        for i, item in enumerate(value):
            check(item, spec.spec, where, f"{path}[{i}]")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# -- the run directory ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunFiles:
    """A checked run directory: its path, ``run.json`` and ``result.json`` as parsed JSON."""

    path: Path
    run: dict[str, Any]
    result: dict[str, Any]


def read_run(run_dir: Path) -> RunFiles:
    """Read and check ``run_dir/run.json`` and ``run_dir/result.json`` (schema version 1)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError("a run directory (runs/NAME, holding run.json and result.json)",
                         f"{run_dir}: {'a file' if run_dir.exists() else 'nothing there'}",
                         "pass the directory a recipe run wrote (its --out)")
    run = _read_json(run_dir / "run.json", RUN)
    result = _read_json(run_dir / "result.json", RESULT)
    _check_consistency(run_dir / "result.json", result)
    return RunFiles(run_dir, run, result)


def _read_json(path: Path, spec: Mapping[str, Any]) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"{path.name} in the run directory {path.parent}", "no such file",
                         "finish the run (rerunning the recipe with the same --out resumes it), then render it; "
                         "result.json appears when the last step is done")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path} to hold JSON", f"invalid JSON ({err})",
                         "the file is damaged: rerun the recipe into a new directory") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA_VERSION:
        found = _found(data.get("schema")) if isinstance(data, dict) else _found(data)
        raise InputError(f"{path}: an object with schema {SCHEMA_VERSION}", f"schema {found}",
                         "render it with the lsi version that wrote it (run.json: versions.lsi), or rerun the recipe")
    check(data, spec, str(path))
    return data


def _check_consistency(path: Path, result: Mapping[str, Any]) -> None:
    """What the schema cannot say: keys that refer to each other, and heatmap shapes."""
    keys = [m["key"] for m in result["metrics"]]
    _unique(path, "metrics[].key", keys)
    _unique(path, "rows[].variant", [row["variant"] for row in result["rows"]])
    for i, row in enumerate(result["rows"]):
        unknown = sorted(set(row["values"]) - set(keys))
        if unknown:
            raise InputError(f"{path}: rows[{i}].values keyed by metrics[].key", f"unknown metrics {unknown}",
                             "declare every measured metric in metrics")
    if result["chosen"] is not None and result["chosen"] not in {row["variant"] for row in result["rows"]}:
        raise InputError(f"{path}: chosen naming a row's variant", repr(result["chosen"]),
                         "set chosen to one of rows[].variant, or null")
    for i, curve in enumerate(result["curves"]):
        chosen = curve["chosen"]
        if chosen is None:
            continue
        series = {s["name"]: s["points"] for s in curve["series"]}
        if not 0 <= chosen["index"] < len(series.get(chosen["series"], ())):
            raise InputError(f"{path}: curves[{i}].chosen naming a point of a series",
                             f"series {chosen['series']!r}, index {chosen['index']}",
                             f"use one of the series {sorted(series)} and an index within its points")
    for i, heatmap in enumerate(result["heatmaps"]):
        shape = (len(heatmap["y"]), len(heatmap["x"]))
        for name in ("z", "hover"):
            grid = heatmap[name]
            if grid is not None and (len(grid) != shape[0] or any(len(r) != shape[1] for r in grid)):
                raise InputError(f"{path}: heatmaps[{i}].{name} with len(y) x len(x) = {shape[0]} x {shape[1]} cells",
                                 f"rows of lengths {[len(r) for r in grid]}",
                                 "write one row per y label, one cell per x label")


def _unique(path: Path, where: str, names: list[str]) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InputError(f"{path}: distinct {where}", f"repeated {repeated}", "give each one its own name")
