"""The one registration point for architecture specs, and resolution of a model to its spec.

Example:
    >>> from lsi.arch.families import LLAMA
    >>> spec_for_model_type("llama") is LLAMA
    True
"""

from __future__ import annotations

from torch import nn

from lsi.arch.families import FAMILIES
from lsi.arch.spec import ArchSpec
from lsi.errors import InputError

_REGISTRY: dict[str, ArchSpec] = {}


def register_architecture(spec: ArchSpec, *, replace: bool = False) -> ArchSpec:
    """Register a spec for its ``model_types`` (``replace=True`` to override an existing one).

    Example:
        >>> import dataclasses
        >>> from lsi.arch.families import LLAMA
        >>> register_architecture(LLAMA)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        lsi.errors.InputError: expected a model_type not registered yet; found 'llama' (registered as 'llama')...
        >>> mine = register_architecture(dataclasses.replace(LLAMA, family="my_llama", model_types=("my_llama",)))
        >>> spec_for_model_type("my_llama").family
        'my_llama'
    """
    for model_type in spec.model_types:
        if model_type in _REGISTRY and not replace:
            raise InputError("a model_type not registered yet",
                             f"{model_type!r} (registered as {_REGISTRY[model_type].family!r})",
                             "pass replace=True to override it, or give the spec other model_types")
        _REGISTRY[model_type] = spec
    return spec


def spec_for_model_type(model_type: str) -> ArchSpec | None:
    return _REGISTRY.get(model_type)


def registered_families() -> list[str]:
    return sorted({s.family for s in _REGISTRY.values()})


def candidate_specs(model: nn.Module) -> tuple[list[ArchSpec], bool]:
    """The registered spec of a model, or probed candidates (then ``True``: each must pass the self-check)."""
    spec = spec_for_model_type(getattr(model.config, "model_type", ""))
    if spec is not None:
        return [spec], False
    from lsi.arch.probe import probe_specs

    return probe_specs(model), True


for _spec in FAMILIES:
    register_architecture(_spec)
