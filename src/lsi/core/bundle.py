"""Bundles: a JSON file of metadata beside a safetensors file of tensors, written atomically, never pickled.

Results, lenses, steerings and key statistics save this way: ``path.json`` and ``path.safetensors`` share a base
name. The two atomic writers underneath serve any JSON or safetensors file (e.g. the activation store's shards).

Example:
    >>> import tempfile, torch
    >>> d = tempfile.mkdtemp()
    >>> _ = save_bundle(f"{d}/thing", {"w": torch.ones(2)}, {"format": 1, "kind": "demo"})
    >>> tensors, meta = load_bundle(f"{d}/thing.json", what="a demo bundle", fix="save it first", format=1)
    >>> meta["kind"], tensors["w"].tolist()
    ('demo', [1.0, 1.0])
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from lsi.errors import InputError


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON through a temporary file and a rename (no reader sees half a file);
    returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, target)
    return target


def save_tensors_atomic(path: str | Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``tensors`` (detached, on the CPU, contiguous) as safetensors through a temporary file and a rename;
    returns the path."""
    from safetensors.torch import save_file

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, target)
    return target


BUNDLE_SUFFIXES = (".json", ".safetensors")


def bundle_files(path: str | Path) -> tuple[Path, Path]:
    """``(path.json, path.safetensors)``. Only a ``.json`` / ``.safetensors`` suffix is replaced; any other dot
    belongs to the name (``runs/alpha0.5`` -> ``runs/alpha0.5.json``).

    Example:
        >>> [p.name for p in bundle_files("runs/alpha0.5")], [p.name for p in bundle_files("runs/lens.json")]
        (['alpha0.5.json', 'alpha0.5.safetensors'], ['lens.json', 'lens.safetensors'])
    """
    given = Path(path)
    base = given.with_suffix("") if given.suffix in BUNDLE_SUFFIXES else given
    json_file, tensors_file = (base.with_name(base.name + suffix) for suffix in BUNDLE_SUFFIXES)
    return json_file, tensors_file


def save_bundle(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``path.safetensors`` then ``path.json`` (each atomically; see :func:`bundle_files`); returns the JSON
    path."""
    json_file, tensors_file = bundle_files(path)
    save_tensors_atomic(tensors_file, tensors)
    return write_json_atomic(json_file, meta)


def load_bundle(path: str | Path, *, what: str, fix: str, format: int) -> tuple[dict[str, torch.Tensor],
                                                                               dict[str, Any]]:
    """Read a bundle written by :func:`save_bundle` (``path`` with or without a suffix); refuses missing files and
    another ``format`` version. ``what`` and ``fix`` word the errors."""
    from safetensors.torch import load_file

    json_file, tensors_file = bundle_files(path)
    missing = [str(p) for p in (json_file, tensors_file) if not p.exists()]
    if missing:
        raise InputError(f"{what} (a .json and a .safetensors file)", f"missing {missing}", fix)
    meta = json.loads(json_file.read_text())
    if meta.get("format") != format:
        raise InputError(f"{what} in format {format}", f"format {meta.get('format')!r}",
                         "re-create it with this version of lsi")
    return load_file(str(tensors_file)), meta
