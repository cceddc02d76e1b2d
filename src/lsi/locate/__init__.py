"""Locate: methods that score interpretable objects by how much they matter for a behaviour.

Every method returns a :class:`LocateResult`. The public names are re-exported here (listed in ``__init__.pyi``)
and imported on first use, e.g. ``from lsi.locate import activation_patching, logit_diff``.
"""

from lsi._lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, __file__)
