"""The ground-truth runner: baselines, registry-driven methods, skips, bad names, JSON."""

import json

import pytest

from lsi.bench import registry
from lsi.bench.groundtruth import run_groundtruth, write_json
from lsi.bench.records import BenchmarkRun, LocateRun
from lsi.bench.registry import LocateMethod, MethodOutput
from lsi.errors import InputError
from lsi.report.text import locate_table

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def result():
    registry.LOCATE_METHODS["reverse oracle"] = LocateMethod(
        "reverse oracle", "test-only: the oracle's ranking reversed",
        lambda lm, task, seed: {u: -s for u, s in registry.LOCATE_METHODS["oracle"].run(lm, task, seed).items()})
    registry.LOCATE_METHODS["heads only"] = LocateMethod(
        "heads only", "test-only: applies to head universes", lambda lm, task, seed: dict.fromkeys(task.universe, 0.0),
        applies=lambda task: None if "head_out" in task.universe[0] else "universe is not attention heads")
    registry.LOCATE_METHODS["with extras"] = LocateMethod(
        "with extras", "test-only: scores plus a reported curve",
        lambda lm, task, seed: MethodOutput(dict.fromkeys(task.universe, 1.0), {"faithfulness": {
            "percent_of_edges": [50.0, 100.0], "sizes": [1, 2], "values": [0.25, 1.0], "area": 0.5}}))
    try:
        yield run_groundtruth(methods=["reverse oracle", "heads only", "with extras"],
                              organisms=["induction", "layer_redundancy", "refusal_gate"])
    finally:
        for name in ("reverse oracle", "heads only", "with extras"):
            del registry.LOCATE_METHODS[name]


def _task(result, organism):
    return next(t for t in result.to_json()["tasks"] if t["organism"] == organism)


def test_oracle_is_perfect_and_random_is_chance(result):
    for organism in ("induction", "layer_redundancy"):
        task = _task(result, organism)
        assert task["methods"]["oracle"]["auroc"] == 1.0 and task["methods"]["oracle"]["r_precision"] == 1.0
        assert task["oracle_margin"] > 0
        chance = len(task["planted"]) / task["universe_size"]
        assert task["methods"]["random"]["r_precision"] == pytest.approx(chance, abs=0.1)
        assert task["methods"]["random"]["auroc"] == pytest.approx(0.5, abs=0.06)


def test_registered_methods_are_graded_or_skipped_with_their_reason(result):
    induction, layers = _task(result, "induction"), _task(result, "layer_redundancy")
    assert induction["methods"]["reverse oracle"]["auroc"] == 0.0
    assert induction["methods"]["reverse oracle"]["spearman_vs_oracle"] == pytest.approx(-1.0)
    assert "auroc" in induction["methods"]["heads only"]
    assert layers["methods"]["heads only"] == {"skipped": "universe is not attention heads"}
    assert "refusal_gate" in result.skipped_organisms
    table = locate_table(result)
    assert "layer_redundancy / redundant layers" in table
    assert "skipped (universe is not attention heads): heads only" in table
    assert "faithfulness of the top edges (area 0.500): 50%:0.25 100%:1.00" in table
    assert _task(result, "induction")["methods"]["with extras"]["extras"]["faithfulness"]["area"] == 0.5


def test_layer_redundancy_truth_is_the_least_important(result):
    task = _task(result, "layer_redundancy")
    assert task["planted_are_least_important"]
    oracle = task["oracle_scores"]
    assert max(oracle[u] for u in task["planted"]) < min(s for u, s in oracle.items() if u not in task["planted"])


def test_json_round_trip(result, tmp_path):
    path = tmp_path / "out" / "gt.json"
    run = BenchmarkRun(("locate",), locate=result)
    write_json(run, path)
    data = json.loads(path.read_text())
    assert data["tasks"][0]["organism"] == "induction" and data["schema"] == 3 and data["kinds"] == ["locate"]
    assert BenchmarkRun.from_json(data) == run and LocateRun.from_json(result.to_json()) == result


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(InputError, match="oracle"):
        run_groundtruth(methods=["no such method"], organisms=[])
    with pytest.raises(InputError, match="induction"):
        run_groundtruth(methods=[], organisms=["no such organism"])
