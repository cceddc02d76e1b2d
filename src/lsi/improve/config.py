"""Recipe configuration: one frozen dataclass per recipe, filled from Python keywords or a YAML / TOML / JSON file.

Unknown keys and values of the wrong type are refused with the valid keys listed; a file may hold the keys at
the top level or under a table named after the scenario (``[safety]`` in TOML).

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Demo(RecipeConfig):
    ...     layers: tuple[int, ...] = (1, 2)
    >>> build_config(Demo, {"tau": 0.05, "layers": [3]})
    Demo(seed=0, tau=0.05, bootstrap=1000, layers=(3,))
    >>> build_config(Demo, {"taus": 1})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    lsi.errors.InputError: expected config keys among [...]; found unknown key(s) ['taus']. Fix: ...
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar, Union

from lsi.errors import InputError

C = TypeVar("C", bound="RecipeConfig")


@dataclass(frozen=True)
class RecipeConfig:
    """Settings every recipe has: ``seed``; ``tau``, the KL budget (nats) a steering is selected under on dev;
    ``bootstrap``, the resamples of the test metrics' confidence intervals."""

    seed: int = 0
    tau: float = 0.1
    bootstrap: int = 1000

    def to_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` checked against (and converted to) the annotation ``hint``."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(value, option, key)
            except InputError:
                continue
    elif origin is tuple:
        item = typing.get_args(hint)[0]
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(v, item, key) for v in value)
    elif origin is typing.Literal:
        if value in typing.get_args(hint):
            return value
    elif hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif (hint is int and isinstance(value, int) and not isinstance(value, bool)) or (
            hint in (str, bool) and isinstance(value, hint)):
        return value
    raise InputError(f"config key {key!r} of type {getattr(hint, '__name__', hint)}", repr(value),
                     "fix the value in the config")


def build_config(cls: type[C], values: Mapping[str, Any]) -> C:
    """A ``cls`` config from ``values`` (defaults for the keys not given)."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise InputError(f"config keys among {sorted(known)}", f"unknown key(s) {unknown}",
                         "check the spelling (lsi improve --list shows each recipe's keys)")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints[k], k) for k, v in values.items()}
    missing = [f.name for f in known.values() if f.name not in kwargs and f.default is MISSING
               and f.default_factory is MISSING]
    if missing:
        raise InputError(f"values for the config keys {missing}", "none", "set them in the config")
    return cls(**kwargs)


def read_config_file(path: str | Path, scenario: str) -> dict[str, Any]:
    """The mapping in a ``.yaml`` / ``.yml`` / ``.toml`` / ``.json`` file (under a ``scenario`` table if it has one)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("a config file (.yaml, .toml or .json)", f"no file {path}", "check the path")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise InputError("a config file ending in .yaml, .yml, .toml or .json", str(path), "rename or convert it")
    except InputError:
        raise
    except Exception as err:  # each parser has its own error type
        raise InputError(f"a valid {path.suffix[1:].upper()} file", f"{path}: {err}", "fix the syntax") from err
    if not isinstance(data, dict):
        raise InputError("a mapping of config keys", f"{type(data).__name__} in {path}", "write key: value pairs")
    inner = data.get(scenario)
    return dict(inner) if isinstance(inner, dict) and len(data) == 1 else data
