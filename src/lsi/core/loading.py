"""``lsi.load``: hub ids, local directories or already-built models, through the normal HF loading path.

Example:
    >>> import lsi
    >>> lm = lsi.load("../shared/models/stories260k")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lsi.arch.spec import ArchSpec
from lsi.core.model import LanguageModel
from lsi.errors import InputError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def _dtype(dtype: str | torch.dtype | None) -> str | torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in _DTYPES:
        raise InputError(f"a dtype in {sorted(_DTYPES)} or 'auto'", repr(dtype), "e.g. dtype='bfloat16'")
    return _DTYPES[dtype]


def load(model: str | Path | nn.Module, tokenizer: Any = None, *, dtype: str | torch.dtype | None = None,
         device: str | torch.device | None = None, device_map: str | dict[str, Any] | None = None,
         attn_implementation: str | None = None, trust_remote_code: bool = False, spec: ArchSpec | None = None,
         verify: bool | None = None, **from_pretrained_kwargs: Any) -> LanguageModel:
    """Load a causal LM and its tokenizer into a :class:`LanguageModel`.

    Args:
        model: a hub id, a local model directory, or a ``PreTrainedModel`` already built.
        tokenizer: a tokenizer object; by default loaded from the same place (``None`` if the directory has
            none: inputs must then be token ids).
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"auto"`` or a ``torch.dtype``.
        device: one device for the whole model; or ``device_map`` (e.g. ``"auto"``, needs accelerate) to
            spread it over several.
        attn_implementation: ``"eager"`` (needed for attention patterns), ``"sdpa"``, ...
        trust_remote_code: run code shipped with the checkpoint (off unless you ask).
        spec: an :class:`ArchSpec` for an architecture lsi does not know.
        verify: run the self-check before returning (default: only for probed, unregistered architectures).
    """
    hf_model: Any
    if isinstance(model, nn.Module):
        hf_model = model if device is None else model.to(device)
    else:
        from transformers import AutoModelForCausalLM

        if device is not None and device_map is not None:
            raise InputError("device or device_map", "both", "pass one of them")
        kwargs: dict[str, Any] = dict(trust_remote_code=trust_remote_code, **from_pretrained_kwargs)
        if dtype is not None:
            kwargs["dtype"] = _dtype(dtype)
        if device_map is not None:
            kwargs["device_map"] = device_map
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        try:
            hf_model = AutoModelForCausalLM.from_pretrained(str(model), **kwargs)
        except (OSError, ValueError) as err:
            raise InputError("a model directory with config.json and weights, or a reachable hub id", repr(str(model)),
                             f"check the path (HF said: {str(err).splitlines()[0]})") from err
        if device is not None:
            hf_model = hf_model.to(device)
        if tokenizer is None:
            tokenizer = _load_tokenizer(str(model), trust_remote_code)
    return LanguageModel(hf_model, tokenizer, spec=spec, verify=verify)


def _load_tokenizer(name: str, trust_remote_code: bool) -> Any:
    """The tokenizer stored with a model, or ``None`` when there is none (random test models often have none)."""
    from transformers import AutoTokenizer

    path = Path(name)
    if path.is_dir() and not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                                               "tokenizer.model", "vocab.json")):
        return None
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
