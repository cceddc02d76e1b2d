"""User data for recipes: JSON Lines files, one example per line, checked field by field.

Example:
    >>> import tempfile, pathlib
    >>> f = pathlib.Path(tempfile.mkdtemp()) / "d.jsonl"
    >>> _ = f.write_text('{"prompt": "hi", "split": "dev"}\\n')
    >>> read_jsonl(f, {"prompt": (str, True), "split": (str, True), "note": (str, False)})
    [{'prompt': 'hi', 'split': 'dev'}]
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lsi.errors import InputError

Fields = Mapping[str, tuple[type, bool]]  # name -> (type, required)
SPLITS = ("dev", "test")


def read_jsonl(path: str | Path, fields: Fields, *, schema_hint: str = "") -> list[dict[str, Any]]:
    """The objects of a JSONL file, each checked against ``fields`` (unknown keys refused); blank lines skipped."""
    path = Path(path)
    hint = schema_hint or "one JSON object per line with " + ", ".join(
        f"{name} ({kind.__name__}{'' if required else ', optional'})" for name, (kind, required) in fields.items())
    if not path.is_file():
        raise InputError(f"a JSONL data file ({hint})", f"no file {path}", "check the path")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError("one JSON object per line", f"invalid JSON at {where} ({err.msg})", hint) from err
        if not isinstance(row, dict):
            raise InputError("one JSON object per line", f"{type(row).__name__} at {where}", hint)
        unknown = sorted(set(row) - set(fields))
        missing = [n for n, (_, required) in fields.items() if required and n not in row]
        wrong = [n for n, (kind, _) in fields.items() if n in row and not _is(row[n], kind)]
        if unknown or missing or wrong:
            found = "; ".join(part for part in (f"unknown {unknown}" if unknown else "",
                                                f"missing {missing}" if missing else "",
                                                f"wrong type {wrong}" if wrong else "") if part)
            raise InputError(hint, f"{found} at {where}", "fix that line")
        if "split" in row and row["split"] not in SPLITS:
            raise InputError(f"split in {SPLITS}", f"{row['split']!r} at {where}", "tune on dev, report on test")
        rows.append(row)
    if not rows:
        raise InputError(f"a JSONL data file ({hint})", f"no examples in {path}", "add examples")
    return rows


def _is(value: Any, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)
