"""The one registration point of model organisms, and loading of their committed weights.

Example:
    >>> from lsi.organisms.registry import ORGANISMS
    >>> "induction" in ORGANISMS
    True
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lsi.errors import InputError
from lsi.organisms.base import Organism
from lsi.organisms.training import GROUND_TRUTH_FILE

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel

_MODULES = ("induction", "layer_redundancy", "toy_superposition", "fact_world",
            "two_languages", "binary_attribute", "refusal_gate", "biased_occupations")
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", GROUND_TRUTH_FILE)

ORGANISMS: dict[str, Organism] = {
    organism.name: organism
    for organism in (importlib.import_module(f"lsi.organisms.{m}").ORGANISM for m in _MODULES)
}


def get_organism(name: str) -> Organism:
    """The registered organism called ``name``; :class:`InputError` listing the valid names otherwise."""
    if name not in ORGANISMS:
        raise InputError(f"an organism name, one of {sorted(ORGANISMS)}", repr(name),
                         "run `lsi organisms list` to see them")
    return ORGANISMS[name]


def _retrain_fix(name: str) -> str:
    return f"retrain it: lsi organisms train {name} --out DIR (default seed {ORGANISMS[name].seed})"


def ground_truth(name: str, model_dir: str | Path | None = None) -> dict[str, Any]:
    """The ground truth of organism ``name`` (from its committed directory unless ``model_dir`` is given)."""
    organism = get_organism(name)
    path = Path(model_dir or organism.weights_dir) / GROUND_TRUTH_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise InputError(f"the ground-truth file of organism {name!r}", f"no file {path}", _retrain_fix(name)) from err
    except json.JSONDecodeError as err:
        raise InputError(f"valid JSON in {path}", f"a corrupt file ({err.msg} at line {err.lineno})",
                         _retrain_fix(name)) from err


def check_files(name: str, directory: Path) -> None:
    """Raise :class:`InputError` naming the first missing or unreadable organism file in ``directory``."""
    from safetensors import SafetensorError, safe_open

    if not directory.is_dir():
        raise InputError(f"an organism directory with {list(REQUIRED_FILES)}", f"no directory {directory}",
                         _retrain_fix(name))
    missing = [f for f in REQUIRED_FILES if not (directory / f).is_file()]
    if missing:
        raise InputError(f"the organism files {list(REQUIRED_FILES)} in {directory}",
                         f"missing {', '.join(str(directory / f) for f in missing)}", _retrain_fix(name))
    for file in ("config.json", "tokenizer.json"):
        try:
            json.loads((directory / file).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"valid JSON in {directory / file}", f"a corrupt file ({err})",
                             _retrain_fix(name)) from err
    ground_truth(name, directory)
    weights = directory / "model.safetensors"
    try:
        with safe_open(str(weights), "pt") as f:
            f.keys()
    except SafetensorError as err:
        raise InputError(f"a safetensors weight file at {weights}", f"a corrupt file ({err})",
                         _retrain_fix(name)) from err


def load_organism(name: str, model_dir: str | Path | None = None, **load_kwargs: Any) -> LanguageModel:
    """Load organism ``name`` from its committed weights (or from ``model_dir``) with :func:`lsi.load`, with eager
    attention by default (organisms are small, and attention-pattern methods need it).

    Raises :class:`InputError` naming the missing or corrupt file and the command that retrains the organism.
    """
    import lsi

    organism = get_organism(name)
    directory = Path(model_dir or organism.weights_dir)
    check_files(name, directory)
    return lsi.load(directory, **{"attn_implementation": "eager", **load_kwargs})
