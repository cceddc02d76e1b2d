"""The lsi command, in-process."""

import json

import pytest
from click.testing import CliRunner

import lsi
from lsi.cli.main import cli
from lsi.testing import tiny_model

pytestmark = pytest.mark.integration


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and lsi.__version__ in result.output


@pytest.mark.acceptance
def test_inspect_stories_json(stories_dir):
    result = CliRunner().invoke(cli, ["inspect", str(stories_dir), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["family"] == "llama" and report["n_layers"] == 5 and report["self_check"]["passed"]
    sites = {s["name"]: s["shape"] for s in report["sites"]}
    assert sites["blocks.4.attn.k"] == ["batch", "pos", 4, 8]
    assert sites["blocks.0.attn.pattern"] == ["batch", 8, "q_pos", "k_pos"]
    assert sites["logits"] == ["batch", "pos", 512]


def test_inspect_directory_without_tokenizer(tmp_path):
    tiny_model("phi3").save_pretrained(tmp_path)
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "family     phi3" in result.output and "self-check PASSED" in result.output
    assert "tokenizer  none" in result.output


def test_inspect_missing_directory_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "nope")])
    assert result.exit_code != 0 and "expected a model directory" in result.output


def test_bench_groundtruth_writes_json(tmp_path):
    path = tmp_path / "gt.json"
    result = CliRunner().invoke(cli, ["bench", "groundtruth", "--organisms", "layer_redundancy", "--json", str(path)])
    assert result.exit_code == 0, result.output
    assert "layer_redundancy / redundant layers" in result.stdout
    assert json.loads(path.read_text())["tasks"][0]["methods"]["oracle"]["auroc"] == 1.0
