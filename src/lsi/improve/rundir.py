"""A run directory ``runs/NAME/``: what was run, every intermediate result, the metrics and the export.

Layout: ``run.json`` (the manifest: scenario, recipe, model, config, data hashes, versions, seed, steps with
timings), ``steps/NAME.json`` (+ ``steps/NAME.safetensors``) per finished step, ``result.json`` (the
:class:`~lsi.improve.record.Result`), ``export/`` (a checkpoint) and ``report.html``. Every file is written
atomically. Opening an existing directory with the same recipe, model, config, data and seed resumes it: finished
steps are read back instead of recomputed, so an interrupted run continues from its last finished step.

Example:
    >>> import tempfile
    >>> d = RunDirectory.open(Path(tempfile.mkdtemp()) / "r", Identity("demo", "demo", "m", {"seed": 0}, {}))
    >>> d.step("count", lambda: Checkpoint({"n": 3})).data
    {'n': 3}
    >>> d.step("count", lambda: Checkpoint({"n": 4})).data  # finished: read back, not recomputed
    {'n': 3}
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from lsi.core.bundle import save_tensors_atomic, write_json_atomic
from lsi.errors import InputError

MANIFEST = "run.json"
RESULT = "result.json"
SCHEMA = 1
_SAME = ("scenario", "recipe", "model", "config", "data")  # what must match to resume


@dataclass(frozen=True)
class Identity:
    """What a run is: resuming requires all of it to be equal (the seed lives in ``config``)."""

    scenario: str
    recipe: str
    model: str
    config: Mapping[str, Any]
    data: Mapping[str, str]  # data set name -> sha256


@dataclass
class Checkpoint:
    """A step's output: JSON-able ``data`` and named tensors."""

    data: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


def sha256_file(path: str | Path) -> str:
    """The sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(data: Any) -> str:
    """The sha256 of ``data`` as canonical JSON (sorted keys): the hash of a data set held in memory."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def versions() -> dict[str, str]:
    """The versions a result depends on."""
    import transformers

    from lsi import __version__

    return {"lsi": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


class RunDirectory:
    """An open run directory (see the module docstring)."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | Path, identity: Identity, *, description: str = "", restart: bool = False,
             model_info: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> RunDirectory:
        """Create ``path`` for a new run, or resume the run already there (same :class:`Identity`).

        ``restart=True`` deletes what an earlier run left. The manifest's ``model`` is ``{"spec": identity.model,
        **model_info}`` (e.g. the family and dimensions); ``extra`` adds top-level entries. Raises
        :class:`InputError` when ``path`` holds another run.
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise InputError("a directory for the run", f"a file at {path}", "choose another --out")
        if restart and path.exists():
            shutil.rmtree(path)
        wanted = {k: json.loads(json.dumps(v)) for k, v in asdict(identity).items()}
        manifest_file = path / MANIFEST
        if manifest_file.exists():
            manifest = cls._read_manifest(manifest_file)
            found = {**manifest, "model": (manifest.get("model") or {}).get("spec")}
            differ = [k for k in _SAME if found.get(k) != wanted[k]]
            if differ:
                raise InputError(f"the run in {path} to be the same run (to resume it)",
                                 "a different " + ", ".join(differ),
                                 "pass another --out, or --restart to replace the earlier run")
            manifest["finished"] = None
        else:
            if path.exists() and any(path.iterdir()):
                raise InputError("a new or empty directory, or an earlier run's directory", f"{path} with other files",
                                 "choose another --out")
            manifest = {"schema": SCHEMA, "name": path.name, **wanted,
                        "model": {"spec": identity.model, **(dict(model_info) if model_info else {})},
                        "description": description,
                        **(dict(extra) if extra else {}), "versions": versions(),
                        "seed": wanted["config"].get("seed"), "started": _now(), "finished": None, "steps": []}
        run = cls(path, manifest)
        run._save_manifest()
        return run

    @staticmethod
    def _read_manifest(file: Path) -> dict[str, Any]:
        try:
            manifest = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise InputError(f"a valid manifest {file}", f"a corrupt file ({err})",
                             "pass --restart to start the run over") from err
        if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
            raise InputError(f"a run manifest of schema {SCHEMA}", f"{file} (schema "
                             f"{manifest.get('schema') if isinstance(manifest, dict) else None!r})",
                             "pass --restart to start the run over with this version of lsi")
        return manifest

    def _save_manifest(self) -> None:
        write_json_atomic(self.path / MANIFEST, self.manifest)

    def _step_files(self, name: str) -> tuple[Path, Path]:
        return self.path / "steps" / f"{name}.json", self.path / "steps" / f"{name}.safetensors"

    def done(self, name: str) -> bool:
        """Whether step ``name`` finished (its files are complete on disk)."""
        return self._step_files(name)[0].exists()

    def step(self, name: str, compute: Callable[[], Checkpoint]) -> Checkpoint:
        """Step ``name``'s checkpoint: read back when it finished earlier, else ``compute()`` it and write it
        (tensors first, then the JSON that marks the step finished)."""
        data_file, tensor_file = self._step_files(name)
        if data_file.exists():
            from safetensors.torch import load_file

            record = json.loads(data_file.read_text())
            tensors = load_file(str(tensor_file)) if record["tensors"] else {}
            return Checkpoint(record["data"], tensors)
        start = time.perf_counter()
        checkpoint = compute()
        if checkpoint.tensors:
            save_tensors_atomic(tensor_file, checkpoint.tensors)
        write_json_atomic(data_file, {"data": checkpoint.data, "tensors": sorted(checkpoint.tensors)})
        seconds = round(time.perf_counter() - start, 2)
        self.manifest["steps"] = [s for s in self.manifest["steps"] if s["name"] != name]
        self.manifest["steps"].append({"name": name, "status": "done", "seconds": seconds})
        self._save_manifest()
        return checkpoint

    def file(self, relative: str) -> Path:
        """A path inside the run directory."""
        return self.path / relative

    def write_result(self, result_json: Mapping[str, Any]) -> Path:
        """Write ``result.json`` and mark the run finished."""
        out = write_json_atomic(self.path / RESULT, result_json)
        self.manifest["finished"] = _now()
        self._save_manifest()
        return out
