"""lsi: Locate, Steer, Improve — actionable mechanistic interpretability for HuggingFace language models.

``import lsi`` is cheap: torch and transformers load on first use of a name below.

Example:
    >>> import lsi
    >>> lm = lsi.load("../shared/models/stories260k")  # doctest: +SKIP
    >>> cache = lm.run_with_cache("Once upon a time", sites="blocks.*.resid_post")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load": "lsi.core.loading",
    "LanguageModel": "lsi.core.model",
    "GradResult": "lsi.core.model",
    "Site": "lsi.core.sites",
    "to_transformer_lens": "lsi.core.sites",
    "from_transformer_lens": "lsi.core.sites",
    "ActivationCache": "lsi.core.cache",
    "Batch": "lsi.core.inputs",
    "Zero": "lsi.core.interventions",
    "Scale": "lsi.core.interventions",
    "Add": "lsi.core.interventions",
    "Set": "lsi.core.interventions",
    "Mean": "lsi.core.interventions",
    "Patch": "lsi.core.interventions",
    "Apply": "lsi.core.interventions",
    "Intervention": "lsi.core.interventions",
    "Steering": "lsi.core.steering",
    "compose": "lsi.core.steering",
    "WeightEdit": "lsi.core.weight_edit",
    "ModelIdentity": "lsi.core.identity",
    "All": "lsi.core.positions",
    "Last": "lsi.core.positions",
    "Index": "lsi.core.positions",
    "Span": "lsi.core.positions",
    "Match": "lsi.core.positions",
    "ArchSpec": "lsi.arch.spec",
    "register": "lsi.arch.registry",
    "self_check": "lsi.core.selfcheck",
    "ActivationStore": "lsi.core.store",
    "cache_to_disk": "lsi.core.store",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lsi' has no attribute {name!r}")
