"""The lsi command: a refusal is one line with its fix (the traceback only with --debug), output paths are
checked before any work, and --help never imports torch or transformers."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lsi.cli.main import cli
from lsi.errors import CheckpointError
from lsi.testing import tiny_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "llama"
    tiny_model("llama").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def missing_tensor(saved: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "missing"
    shutil.copytree(saved, path)
    tensors = load_file(str(saved / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _one_line_error(result, *phrases: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: expected "), result.output
    assert "; found " in lines[0] and ". Fix: " in lines[0] and "--debug" in lines[0]
    assert "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in lines[0]


def test_inspect_refuses_a_checkpoint_with_a_missing_tensor(missing_tensor):
    result = CliRunner().invoke(cli, ["inspect", str(missing_tensor)])
    _one_line_error(result, "missing ['model.layers.1.mlp.up_proj.weight']")
    assert "self-check PASSED" not in result.output


@pytest.mark.parametrize("args", [["--debug"], []], ids=["flag", "env"])
def test_debug_shows_the_error_itself(missing_tensor, args):
    env = {} if args else {"LSI_DEBUG": "1"}
    result = CliRunner().invoke(cli, [*args, "inspect", str(missing_tensor)], env=env)
    assert result.exit_code == 1 and isinstance(result.exception, CheckpointError)


@pytest.mark.parametrize(("make", "extra", "phrase"), [
    (lambda saved: saved / "config.json", [], "pass its directory"),
    (lambda saved: saved, ["--attn-implementation", "eagr"], "'eagr'"),
    (lambda saved: saved.parent / "nowhere", [], "check the path"),
], ids=["a-file", "attention", "missing-directory"])
def test_inspect_bad_arguments(saved, make, extra, phrase):
    _one_line_error(CliRunner().invoke(cli, ["inspect", str(make(saved)), *extra]), phrase)


@pytest.mark.parametrize("where", ["a-directory", "under-a-file"])
def test_bench_json_path_is_checked_before_the_work(tmp_path, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    target = tmp_path if where == "a-directory" else blocker / "gt.json"
    start = time.perf_counter()
    result = CliRunner().invoke(cli, ["bench", "groundtruth", "--organisms", "layer_redundancy", "--json",
                                      str(target)])
    _one_line_error(result, str(tmp_path))
    assert time.perf_counter() - start < 5  # refused before grading anything
    assert blocker.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]


def test_demo_out_is_checked_before_training(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    _one_line_error(CliRunner().invoke(cli, ["demo", "--out", str(blocker)]), "is a file")
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("option", ["--organisms", "--methods"])
def test_bench_unknown_name_is_one_line(option):
    _one_line_error(CliRunner().invoke(cli, ["bench", "groundtruth", option, "nope"]), "'nope'")


_HELP = """
import sys
from lsi.cli.main import cli
for args in {commands!r}:
    try:
        cli(args + ["--help"], prog_name="lsi")
    except SystemExit as end:
        assert end.code == 0, (args, end.code)
print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""
COMMANDS = [[], ["inspect"], ["demo"], ["bench"], ["bench", "groundtruth"], ["organisms"], ["organisms", "list"],
            ["organisms", "verify"], ["organisms", "train"], ["improve"], ["report"]]


def test_help_imports_neither_torch_nor_transformers():
    out = subprocess.run([sys.executable, "-c", _HELP.format(commands=COMMANDS)], capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": ":".join(sys.path)})
    assert out.stdout.strip().splitlines()[-1] == "[]"
