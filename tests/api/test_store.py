"""Streaming activations to disk and reading them back."""

import json

import pytest
import torch

import lsi
from lsi.errors import InputError, StoreError

pytestmark = pytest.mark.integration
DATA = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14], [15, 16]]


def test_store_equals_unbatched_runs(tiny_lm, tmp_path):
    lm = tiny_lm("llama")
    store = lsi.cache_to_disk(lm, DATA, ["blocks.*.resid_post", "blocks.0.mlp.post"], tmp_path, batch_size=2)
    assert store.n_rows == sum(len(r) for r in DATA)
    examples, positions = store.load("example"), store.load("position")
    for i, row in enumerate(DATA):
        alone = lm.run_with_cache([row], ["blocks.1.resid_post", "blocks.0.mlp.post"])
        assert positions[examples == i].tolist() == list(range(len(row)))
        for site in ("blocks.1.resid_post", "blocks.0.mlp.post"):
            torch.testing.assert_close(store.load(site)[examples == i], alone[site][0], atol=1e-5, rtol=0)


def test_store_positions_last_and_shards_bounded_by_batch(tiny_lm, tmp_path):
    lm = tiny_lm("gpt2")
    store = lsi.cache_to_disk(lm, DATA, "blocks.0.resid_post", tmp_path, batch_size=2, positions="last")
    assert store.load("position").tolist() == [len(r) - 1 for r in DATA]
    assert [t.shape[0] for t in store.iter_shards("blocks.0.resid_post")] == [2, 2, 1]


def test_store_resumes_and_refuses_other_settings(tiny_lm, tmp_path):
    lm = tiny_lm("llama")
    lsi.cache_to_disk(lm, DATA, "blocks.0.resid_post", tmp_path, batch_size=2)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    # simulate an interrupted run: forget the last shard
    (tmp_path / manifest["shards"][-1]["file"]).unlink()
    manifest["shards"] = manifest["shards"][:-1]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="resume"):
        lsi.ActivationStore(tmp_path)
    resumed = lsi.cache_to_disk(lm, DATA, "blocks.0.resid_post", tmp_path, batch_size=2)
    assert resumed.n_rows == sum(len(r) for r in DATA)
    with pytest.raises(StoreError, match="same settings"):
        lsi.cache_to_disk(lm, DATA, "blocks.1.resid_post", tmp_path, batch_size=2)


def test_store_refuses_patterns_and_empty_data(tiny_lm, tmp_path):
    lm = tiny_lm("llama")
    with pytest.raises(InputError, match="key axis"):
        lsi.cache_to_disk(lm, DATA, "blocks.0.attn.pattern", tmp_path)
    with pytest.raises(InputError, match="non-empty"):
        lsi.cache_to_disk(lm, [], "blocks.0.resid_post", tmp_path)
