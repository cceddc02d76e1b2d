"""Loading refuses damaged, incomplete, pickled or misnamed checkpoints and bad options, before any work."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import torch
from badinput_checks import refuse
from core_helpers import FAMILIES
from safetensors.torch import load_file, save_file

import lsi
from lsi.core.selfcheck import self_check
from lsi.errors import AttentionImplementationError, CheckpointError, InputError
from lsi.testing import tiny_model

pytestmark = pytest.mark.unit
DOWN = "model.layers.0.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "llama"
    tiny_model("llama").save_pretrained(path)
    return path


def _variant(saved: Path, tmp_path: Path, edit) -> Path:
    """A copy of the saved checkpoint whose tensors went through ``edit(dict) -> dict``."""
    out = tmp_path / "variant"
    shutil.copytree(saved, out)
    save_file(edit(load_file(str(saved / "model.safetensors"))), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


def _without(key: str):
    return lambda tensors: {k: v for k, v in tensors.items() if k != key}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_round_trips_without_complaint(family, tmp_path):
    tiny_model(family).save_pretrained(tmp_path)
    assert lsi.load(tmp_path).family == family


@pytest.mark.parametrize(("edit", "phrase"), [
    (_without(DOWN), f"missing \\['{DOWN}'\\]"),
    (_without("model.norm.weight"), "missing \\['model.norm.weight'\\]"),
    (lambda t: {**t, "model.extra.weight": torch.zeros(3)}, "unexpected \\['model.extra.weight'\\]"),
    (lambda t: {**_without(DOWN)(t), "model.extra.weight": torch.zeros(3)}, "missing .*; unexpected"),
    (lambda t: {**t, DOWN: torch.zeros(3, 3)}, f"wrong shape {DOWN} \\(checkpoint \\(3, 3\\), model \\(32, 48\\)\\)"),
    (lambda t: {**t, DOWN: t[DOWN].T.contiguous()}, "wrong shape"),
], ids=["missing-tensor", "missing-norm", "unexpected-tensor", "missing-and-unexpected", "wrong-shape",
        "transposed"])
def test_checkpoint_keys_must_match_the_model(saved, tmp_path, edit, phrase):
    with refuse(CheckpointError, match=phrase):
        lsi.load(_variant(saved, tmp_path, edit))


@pytest.mark.parametrize("damage", ["truncated", "random-bytes", "empty"])
def test_damaged_safetensors(saved, tmp_path, damage):
    path = tmp_path / "damaged"
    shutil.copytree(saved, path)
    data = (saved / "model.safetensors").read_bytes()
    broken = {"truncated": data[: len(data) // 2], "random-bytes": torch.randint(0, 256, (4096,),
              dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy().tobytes(), "empty": b""}
    (path / "model.safetensors").write_bytes(broken[damage])
    with refuse(CheckpointError, match="truncated or corrupt"):
        lsi.load(path)


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickle_only_checkpoint_is_never_unpickled(saved, tmp_path, name):
    path = tmp_path / "pickled"
    shutil.copytree(saved, path)
    (path / "model.safetensors").unlink()
    (path / name).write_bytes(b"not even read")  # refused before anything opens it
    with refuse(CheckpointError, match="only pickled weights") as info:
        lsi.load(path)
    assert "safetensors" in info.value.fix and "weights_only" not in str(info.value)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_a_file_instead_of_the_directory(saved, name):
    with refuse(InputError, match="pass its directory"):
        lsi.load(saved / name)


def test_a_directory_that_does_not_exist(tmp_path):
    with refuse(InputError, match="check the path"):
        lsi.load(tmp_path / "nowhere")


@pytest.mark.parametrize("device", ["cdua", "gpu", "cuda:x"])
def test_misspelled_device(saved, device):
    with refuse(InputError, match="check the spelling"):
        lsi.load(saved, device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda")])
def test_cuda_without_a_gpu(saved, device):
    with refuse(InputError, match="not available here"):
        lsi.load(saved, device=device)


def test_cuda_without_a_gpu_on_a_built_model():
    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    model = tiny_model("llama")
    with refuse(InputError, model=model, match="not available here"):
        lsi.load(model, device="cuda")


@pytest.mark.parametrize("name", ["eagr", "flash", "SDPA"])
def test_unknown_attention_implementation(saved, name):
    with refuse(AttentionImplementationError, match="sdpa") as info:
        lsi.load(saved, attn_implementation=name)
    assert "path" not in info.value.fix


@pytest.mark.parametrize("tokenizer", ["gpt2", Path("tok")])
def test_tokenizer_given_as_a_string(saved, tokenizer):
    with refuse(InputError, match="AutoTokenizer.from_pretrained"):
        lsi.load(saved, tokenizer=tokenizer)


@pytest.mark.parametrize("model", [None, 3, ["model"]])
def test_not_a_model_at_once(model):
    start = time.perf_counter()
    with refuse(InputError, match="a hub id, a model directory"):
        lsi.load(model)
    assert time.perf_counter() - start < 1.0  # no hub lookups


@pytest.mark.parametrize("build", [lambda m: lsi.load(m), lambda m: lsi.LanguageModel(m)], ids=["load", "wrapper"])
def test_module_without_a_config(build):
    module = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10))
    with refuse(InputError, model=module, match="PreTrainedModel with a config"):
        build(module)


def test_self_check_fails_on_non_finite_weights():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    result = self_check(lsi.LanguageModel(model))
    assert not result.passed
    assert next(c.name for c in result.checks if not c.passed).startswith("logits are finite")
