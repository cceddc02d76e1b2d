"""Streaming activations of a large dataset to disk (safetensors shards) with memory bounded by one batch.

Each shard holds, per site, the values of the real (non-padding) tokens of one batch flattened to
``[n_tokens, ...]``, plus ``example`` (dataset index) and ``position`` (real-token index) columns. Shards and
the manifest are written atomically; rerunning with the same arguments resumes, computing again only the shards
that are not complete on disk. The manifest records a fingerprint of the inputs, so other data is refused.

Example:
    >>> import lsi, tempfile
    >>> from lsi.testing import tiny_model
    >>> lm = lsi.LanguageModel(tiny_model("llama"))
    >>> store = cache_to_disk(lm, [[1, 2, 3], [4, 5]], "blocks.0.resid_post", tempfile.mkdtemp(), batch_size=1)
    >>> tuple(store.load("blocks.0.resid_post").shape), store.load("example").tolist()
    ((5, 32), [0, 0, 0, 1, 1])
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file

from lsi.core.bundle import save_tensors_atomic, write_json_atomic
from lsi.core.identity import ModelIdentity
from lsi.core.inputs import Batch
from lsi.core.positions import PositionSpec, as_positions
from lsi.core.sites import Site
from lsi.errors import InputError, StoreError

if TYPE_CHECKING:
    from lsi.core.model import LanguageModel, SiteSpec

MANIFEST = "manifest.json"
SCHEMA_VERSION = 2  # 2: settings hold a fingerprint of the inputs
_INDEX_COLUMNS = ("example", "position")


def _flatten(cache_value: torch.Tensor, keep: torch.Tensor, axis: int) -> torch.Tensor:
    return cache_value.movedim(axis, 1)[keep.to(cache_value.device)]


def inputs_fingerprint(batches: Sequence[Batch]) -> str:
    """A short hash of the token ids (real tokens only, row by row) of ``batches``: texts count as what the
    tokenizer made of them, so another tokenizer or the same texts in another order give another fingerprint.

    Example:
        >>> from lsi.core.inputs import to_batch
        >>> a = to_batch([[5, 6], [7]], tokenizer=None, padding_side="right", pad_id=0)
        >>> b = to_batch([[7], [5, 6]], tokenizer=None, padding_side="left", pad_id=0)
        >>> inputs_fingerprint([a]) == inputs_fingerprint([b]), len(inputs_fingerprint([a]))
        (False, 16)
    """
    digest = hashlib.sha256()
    for batch in batches:
        ids, mask = batch.input_ids.cpu(), batch.attention_mask.cpu().bool()
        for row, real in zip(ids, mask, strict=True):
            tokens = row[real].numpy().astype("<i8")
            digest.update(len(tokens).to_bytes(8, "little") + tokens.tobytes())
    return digest.hexdigest()[:16]


def _prepare_dir(out: Path) -> None:
    """Create ``out`` and check that it takes files, before any work; drop temporary files of a killed run."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / "write-test.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise StoreError("a directory the store can be written to", f"{out} ({err.strerror or err})",
                         "pass another out_dir, or fix its permissions") from err
    for stale in out.glob("*.tmp"):
        stale.unlink()


def _shard_complete(path: Path, entry: dict[str, Any], columns: list[str]) -> bool:
    """Whether ``path`` is a readable shard with ``columns`` and the rows its manifest entry says."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return False
    try:
        with safe_open(str(path), "pt") as f:
            return sorted(f.keys()) == sorted(columns) and f.get_slice("example").get_shape()[0] == entry["rows"]
    except (SafetensorError, OSError):
        return False


def cache_to_disk(lm: LanguageModel, dataset: Sequence[Any], sites: SiteSpec, out_dir: str | Path, *,
                  batch_size: int = 8, positions: PositionSpec = None,
                  dtype: torch.dtype | None = None) -> ActivationStore:
    """Run ``dataset`` (texts or token-id lists) in batches and write the sites' activations to ``out_dir``.

    The manifest records the settings and a fingerprint of the inputs (:func:`inputs_fingerprint`). Rerunning
    with the same arguments resumes: shards that are on disk and complete are kept, the others (never written,
    lost, damaged) are computed again; other data or settings are refused. ``dtype`` (a floating dtype) casts
    the stored values. The whole dataset is tokenized first (token ids only; activations stay one batch).
    """
    concrete = lm.resolve_sites(sites)
    if any(s.kind == "attn.pattern" for s in concrete):
        raise InputError("sites with a fixed per-token shape", "attn.pattern (its key axis grows with the text)",
                         "stream attn.q / attn.k and rebuild patterns per example, or use run_with_cache")
    if len(dataset) == 0:
        raise InputError("a non-empty dataset", "0 examples", "pass a list of texts or token-id lists")
    if batch_size < 1:
        raise InputError("batch_size >= 1", str(batch_size), "pass a positive batch size, e.g. batch_size=8")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise InputError("a floating dtype for the stored values (or None: the model's own)", repr(dtype),
                         "e.g. dtype=torch.float16; integer dtypes would truncate activations")
    batches = [lm.to_batch(list(dataset[start:start + batch_size])) for start in range(0, len(dataset), batch_size)]
    out = Path(out_dir)
    _prepare_dir(out)
    settings = {"sites": [str(s) for s in concrete], "positions": str(as_positions(positions)),
                "batch_size": batch_size, "n_examples": len(dataset), "inputs": inputs_fingerprint(batches),
                **ModelIdentity.of(lm).to_json(), "dtype": str(dtype) if dtype else None}
    manifest_path = out / MANIFEST
    manifest = _read_manifest(manifest_path) if manifest_path.exists() else None
    if manifest is not None:
        _check_resume(out, manifest, settings, lm)
    columns = [*_INDEX_COLUMNS, *settings["sites"]]
    shards = {} if manifest is None else {e["file"]: e for e in manifest["shards"]
                                          if _shard_complete(out / e["file"], e, columns)}
    for index, batch in enumerate(batches):
        name = f"shard_{index:06d}.safetensors"
        if name in shards:
            continue
        start = index * batch_size
        tensors = _shard(lm, batch, concrete, start, positions, dtype)
        save_tensors_atomic(out / name, tensors)
        shards[name] = {"file": name, "examples": [start, start + batch.input_ids.shape[0]],
                        "rows": int(tensors["example"].shape[0])}
        write_json_atomic(manifest_path, {"schema": SCHEMA_VERSION, "settings": settings,
                                          "shards": [shards[k] for k in sorted(shards)]})
    return ActivationStore(out)


def _shard(lm: LanguageModel, batch: Batch, concrete: list[Site], start: int, positions: PositionSpec,
           dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """One shard's tensors: the index columns and each site's values at the kept (real, selected) tokens."""
    cache = lm.run_with_cache(batch, concrete, positions=positions, device="cpu")
    mask = cache.attention_mask.bool().cpu()  # type: ignore[union-attr]
    real_index = mask.long().cumsum(1) - 1
    if cache.positions is None:
        keep = mask
    else:
        keep = torch.zeros_like(mask)
        keep.scatter_(1, cache.positions.cpu(), True)
    tensors = {"example": (torch.arange(mask.shape[0])[:, None] + start).expand_as(mask)[keep].clone(),
               "position": real_index[keep].clone()}
    for s in concrete:
        value = cache[s]
        if cache.positions is not None:  # gathered values: scatter back into a [b, p, ...] grid first
            grid = value.new_zeros((mask.shape[0], mask.shape[1], *value.shape[2:]))
            grid[torch.arange(mask.shape[0])[:, None], cache.positions.cpu()] = value
            value = grid
        flat = _flatten(value, keep, s.info.position_axis)
        tensors[str(s)] = (flat.to(dtype) if dtype else flat).contiguous()
    return tensors


def _check_resume(out: Path, manifest: dict[str, Any], settings: dict[str, Any], lm: LanguageModel) -> None:
    """Refuse to add to a store in ``out`` written for another model, other inputs or other settings."""
    old = manifest["settings"]
    ModelIdentity.from_json(old).check(lm, f"the model of the existing store in {out}, written for",
                                       "use a new out_dir, or the model the store was written with")
    if old.get("inputs") != settings["inputs"] and old.get("n_examples") == settings["n_examples"]:
        raise StoreError(f"the inputs the store in {out} was written from (fingerprint {old.get('inputs')})",
                         f"other inputs of the same length (fingerprint {settings['inputs']})",
                         "pass the same data in the same order (and the same tokenizer), or use a new out_dir")
    differ = sorted(k for k in old.keys() | settings.keys() if old.get(k) != settings.get(k))
    if differ:
        found = "; ".join(f"{k}: {old.get(k)!r} then, {settings.get(k)!r} now" for k in differ)
        raise StoreError(f"an existing store written with the same settings in {out}", found,
                         "use a new out_dir or the original arguments")


def _read_manifest(path: Path) -> dict[str, Any]:
    """The manifest at ``path``, refused unless it is a store manifest of this schema."""
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(f"a JSON manifest in {path}", f"unreadable JSON ({err})",
                         "delete the store directory and write it again") from err
    if not isinstance(manifest, dict) or not {"schema", "settings", "shards"} <= manifest.keys():
        found = f"keys {sorted(manifest)}" if isinstance(manifest, dict) else type(manifest).__name__
        raise StoreError(f"a manifest object with schema, settings and shards in {path}", found,
                         "delete the store directory and write it again")
    if manifest["schema"] != SCHEMA_VERSION:
        raise StoreError(f"store schema {SCHEMA_VERSION} in {path}", repr(manifest["schema"]),
                         "write the store again with this version of lsi (into a new out_dir)")
    return manifest


class ActivationStore:
    """Read back a store written by :func:`cache_to_disk` (refuses incomplete stores)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.exists():
            raise StoreError(f"{MANIFEST} in {self.path}", "no manifest", "write the store with lsi.cache_to_disk")
        self.manifest = _read_manifest(manifest_path)
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
        from safetensors import SafetensorError

        key = self._column(name)
        for shard in self.manifest["shards"]:
            path = self.path / shard["file"]
            try:
                tensors = load_file(str(path))
            except (SafetensorError, OSError) as err:
                raise StoreError(f"a complete shard file {path}", f"an unreadable file ({err})",
                                 "rerun cache_to_disk with the same arguments: it writes damaged shards again") from err
            yield tensors[key]

    def load(self, name: str | Site) -> torch.Tensor:
        """All rows of a site (or an index column) concatenated: ``[n_rows, ...]``."""
        return torch.cat(list(self.iter_shards(name)))
