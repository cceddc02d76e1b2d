"""The one list of recipe modules; importing one registers its recipe.

Example:
    >>> sorted(load_recipes())
    ['fairness', 'persona', 'safety']
"""

from __future__ import annotations

import importlib

from lsi.improve.recipe import RECIPES, Recipe

_MODULES = ("safety", "fairness", "persona")


def load_recipes() -> dict[str, Recipe]:
    """Every registered recipe by scenario name (importing the recipe modules once)."""
    for module in _MODULES:
        importlib.import_module(f"lsi.improve.{module}")
    return RECIPES
