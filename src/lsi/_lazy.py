"""Lazy re-exports, declared once in a package's ``__init__.pyi`` stub.

The stub lists the package's public names as ``from lsi.x.y import name as name`` lines: type checkers read it,
and :func:`attach` turns the same lines into a module ``__getattr__`` that imports a name's module on first use,
so ``import lsi`` stays cheap (no torch) while ``lsi.load`` and ``from lsi.steer import Steering`` work.

Example:
    >>> import lsi
    >>> "load" in lsi.__all__ and lsi.load.__module__
    'lsi.core.loading'
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any


def stub_exports(stub: Path) -> dict[str, str]:
    """``{public name: module holding it}`` from the ``from M import n as n`` lines of a stub file."""
    exports = {}
    for node in ast.parse(stub.read_text(), str(stub)).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                exports[alias.asname or alias.name] = node.module
    return exports


def attach(package: str, init_file: str) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """``(__getattr__, __dir__, __all__)`` for the package whose ``__init__.py`` is ``init_file``."""
    exports = stub_exports(Path(init_file).with_suffix(".pyi"))
    module = importlib.import_module(package)

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        setattr(module, name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(module), *exports})

    return __getattr__, __dir__, sorted(exports)
