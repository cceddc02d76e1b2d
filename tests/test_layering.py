"""The package layering: every import inside ``lsi`` goes to a package further down the stack, so the package
import graph has no cycle.

The stack, bottom first (a package may import only packages listed before it, and itself):
``_lazy`` < ``errors`` < ``arch`` < ``core`` < ``testing`` < ``evaluation`` < ``locate`` < ``steer`` < ``organisms`` <
``bench`` < ``improve`` < ``report`` < ``demo`` < ``cli``. Imports are read from the source (module level, inside
functions and under ``TYPE_CHECKING`` alike), so a function-local import cannot hide a cycle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "lsi"
STACK = ("_lazy", "errors", "arch", "core", "testing", "evaluation", "locate", "steer", "organisms", "bench", "improve",
         "report", "demo", "cli")


def _package(module: str) -> str | None:
    """``lsi.steer.base`` -> ``steer``; ``lsi`` itself (the lazy top-level namespace) -> None."""
    parts = module.split(".")
    return parts[1] if parts[0] == "lsi" and len(parts) > 1 else None


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every ``lsi.*`` module imported by the file at ``path``, with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
            if node.module == "lsi":  # from lsi import steer
                found += [(f"lsi.{alias.name}", node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
    return [(m, line) for m, line in found if m == "lsi" or m.startswith("lsi.")]


def package_edges() -> dict[tuple[str, str], list[str]]:
    """``{(importer, imported): ["file:line", ...]}`` between different packages of ``lsi``."""
    edges: dict[tuple[str, str], list[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent)
        importer = _package(".".join(rel.with_suffix("").parts))
        if importer is None:
            continue
        for module, line in _imports(path):
            imported = _package(module)
            if imported is not None and imported != importer:
                edges.setdefault((importer, imported), []).append(f"{rel}:{line}")
    return edges


def test_every_package_is_placed_in_the_stack() -> None:
    packages = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
                if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.stem != "__init__")}
    assert packages <= set(STACK), f"place {sorted(packages - set(STACK))} in STACK (and in docs/architecture.md)"


def test_imports_only_go_down_the_stack() -> None:
    upward = {f"{a} -> {b}": where for (a, b), where in package_edges().items()
              if a in STACK and b in STACK and STACK.index(b) > STACK.index(a)}
    assert not upward, f"imports up the stack: {upward}"


def test_package_graph_has_no_cycle() -> None:
    graph: dict[str, set[str]] = {}
    for a, b in package_edges():
        graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail(f"package import cycle: {' -> '.join([*path, node, nxt])}")
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_the_checks_see_a_cycle_and_an_upward_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The two checks fail on a tree that has what they look for (so they cannot pass vacuously)."""
    for pkg, source in (("core", "from lsi.steer import x\n"), ("steer", "import lsi.core.model\n")):
        (tmp_path / "lsi" / pkg).mkdir(parents=True)
        (tmp_path / "lsi" / pkg / "__init__.py").write_text("")
        (tmp_path / "lsi" / pkg / "mod.py").write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path / "lsi")
    assert package_edges() == {("core", "steer"): ["lsi/core/mod.py:1"], ("steer", "core"): ["lsi/steer/mod.py:1"]}
    with pytest.raises(AssertionError, match="core -> steer"):
        test_imports_only_go_down_the_stack()
    with pytest.raises(pytest.fail.Exception, match="cycle: core -> steer -> core"):
        test_package_graph_has_no_cycle()
