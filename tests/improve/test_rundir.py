import json

import pytest
import torch

from lsi.errors import InputError
from lsi.improve.rundir import Checkpoint, Identity, RunDirectory

IDENTITY = Identity("demo", "demo", "model", {"seed": 0, "tau": 0.1}, {"data": "abc"})


@pytest.mark.unit
def test_a_finished_step_is_read_back_with_its_tensors_and_timed_in_the_manifest(tmp_path):
    run = RunDirectory.open(tmp_path / "r", IDENTITY)
    calls = []

    def compute() -> Checkpoint:
        calls.append(1)
        return Checkpoint({"x": 1}, {"v": torch.arange(3.0)})

    run.step("a", compute)
    again = RunDirectory.open(tmp_path / "r", IDENTITY).step("a", compute)
    assert calls == [1] and again.data == {"x": 1} and torch.equal(again.tensors["v"], torch.arange(3.0))
    manifest = json.loads((tmp_path / "r" / "run.json").read_text())
    assert [s["name"] for s in manifest["steps"]] == ["a"] and manifest["versions"]["torch"] == torch.__version__
    assert manifest["config"] == {"seed": 0, "tau": 0.1} and manifest["data"] == {"data": "abc"}


@pytest.mark.unit
def test_a_step_that_failed_leaves_nothing_and_runs_again(tmp_path):
    run = RunDirectory.open(tmp_path / "r", IDENTITY)

    def fail() -> Checkpoint:
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run.step("a", fail)
    assert not run.done("a")
    assert run.step("a", lambda: Checkpoint({"ok": True})).data == {"ok": True}


@pytest.mark.unit
def test_resuming_with_another_config_or_data_is_refused_and_restart_starts_over(tmp_path):
    RunDirectory.open(tmp_path / "r", IDENTITY).step("a", lambda: Checkpoint({"x": 1}))
    other = Identity("demo", "demo", "model", {"seed": 1, "tau": 0.1}, {"data": "abc"})
    with pytest.raises(InputError, match="different config"):
        RunDirectory.open(tmp_path / "r", other)
    with pytest.raises(InputError, match="different config, data"):
        RunDirectory.open(tmp_path / "r", Identity("demo", "demo", "model", {"seed": 1}, {"data": "x"}))
    fresh = RunDirectory.open(tmp_path / "r", other, restart=True)
    assert not fresh.done("a")


@pytest.mark.unit
def test_open_refuses_a_file_a_foreign_directory_and_a_corrupt_manifest(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="a file"):
        RunDirectory.open(tmp_path / "file", IDENTITY)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="other files"):
        RunDirectory.open(tmp_path / "other", IDENTITY)
    RunDirectory.open(tmp_path / "r", IDENTITY)
    (tmp_path / "r" / "run.json").write_text("{half")
    with pytest.raises(InputError, match="restart"):
        RunDirectory.open(tmp_path / "r", IDENTITY)
