"""The public face: ``import lsi`` is cheap, and every re-exported name resolves to what its stub declares."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

from lsi._lazy import stub_exports

PACKAGES = ["lsi", "lsi.locate", "lsi.steer"]
SRC = Path(__file__).parents[2] / "src"


def test_import_lsi_loads_neither_torch_nor_transformers() -> None:
    code = "import sys, lsi; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("package", PACKAGES)
def test_every_exported_name_resolves_to_its_declared_module(package: str) -> None:
    module = importlib.import_module(package)
    declared = stub_exports(Path(module.__file__).with_suffix(".pyi"))  # type: ignore[arg-type]
    assert declared and set(declared) <= set(module.__all__) and set(declared) <= set(dir(module))
    for name, home in declared.items():
        value = getattr(module, name)
        assert value is getattr(importlib.import_module(home), name), name


@pytest.mark.parametrize("package", PACKAGES)
def test_no_exported_name_is_also_a_submodule(package: str) -> None:
    """Importing a submodule sets an attribute of the same name on its package, which would hide the export."""
    module = importlib.import_module(package)
    submodules = {info.name for info in pkgutil.iter_modules(module.__path__)}
    assert not submodules & set(module.__all__)


def test_unknown_names_raise_attribute_error() -> None:
    import lsi

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        lsi.Nope  # noqa: B018
