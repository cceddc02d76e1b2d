"""Steer: directions from data, steering objects, selection under a side-effect budget, folding and export.

The public names are re-exported here (listed in ``__init__.pyi``) and imported on first use, e.g.
``from lsi.steer import diff_in_means, select, export_hf``. The elementary interventions (``lsi.Add``,
``lsi.Zero``, ...) live in :mod:`lsi.core.interventions` and are exported by ``lsi`` itself.
"""

from lsi._lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, __file__)
