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
from safetensors import SafetensorError
from torch import nn

from lsi.arch.spec import ArchSpec
from lsi.core.model import LanguageModel
from lsi.errors import AttentionImplementationError, CheckpointError, InputError

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

    A local checkpoint must hold every weight the model has, and only those, with the model's shapes: anything
    else raises :class:`~lsi.errors.CheckpointError` listing the keys (HF would fill the gaps with random
    weights). Weights are read from safetensors only; a pickle-only checkpoint (``.bin`` / ``.pt``) is refused.

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
    _check_tokenizer(tokenizer)
    device = _device(device)
    hf_model: Any
    if isinstance(model, nn.Module):
        hf_model = model if device is None else model.to(device)
    elif isinstance(model, str | Path):
        if device is not None and device_map is not None:
            raise InputError("device or device_map", "both", "pass one of them")
        kwargs: dict[str, Any] = dict(trust_remote_code=trust_remote_code, **from_pretrained_kwargs)
        if dtype is not None:
            kwargs["dtype"] = _dtype(dtype)
        if device_map is not None:
            kwargs["device_map"] = device_map
        if attn_implementation is not None:
            kwargs["attn_implementation"] = _attn_implementation(attn_implementation)
        gguf = _find_gguf(model, kwargs.pop("gguf_file", None))
        hf_model = _from_gguf(gguf, kwargs) if gguf is not None else _from_pretrained(str(model), kwargs)
        if device is not None:
            hf_model = hf_model.to(device)
        if tokenizer is None:
            tokenizer = (_load_tokenizer(str(gguf.parent), trust_remote_code, gguf_file=gguf.name) if gguf is not None
                         else _load_tokenizer(str(model), trust_remote_code))
    else:
        raise InputError("a hub id, a model directory, a .gguf file or a PreTrainedModel", repr(model),
                         'pass where the model is, e.g. lsi.load("../shared/models/stories260k")')
    return LanguageModel(hf_model, tokenizer, spec=spec, verify=verify)


def _check_tokenizer(tokenizer: Any) -> None:
    if isinstance(tokenizer, str | Path):
        raise InputError("a tokenizer object (or None: the tokenizer stored with the model)",
                         f"the string {str(tokenizer)!r}",
                         f"load it first: tokenizer=AutoTokenizer.from_pretrained({str(tokenizer)!r})")


def _device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a ``torch.device``, refused when misspelled or absent from this machine.

    Example:
        >>> _device("cpu")
        device(type='cpu')
    """
    if device is None:
        return None
    try:
        found = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise InputError("a device such as 'cpu', 'cuda', 'cuda:1' or 'mps'", repr(device),
                         "check the spelling, e.g. device='cuda'") from err
    available = {"cpu": True, "meta": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}
    if not available.get(found.type, True):
        raise InputError(f"a device this machine has ({found.type} is not available here)", repr(device),
                         "pass device='cpu', or run where that accelerator and a torch build for it are installed")
    if found.type == "cuda" and found.index is not None and found.index >= torch.cuda.device_count():
        raise InputError(f"a CUDA device index below {torch.cuda.device_count()}", repr(device),
                         "pick an existing GPU, e.g. device='cuda:0'")
    return found


def _attn_implementation(name: str) -> str:
    """``name`` when transformers knows it (hub kernels ``org/repo`` and ``paged|...`` forms go through)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = ["eager", *ALL_ATTENTION_FUNCTIONS.keys()]
    if name in known or "/" in name or "|" in name:
        return name
    raise AttentionImplementationError(f"an attention implementation in {known}", repr(name),
                                       "e.g. attn_implementation='eager' (needed for attention patterns) or 'sdpa'")


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_local(path: Path) -> None:
    """Refuse, before transformers reads anything, a local path that is a file or holds only pickled weights."""
    if path.is_file():
        raise InputError("a model directory (holding config.json and model.safetensors) or a .gguf file",
                         f"the file {path}", f"pass its directory: lsi.load({str(path.parent)!r})")
    if not path.is_dir():
        return
    if any(path.glob("*.safetensors")) or any(path.glob("*.safetensors.index.json")):
        return
    pickled = sorted(f.name for f in path.iterdir() if f.suffix in _PICKLE_SUFFIXES)
    if pickled:
        raise CheckpointError(f"weights in safetensors files in {path}", f"only pickled weights: {pickled}",
                              "convert them to safetensors once in a trusted environment "
                              "(AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir)); lsi never unpickles")


def _from_pretrained(name: str, kwargs: dict[str, Any]) -> Any:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    _check_local(Path(name))
    kwargs = {"use_safetensors": True, **kwargs, "output_loading_info": True, "ignore_mismatched_sizes": True}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the load report is raised below as a typed error
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except SafetensorError as err:
        raise CheckpointError(f"complete safetensors weight files in {name}", f"a truncated or corrupt file ({err})",
                              "copy or download the checkpoint again") from err
    except (OSError, ValueError) as err:
        raise InputError("a model directory with config.json and weights, a .gguf file, or a reachable hub id",
                         repr(name), f"check the path (HF said: {str(err).splitlines()[0]})") from err
    finally:
        hf_logging.set_verbosity(verbosity)
    model, info = loaded  # output_loading_info=True
    _check_loading_info(name, info)
    return model


def _check_loading_info(name: str, info: dict[str, Any]) -> None:
    """Raise :class:`CheckpointError` unless every weight came from the checkpoint with the model's shape.

    Example:
        >>> _check_loading_info("ckpt", {"missing_keys": {"lm_head.weight"}, "unexpected_keys": set(),
        ...                              "mismatched_keys": set()})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        lsi.errors.CheckpointError: expected a checkpoint holding ...; found missing ['lm_head.weight']. Fix: ...
    """
    problems = [f"missing {sorted(info['missing_keys'])}" if info["missing_keys"] else "",
                f"unexpected {sorted(info['unexpected_keys'])}" if info["unexpected_keys"] else "",
                "wrong shape " + ", ".join(f"{key} (checkpoint {tuple(ckpt)}, model {tuple(model)})"
                                           for key, ckpt, model in sorted(info["mismatched_keys"]))
                if info["mismatched_keys"] else ""]
    if any(problems):
        raise CheckpointError(
            f"a checkpoint holding every weight of the model in {name}, with the model's shapes, and nothing else",
            "; ".join(p for p in problems if p),
            "use the checkpoint written with this config.json (a damaged or mixed-up copy loads random weights "
            "where keys are missing); copy it again or fix the config")


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
