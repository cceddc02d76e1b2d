"""Tiny random models of every registered family, built from real configs in code (no downloads).

Example:
    >>> from lsi.testing import tiny_model
    >>> tiny_model("gpt_neox").config.model_type
    'gpt_neox'
"""

from lsi.testing.tiny import TINY_CONFIGS, tiny_config, tiny_model

__all__ = ["TINY_CONFIGS", "tiny_config", "tiny_model"]
