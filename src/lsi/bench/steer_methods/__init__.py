"""Steer methods graded by the ground-truth benchmark, one module per family.

Every module here registers its methods with :func:`lsi.bench.steer_registry.register_steer_method` when
imported; :func:`load_all` imports them all, so a new module appears in the benchmark without touching the runner.
"""

from __future__ import annotations

import importlib
import pkgutil


def load_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
