"""The Python examples of the README and docs/ run as written.

Each ```python block of a Markdown file runs in order, in one namespace per file, in a fresh working directory
(files the examples save land there). ``../shared/models/...`` paths are pointed at the checkout's ``../shared``.
A block that only shows a shape of code, not a runnable example, is fenced as ```text instead. Files whose
examples load SmolLM2 (``LSI_SMOLLM2``) are skipped when scripts/get-smollm2 has not fetched it.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
from core_helpers import SMOLLM2_FILE

ROOT = Path(__file__).parents[1]
SHARED = (ROOT / ".." / "shared").resolve()
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """``(line number, code)`` of every ```python block in a Markdown file."""
    text = path.read_text()
    return [(text[:m.start()].count("\n") + 1, m.group(1)) for m in BLOCK.finditer(text)]


@pytest.mark.integration
@pytest.mark.parametrize("doc", [d for d in DOCS if python_blocks(d)], ids=lambda d: d.name)
def test_examples_run(doc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if "LSI_SMOLLM2" in doc.read_text() and not SMOLLM2_FILE.is_file():
        pytest.skip(f"SmolLM2 not found at {SMOLLM2_FILE} (run scripts/get-smollm2)")
    monkeypatch.chdir(tmp_path)
    module = types.ModuleType(f"docs_{doc.stem}")  # a real module: dataclasses defined in the examples need one
    monkeypatch.setitem(sys.modules, module.__name__, module)
    for line, code in python_blocks(doc):
        code = code.replace('"../shared/', f'"{SHARED}/')
        exec(compile(code, f"{doc.name}:{line}", "exec"), module.__dict__)


def test_blocks_are_found(tmp_path: Path) -> None:
    path = tmp_path / "sample.md"
    path.write_text("text\n```python\nx = 1\n```\n```text\nnot run\n```\n```python\ny = 2\n```\n")
    assert python_blocks(path) == [(2, "x = 1\n"), (8, "y = 2\n")]
