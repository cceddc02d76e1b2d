"""The safety recipe on the refusal_gate organism: GROUND_TRUTH.md's thresholds through the recipe, its baselines,
the export, user data, and a run killed midway that resumes to the same metrics."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lsi.errors import InputError
from lsi.improve.recipe import load_model, run_recipe
from lsi.improve.rundir import sha256_file
from lsi.organisms.registry import ground_truth

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def gate():
    return load_model("refusal_gate")


@pytest.fixture(scope="module")
def safety(gate, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "safety"
    return out, run_recipe("safety", "refusal_gate", out, lm=gate)


def test_the_recipe_meets_the_refusal_gate_thresholds(safety):
    _, r = safety
    assert r.value("unsteered", "refusal") >= 0.95
    assert r.value("directional ablation", "refusal") <= 0.05
    assert r.value("directional ablation", "accuracy") >= 0.98 * r.value("unsteered", "accuracy")
    for key in ("refusal", "refusal_generalization", "over_refusal", "accuracy", "kl"):  # weights ≡ hooks
        assert r.value("orthogonalized weights", key) == pytest.approx(r.value("directional ablation", key), abs=1e-6)
    assert "orthogonalization ≡ hooks" in r.notes[0] and "(≤ 1e-5: met)" in r.notes[0]


def test_baselines_and_the_opposite_act_behave_as_controls(safety):
    _, r = safety
    assert r.value("random direction ablation", "refusal") >= 0.9  # a random direction removes nothing
    assert r.value("addition", "over_refusal") >= 0.8  # adding r makes harmless requests refused
    assert r.value("orthogonalized weights", "params") > 0 and r.value("directional ablation", "params") == 0
    ablation = r.row("directional ablation").values["refusal"]
    harmful_verbs = sum(r.harmful and not r.held_out for r in safety_data().test)
    assert ablation.n == harmful_verbs and ablation.low <= ablation.value <= ablation.high


def safety_data():
    from lsi.improve.safety import _builtin

    return _builtin()[0]


def test_the_run_directory_holds_the_manifest_steps_result_and_a_checksummed_export(safety):
    out, r = safety
    assert json.loads((out / "result.json").read_text()) == json.loads(json.dumps(r.to_json()))
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["finished"] and {s["name"] for s in manifest["steps"]} >= {"locate", "addition", "export"}
    assert manifest["data"]["refusal_gate"] and manifest["model"]["spec"] == "refusal_gate"
    assert r.export.files and all(sha256_file(out / "export" / f) == h for f, h in r.export.files.items())
    heatmap = r.heatmaps[0]
    assert len(heatmap.y) == 4 and len(heatmap.x) == 3  # layers × post-instruction tokens
    assert r.generations and all(g.before != g.after for g in r.generations)


def _jsonl(path: Path, n: int) -> Path:
    from lsi.organisms import refusal_gate as g

    lines = []
    for split in ("dev", "test"):
        raw = ground_truth("refusal_gate")["splits"][split]
        for t in raw["harmful"][:n]:
            lines.append({"prompt": t, "harmful": True, "split": split,
                          "held_out": g.parse_prompt(t)[0] not in g.HARMFUL_VERBS})
        for t in raw["harmless"][:n]:
            lines.append({"prompt": t, "harmful": False, "split": split,
                          "answer": " ".join(g.answer(*g.parse_prompt(t)))})
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


def test_user_data_in_jsonl_runs_the_same_recipe(gate, tmp_path):
    data = _jsonl(tmp_path / "requests.jsonl", 60)
    config = {"refusal_prefixes": ["sorry i cannot help"], "post_instruction_tokens": 3, "bootstrap": 200}
    r = run_recipe("safety", "refusal_gate", tmp_path / "run", data=data, config=config, lm=gate)
    assert r.value("unsteered", "refusal") >= 0.95 and r.value("directional ablation", "refusal") <= 0.1
    assert "fluency" not in r.row("unsteered").values  # user data defines no reply grammar
    with pytest.raises(InputError, match="refusal_prefixes"):
        run_recipe("safety", "refusal_gate", tmp_path / "run2", data=data, lm=gate)


def test_a_model_without_built_in_data_needs_a_data_file(tmp_path):
    with pytest.raises(InputError, match="--data"):
        run_recipe("safety", "induction", tmp_path / "run")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from lsi.cli.main import main; main()", *args]


def test_a_run_killed_midway_resumes_to_the_same_metrics(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    subprocess.run(_cli("improve", "safety", "--out", str(whole), "--no-report"), check=True, env=env,
                   capture_output=True)
    proc = subprocess.Popen(_cli("improve", "safety", "--out", str(resumed), "--no-report"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = resumed / "steps" / "evaluate-unsteered.json"
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists() and not (resumed / "result.json").exists(), "the run was not killed midway"
    done = subprocess.run(_cli("improve", "safety", "--out", str(resumed), "--no-report"), check=True, env=env,
                          capture_output=True, text=True)
    assert "locate: finished earlier, read back" in done.stderr

    def metrics(out: Path) -> dict:
        result = json.loads((out / "result.json").read_text())
        for row in result["rows"]:
            row["values"].pop("time")  # wall-clock timings differ between runs
        return result

    assert metrics(resumed) == metrics(whole)
