"""lsi: Locate, Steer, Improve — actionable mechanistic interpretability for HuggingFace language models.

``import lsi`` is cheap: torch and transformers load on first use of a name. The public names are listed once,
in ``lsi/__init__.pyi`` (what type checkers read); ``lsi.locate`` and ``lsi.steer`` re-export theirs the same way.

Example:
    >>> import lsi
    >>> lm = lsi.load("../shared/models/stories260k")  # doctest: +SKIP
    >>> cache = lm.run_with_cache("Once upon a time", sites="blocks.*.resid_post")  # doctest: +SKIP
"""

from lsi._lazy import attach

__version__ = "0.1.0"
__getattr__, __dir__, _names = attach(__name__, __file__)
__all__ = ["__version__", *_names]
