"""The activation store knows what it holds: other data or settings are refused, lost or damaged shards are
written again on a rerun, and a run killed at any moment resumes to the same store as an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from badinput_checks import refuse
from safetensors.torch import load_file

import lsi
from lsi.errors import InputError, StoreError
from lsi.testing import tiny_model

pytestmark = pytest.mark.integration
DATA = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16]]
SITE = "blocks.0.resid_post"


def _snapshot(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


def _columns(path: Path) -> dict[str, torch.Tensor]:
    store = lsi.ActivationStore(path)
    return {name: store.load(name) for name in (*store.sites, "example", "position")}


def _assert_same_store(a: Path, b: Path) -> None:
    ca, cb = _columns(a), _columns(b)
    assert ca.keys() == cb.keys()
    assert all(torch.equal(ca[k], cb[k]) for k in ca)
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert ma == mb
    files = [s["file"] for s in ma["shards"]]
    assert len(files) == len(set(files))  # nothing duplicated
    assert not list(a.glob("*.tmp")) and not list(b.glob("*.tmp"))


@pytest.fixture
def written(tiny_lm, tmp_path) -> Path:
    out = tmp_path / "store"
    lsi.cache_to_disk(tiny_lm("llama"), DATA, SITE, out, batch_size=2)
    return out


@pytest.mark.parametrize("other", [
    [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 17]],  # one token changed
    [[8, 9], [5, 6, 7], [10, 11, 12, 13], [14], [15, 16]],  # the same rows in another order
    [[5, 6], [7, 8, 9], [10, 11, 12, 13], [14], [15, 16]],  # the same tokens split otherwise
], ids=["one-token", "reordered", "resplit"])
def test_resume_with_other_data_of_the_same_length(tiny_lm, written, other):
    lm = tiny_lm("llama")
    before = _snapshot(written)
    with refuse(StoreError, model=lm.model, match="same length"):
        lsi.cache_to_disk(lm, other, SITE, written, batch_size=2)
    assert _snapshot(written) == before


def test_resume_of_texts_under_another_tokenizer(fresh_lm, char_tokenizer, tmp_path):
    from core_helpers import PrintableTokenizer

    texts = ["abc", "de", "fgh"]
    lsi.cache_to_disk(fresh_lm("llama", tokenizer=char_tokenizer), texts, SITE, tmp_path, batch_size=2)
    other = fresh_lm("llama", tokenizer=PrintableTokenizer())
    with refuse(StoreError, model=other.model, match="tokenizer"):
        lsi.cache_to_disk(other, texts, SITE, tmp_path, batch_size=2)


@pytest.mark.parametrize(("change", "key"), [
    ({"sites": "blocks.1.resid_post"}, "sites"),
    ({"batch_size": 3}, "batch_size"),
    ({"positions": "last"}, "positions"),
    ({"dtype": torch.float16}, "dtype"),
    ({"dataset": [*DATA, [3]]}, "n_examples"),
])
def test_resume_with_other_settings(tiny_lm, written, change, key):
    lm = tiny_lm("llama")
    args = {"dataset": DATA, "sites": SITE, "batch_size": 2, **change}
    before = _snapshot(written)
    with refuse(StoreError, model=lm.model, match=f"same settings.*found .*{key}"):
        lsi.cache_to_disk(lm, args.pop("dataset"), args.pop("sites"), written, **args)
    assert _snapshot(written) == before


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool, "float16"])
def test_integer_or_non_dtype_is_refused(tiny_lm, tmp_path, dtype):
    lm = tiny_lm("llama")
    with refuse(InputError, model=lm.model, match="floating dtype"):
        lsi.cache_to_disk(lm, DATA, SITE, tmp_path / "s", dtype=dtype)
    assert not (tmp_path / "s").exists()


def test_batch_size_below_one(tiny_lm, tmp_path):
    with refuse(InputError, match="batch_size >= 1"):
        lsi.cache_to_disk(tiny_lm("llama"), DATA, SITE, tmp_path, batch_size=0)


@pytest.mark.parametrize("where", ["a-file", "under-a-file"])
def test_out_dir_that_cannot_take_files(tiny_lm, tmp_path, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = blocker if where == "a-file" else blocker / "store"
    with refuse(StoreError, match="can be written to"):
        lsi.cache_to_disk(tiny_lm("llama"), DATA, SITE, out)
    assert blocker.read_text() == "x"


@pytest.mark.parametrize(("text", "phrase"), [
    ('{"schema": 2, "settings": {', "unreadable JSON"),
    ("[1, 2]", "manifest object"),
    ('{"schema": 2, "settings": {}}', "manifest object"),
    ('{"schema": 1, "settings": {}, "shards": []}', "store schema 2"),
    ("\xff\xfe", "unreadable JSON"),
], ids=["truncated", "list", "missing-key", "old-schema", "binary"])
def test_tampered_manifest(tiny_lm, written, text, phrase):
    (written / "manifest.json").write_bytes(text.encode("latin-1"))
    with refuse(StoreError, match=phrase):
        lsi.ActivationStore(written)
    with refuse(StoreError, match=phrase):
        lsi.cache_to_disk(tiny_lm("llama"), DATA, SITE, written, batch_size=2)


def test_damaged_shard_is_refused_when_read(written):
    shard = written / "shard_000001.safetensors"
    shard.write_bytes(shard.read_bytes()[:40])
    with refuse(StoreError, match="rerun cache_to_disk"):
        lsi.ActivationStore(written).load(SITE)


@pytest.mark.parametrize("loss", ["lost-shard", "damaged-shard", "shard-without-entry", "stale-tmp"])
def test_rerun_repairs_from_what_is_on_disk(tiny_lm, written, tmp_path, loss):
    lm = tiny_lm("llama")
    reference = tmp_path / "reference"
    lsi.cache_to_disk(lm, DATA, SITE, reference, batch_size=2)
    shard = written / "shard_000001.safetensors"
    if loss == "lost-shard":
        shard.unlink()
        with pytest.raises(StoreError, match="resume"):
            lsi.ActivationStore(written)
    elif loss == "damaged-shard":
        shard.write_bytes(shard.read_bytes()[:100])
    elif loss == "shard-without-entry":  # killed between writing a shard and the manifest
        manifest = json.loads((written / "manifest.json").read_text())
        manifest["shards"] = manifest["shards"][:1]
        (written / "manifest.json").write_text(json.dumps(manifest))
    else:
        (written / "shard_000002.safetensors.tmp").write_bytes(b"half")
    lsi.cache_to_disk(lm, DATA, SITE, written, batch_size=2)
    _assert_same_store(written, reference)


_KILL_DATA = [[(7 * i + j) % 90 + 3 for j in range(1 + i % 5)] for i in range(60)]
_KILL_SITES = ["blocks.0.resid_post", "blocks.1.mlp.post"]
_CHILD = f"""
import sys, time
import torch
import lsi
from lsi.testing import tiny_model


torch.set_num_threads(1)
lm = lsi.LanguageModel(tiny_model("llama"))
lm.model.model.layers[0].register_forward_hook(lambda *args: time.sleep(0.05))  # slow enough to kill midway
lsi.cache_to_disk(lm, {_KILL_DATA!r}, {_KILL_SITES!r}, sys.argv[1], batch_size=2)
"""


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_store(tmp_path):
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(killed)], env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait for a few shards, then kill without warning
        manifest = killed / "manifest.json"
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 4:
            break
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    shards = json.loads((killed / "manifest.json").read_text())["shards"]
    assert 4 <= len(shards) < 30, "the run was not interrupted midway"
    with pytest.raises(StoreError, match="resume"):
        lsi.ActivationStore(killed)
    lm = lsi.LanguageModel(tiny_model("llama"))  # the child's model (tiny models are seeded)
    for out in (killed, reference):
        lsi.cache_to_disk(lm, _KILL_DATA, _KILL_SITES, out, batch_size=2)
    _assert_same_store(killed, reference)
    assert load_file(str(killed / "shard_000000.safetensors")).keys() == {
        "example", "position", "blocks.0.resid_post", "blocks.1.mlp.post"}
