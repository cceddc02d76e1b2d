"""``lsi.load``: hub ids, local directories, GGUF files or already-built models, through the normal HF loading path.

A GGUF checkpoint (a ``.gguf`` file, or a directory holding one and no ``config.json``) is dequantized by
transformers into a plain dense model (needs ``pip install 'lsi[gguf]'``); its tokenizer and chat template come
from the file. The quantization record is dropped afterwards, so the model saves like any other.

Example:
    >>> import lsi
    >>> lm = lsi.load("../shared/models/stories260k")  # doctest: +SKIP
    >>> lm = lsi.load("models/SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
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
        model: a hub id, a local model directory, a ``.gguf`` file (or a directory holding exactly one and no
            ``config.json``), or a ``PreTrainedModel`` already built.
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
        if device is not None and device_map is not None:
            raise InputError("device or device_map", "both", "pass one of them")
        kwargs: dict[str, Any] = dict(trust_remote_code=trust_remote_code, **from_pretrained_kwargs)
        if dtype is not None:
            kwargs["dtype"] = _dtype(dtype)
        if device_map is not None:
            kwargs["device_map"] = device_map
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        gguf = _find_gguf(model, kwargs.pop("gguf_file", None))
        hf_model = _from_gguf(gguf, kwargs) if gguf is not None else _from_pretrained(str(model), kwargs)
        if device is not None:
            hf_model = hf_model.to(device)
        if tokenizer is None:
            tokenizer = (_load_tokenizer(str(gguf.parent), trust_remote_code, gguf_file=gguf.name) if gguf is not None
                         else _load_tokenizer(str(model), trust_remote_code))
    return LanguageModel(hf_model, tokenizer, spec=spec, verify=verify)


def _from_pretrained(name: str, kwargs: dict[str, Any]) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as err:
        raise InputError("a model directory with config.json and weights, a .gguf file, or a reachable hub id",
                         repr(name), f"check the path (HF said: {str(err).splitlines()[0]})") from err


def _find_gguf(model: str | Path, gguf_file: str | None = None) -> Path | None:
    """The GGUF checkpoint ``model`` names, or ``None`` when it names something else (a hub id, an HF directory).

    ``model`` names a GGUF when it ends in ``.gguf``, when ``gguf_file`` (a file name inside the directory
    ``model``) is given, or when it is a directory without ``config.json`` holding exactly one ``.gguf`` file.

    Example:
        >>> _find_gguf("gpt2") is None
        True
    """
    path = Path(model)
    if gguf_file is not None:
        path = path / gguf_file
    elif path.is_dir() and not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise InputError("a directory holding one .gguf file, or a .gguf file itself",
                             f"{len(found)} in {path}: {', '.join(f.name for f in found)}",
                             f"name the file, e.g. lsi.load({str(found[0])!r})")
        if not found:
            return None
        path = found[0]
    elif path.suffix != ".gguf":
        return None
    if not path.is_file():
        raise InputError("an existing .gguf file", repr(str(path)), "check the path")
    return path


def _from_gguf(path: Path, kwargs: dict[str, Any]) -> Any:
    """A dense HF model dequantized from a GGUF file. ``dequantize=True`` gives plain ``nn.Linear`` weights even
    where a packed GGUF kernel would be available, and drops the quantization record, so the model saves normally."""
    import importlib.util

    from transformers import AutoModelForCausalLM, GgufConfig

    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise InputError("the gguf and accelerate packages to read a .gguf file", f"{', '.join(missing)} missing",
                         "pip install 'lsi[gguf]'")
    try:
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                    quantization_config=GgufConfig(dequantize=True), **kwargs)
    except (OSError, ValueError) as err:
        raise _gguf_error(path, err) from err


def _gguf_error(path: Path, err: Exception) -> InputError:
    """Why transformers could not load ``path``: not a GGUF, truncated / corrupt, or an architecture it lacks."""
    said = f"(HF said: {str(err).splitlines()[0]})"
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            return InputError("a GGUF file (starting with the bytes GGUF)", f"{path} {said}",
                              "pass the .gguf checkpoint itself")
    from gguf import GGUFReader

    try:
        field = GGUFReader(path).fields["general.architecture"]
        architecture = field.contents()
    except Exception as read_err:  # a damaged file fails in many ways (short arrays, bad offsets, missing keys)
        return InputError("a complete GGUF file", f"{path} is truncated or corrupt ({read_err})",
                          "download or extract it again (scripts/get-smollm2 replaces an incomplete copy)")
    return InputError("a GGUF checkpoint of an architecture transformers can read",
                      f"architecture {architecture!r} in {path} {said}",
                      "convert the original checkpoint to safetensors, or use a supported architecture (llama, ...)")


def _load_tokenizer(name: str, trust_remote_code: bool, **kwargs: Any) -> Any:
    """The tokenizer stored with a model, or ``None`` when there is none (random test models often have none)."""
    from transformers import AutoTokenizer

    path = Path(name)
    if not kwargs and path.is_dir() and not any((path / f).exists() for f in (
            "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
        return None
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError):
        return None
