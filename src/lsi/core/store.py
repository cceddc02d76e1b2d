"""Streaming activations of a large dataset to disk (safetensors shards) with memory bounded by one batch.

Each shard holds, per site, the values of the real (non-padding) tokens of one batch flattened to
``[n_tokens, ...]``, plus ``example`` (dataset index) and ``position`` (real-token index) columns. Shards and
the manifest are written atomically; rerunning with the same arguments resumes after the last complete shard.

Example:
    >>> import lsi, tempfile
    >>> from lsi.testing import tiny_model
    >>> lm = lsi.LanguageModel(tiny_model("llama"))
    >>> store = cache_to_disk(lm, [[1, 2, 3], [4, 5]], "blocks.0.resid_post", tempfile.mkdtemp(), batch_size=1)
    >>> tuple(store.load("blocks.0.resid_post").shape), store.load("example").tolist()
    ((5, 32), [0, 0, 0, 1, 1])
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from lsi.core.bundle import save_tensors_atomic, write_json_atomic
from lsi.core.identity import ModelIdentity
from lsi.core.positions import PositionSpec, as_positions
from lsi.core.sites import Site
from lsi.errors import InputError, StoreError

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel, SiteSpec

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
_INDEX_COLUMNS = ("example", "position")


def _flatten(cache_value: torch.Tensor, keep: torch.Tensor, axis: int) -> torch.Tensor:
    return cache_value.movedim(axis, 1)[keep.to(cache_value.device)]


def cache_to_disk(lm: LanguageModel, dataset: Sequence[Any], sites: SiteSpec, out_dir: str | Path, *,
                  batch_size: int = 8, positions: PositionSpec = None,
                  dtype: torch.dtype | None = None) -> ActivationStore:
    """Run ``dataset`` (texts or token-id lists) in batches and write the sites' activations to ``out_dir``."""
    concrete = lm.resolve_sites(sites)
    if any(s.kind == "attn.pattern" for s in concrete):
        raise InputError("sites with a fixed per-token shape", "attn.pattern (its key axis grows with the text)",
                         "stream attn.q / attn.k and rebuild patterns per example, or use run_with_cache")
    if len(dataset) == 0:
        raise InputError("a non-empty dataset", "0 examples", "pass a list of texts or token-id lists")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"sites": [str(s) for s in concrete], "positions": str(as_positions(positions)),
                "batch_size": batch_size, "n_examples": len(dataset), **ModelIdentity.of(lm).to_json(),
                "dtype": str(dtype) if dtype else None}
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    if manifest is not None:
        ModelIdentity.from_json(manifest["settings"]).check(
            lm, f"the model of the existing store in {out}, written for",
            "use a new out_dir, or the model the store was written with")
    if manifest is not None and manifest["settings"] != settings:
        raise StoreError(f"an existing store written with the same settings in {out}",
                         f"{manifest['settings']} vs {settings}", "use a new out_dir or the original arguments")
    if manifest is None:
        manifest = {"schema": SCHEMA_VERSION, "settings": settings, "shards": []}
    done = {s["file"] for s in manifest["shards"]}
    for start in range(0, len(dataset), batch_size):
        name = f"shard_{start // batch_size:06d}.safetensors"
        if name in done and (out / name).exists():
            continue
        items = list(dataset[start:start + batch_size])
        cache = lm.run_with_cache(items, concrete, positions=positions, device="cpu")
        mask = cache.attention_mask.bool().cpu()  # type: ignore[union-attr]
        real_index = mask.long().cumsum(1) - 1
        if cache.positions is None:
            keep = mask
        else:
            keep = torch.zeros_like(mask)
            keep.scatter_(1, cache.positions.cpu(), True)
        tensors = {"example": (torch.arange(len(items))[:, None] + start).expand_as(mask)[keep].clone(),
                   "position": real_index[keep].clone()}
        for s in concrete:
            value = cache[s]
            if cache.positions is not None:  # gathered values: scatter back into a [b, p, ...] grid first
                grid = value.new_zeros((mask.shape[0], mask.shape[1], *value.shape[2:]))
                grid[torch.arange(mask.shape[0])[:, None], cache.positions.cpu()] = value
                value = grid
            flat = _flatten(value, keep, s.info.position_axis)
            tensors[str(s)] = (flat.to(dtype) if dtype else flat).contiguous()
        save_tensors_atomic(out / name, tensors)
        manifest["shards"].append({"file": name, "examples": [start, start + len(items)],
                                   "rows": int(keep.sum())})
        write_json_atomic(manifest_path, manifest)
    return ActivationStore(out)


class ActivationStore:
    """Read back a store written by :func:`cache_to_disk` (refuses incomplete stores)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.exists():
            raise StoreError(f"{MANIFEST} in {self.path}", "no manifest", "write the store with lsi.cache_to_disk")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("schema") != SCHEMA_VERSION:
            raise StoreError(f"store schema {SCHEMA_VERSION}", str(self.manifest.get("schema")), "rewrite the store")
        settings = self.manifest["settings"]
        covered = sum(s["examples"][1] - s["examples"][0] for s in self.manifest["shards"])
        missing = [s["file"] for s in self.manifest["shards"] if not (self.path / s["file"]).exists()]
        if covered != settings["n_examples"] or missing:
            raise StoreError(f"a complete store of {settings['n_examples']} examples",
                             f"{covered} examples written, missing files {missing}",
                             "rerun cache_to_disk with the same arguments to resume")

    @property
    def model(self) -> ModelIdentity:
        """The model the store was written with (check another with ``store.model.check(lm, ...)``)."""
        return ModelIdentity.from_json(self.manifest["settings"])

    @property
    def sites(self) -> list[str]:
        return list(self.manifest["settings"]["sites"])

    @property
    def n_rows(self) -> int:
        return sum(int(s["rows"]) for s in self.manifest["shards"])

    def _column(self, name: str | Site) -> str:
        key = name if name in _INDEX_COLUMNS else str(Site.parse(name))
        if key not in (*self.sites, *_INDEX_COLUMNS):
            raise StoreError(f"one of {self.sites + list(_INDEX_COLUMNS)}", repr(key), "pick a stored site")
        return str(key)

    def iter_shards(self, name: str | Site) -> Iterator[torch.Tensor]:
        """One tensor per shard (memory bounded by a shard): a site's rows, or ``example`` / ``position``."""
        key = self._column(name)
        for shard in self.manifest["shards"]:
            yield load_file(str(self.path / shard["file"]))[key]

    def load(self, name: str | Site) -> torch.Tensor:
        """All rows of a site (or an index column) concatenated: ``[n_rows, ...]``."""
        return torch.cat(list(self.iter_shards(name)))
