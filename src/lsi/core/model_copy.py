"""Copies of models: a deep copy behind a new :class:`~lsi.core.model.LanguageModel`, and untying a tied
unembedding (so editing the embedding leaves the unembedding as it is).

Example:
    >>> import lsi
    >>> from lsi.testing import tiny_model
    >>> lm = lsi.LanguageModel(tiny_model("gpt2"))
    >>> twin = copy_model(lm)
    >>> untie_embeddings(twin), untie_embeddings(twin), twin.weights.W_E.data_ptr() != lm.weights.W_E.data_ptr()
    (True, False, True)
"""

from __future__ import annotations

import copy as copy_module
from typing import TYPE_CHECKING

from torch import nn

from lsi.arch.dims import get_module

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel


def untie_embeddings(lm: LanguageModel) -> bool:
    """Give the unembedding its own copy of a tied embedding matrix (so editing one leaves the other), and mark
    the config untied so a saved checkpoint keeps both. Returns whether they were tied."""
    embed = get_module(lm.model, lm.spec.embed)
    unembed = get_module(lm.model, lm.spec.unembed)
    if unembed.weight.data_ptr() != embed.weight.data_ptr():
        return False
    unembed.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=unembed.weight.requires_grad)
    lm.model.config.tie_word_embeddings = False
    return True


def copy_model(lm: LanguageModel) -> LanguageModel:
    """A :class:`LanguageModel` over a deep copy of ``lm``'s HF model (same tokenizer and spec)."""
    from lsi.core.model import LanguageModel

    return LanguageModel(copy_module.deepcopy(lm.model), lm.tokenizer, spec=lm.spec, verify=False)
