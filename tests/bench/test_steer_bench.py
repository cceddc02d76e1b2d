"""The steer side of the ground-truth benchmark: best success within a KL budget on the benchmark's points, the
runner on fake methods (no-op, not applicable, registry), the random baseline's equal norm, the PCA and probe
vectors' directions and norms, the refusal gate's thresholds (diff-in-means and the refusal-direction protocol), every
vector method beating random on the binary attribute, and ``lsi bench groundtruth --kind``."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from lsi.bench import steer_registry
from lsi.bench.groundtruth import grade_steer_task, run_steer_groundtruth
from lsi.bench.records import SteerRun, SteerTaskResult
from lsi.bench.steer_registry import Candidate, SteerMethod, get_steer_methods
from lsi.cli.main import cli
from lsi.core.interventions import Add
from lsi.errors import InputError
from lsi.evaluation.steer import CurvePoint, SteerScores, SteerSplit, SteerTask, best_at_kl, measure, reference
from lsi.organisms import refusal_gate as rg
from lsi.organisms.registry import ground_truth, load_organism
from lsi.report.text import steer_table
from lsi.steer.directional import DirectionalAblation
from lsi.steer.directions import diff_in_means, pca_of_differences, probe_direction, site_features
from lsi.steer.selection import ADDITION_ALPHAS


# -- best success at KL <= tau ---------------------------------------------------------------------------------------
def _point(success: float, kl: float, name: str) -> CurvePoint:
    return CurvePoint({"name": name}, SteerScores(success), kl, 0.0)


@pytest.mark.unit
def test_best_at_kl_picks_the_most_successful_point_within_the_budget():
    curve = [_point(0.2, 0.01, "weak"), _point(0.6, 0.05, "tie, more KL"), _point(0.6, 0.03, "tie, less KL"),
             _point(0.7, 0.1, "on the budget"), _point(0.9, 0.2, "beyond")]
    assert best_at_kl(curve, 0.1).settings["name"] == "on the budget"  # KL == tau counts as within
    assert best_at_kl(curve, 0.08).settings["name"] == "tie, less KL"
    assert best_at_kl(curve, 0.25).settings["name"] == "beyond"
    assert best_at_kl(curve, 0.005) is None
    assert best_at_kl([], 0.1) is None


# -- the runner on fake methods --------------------------------------------------------------------------------------
TOKEN = 7


def _fake_task(lm, goal: str = "induce") -> SteerTask:
    """A task on a random tiny model: success = mean probability of token 7 at the last position."""
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, 97, (8, 6), generator=gen)

    def success(model) -> SteerScores:
        return SteerScores(float(model.forward(prompts)[:, -1].softmax(-1)[:, TOKEN].mean()))

    positive = torch.cat([prompts[:, :5], torch.full((8, 1), TOKEN)], 1)
    split = SteerSplit(positive=positive, negative=prompts, measure=success,
                       corpus=torch.randint(3, 97, (4, 10), generator=gen))
    return SteerTask("toy", "more token 7", goal, split, split, metrics={"success": "p(token 7) at the end"},
                     tau=0.005)  # a random tiny model's outputs are near uniform: its KL stays small


def _method(name: str, candidates, applies=None) -> SteerMethod:
    return SteerMethod(name, "test-only", lambda lm, task, seed: candidates(lm),
                       applies=applies or (lambda task: None))


@pytest.mark.unit
def test_runner_grades_a_no_op_as_the_baseline_and_skips_methods_that_do_not_apply(tiny_lm):
    lm = tiny_lm("llama")
    task = _fake_task(lm)
    v = torch.randn(32, generator=torch.Generator().manual_seed(2))
    no_op = _method("no-op", lambda lm: [Candidate(Add("blocks.0.resid_pre", v, 0.0), {"alpha": 0.0})])
    grid = _method("grid", lambda lm: [Candidate(Add("blocks.1.resid_pre", v, a), {"alpha": a})
                                       for a in (0.005, 0.02, 5.0)])
    never = _method("never", lambda lm: [], applies=lambda task: "needs a removal task")
    record = grade_steer_task(lm, task, [no_op, grid, never])
    assert SteerTaskResult.from_json(record.to_json()) == record
    graded = record.to_json()
    base = graded["unsteered"]
    assert base["kl"] == 0.0 and base["dloss"] == 0.0
    best = graded["methods"]["no-op"]["best"]
    assert best["success"] == base["success"] and best["kl"] == 0.0 and best["dloss"] == 0.0
    assert graded["methods"]["never"] == {"skipped": "needs a removal task"}
    curve = graded["methods"]["grid"]["curves"][0]
    assert [p["settings"]["alpha"] for p in curve] == [0.005, 0.02, 5.0]
    assert curve[0]["kl"] < curve[1]["kl"] < curve[2]["kl"] and curve[2]["kl"] > task.tau
    within = [p for p in curve if p["kl"] <= task.tau]
    chosen = graded["methods"]["grid"]["best"]
    assert len(within) == 2 and chosen == max(within, key=lambda p: p["success"])
    assert list(graded["methods"]) == ["no-op", "grid", "never"]
    assert "skipped (needs a removal task): never" in steer_table(SteerRun((record,), {}))
    torch.testing.assert_close(lm.forward([[3, 4, 5]]), lm.forward([[3, 4, 5]]))  # no hooks left behind


@pytest.mark.unit
def test_measure_applies_the_steering_only_inside(tiny_lm):
    lm = tiny_lm("llama")
    task = _fake_task(lm)
    ref = reference(lm, task.test.corpus)
    steer = DirectionalAblation(torch.randn(32, generator=torch.Generator().manual_seed(3)))
    point = measure(lm, task.test, ref, steer, {"what": "ablation"})
    with steer.apply(lm):
        assert point.scores == task.test.measure(lm)
    assert point.kl > 0 and point.settings == {"what": "ablation"}
    assert measure(lm, task.test, ref, None).kl == 0.0


@pytest.mark.unit
def test_registered_methods_appear_after_the_baseline_and_unknown_names_list_them(tiny_lm):
    steer_registry.STEER_METHODS["test-only"] = _method("test-only", lambda lm: [])
    try:
        assert [m.name for m in get_steer_methods(["test-only"])] == ["random", "test-only"]
        assert {"random", "diff_in_means_addition", "directional_ablation", "pca_addition", "probe_addition",
                "refusal_direction", "test-only"} <= {m.name for m in get_steer_methods(None)}
    finally:
        del steer_registry.STEER_METHODS["test-only"]
    with pytest.raises(InputError, match="directional_ablation"):
        get_steer_methods(["no such method"])
    with pytest.raises(InputError, match="tau > 0"):
        run_steer_groundtruth(methods=[], organisms=[], tau=0.0)


@pytest.mark.unit
def test_random_baseline_has_the_norm_site_and_strengths_of_diff_in_means(tiny_lm):
    lm = tiny_lm("llama")
    task = _fake_task(lm)
    methods = {m.name: m for m in get_steer_methods(None)}
    dim = methods["diff_in_means_addition"].run(lm, task, 0)
    draws = [methods["random"].run(lm, task, seed) for seed in range(2)]
    assert methods["random"].draws == 3
    assert methods["directional_ablation"].applies(task) is not None  # an induce task
    for random_candidates in draws:
        for a, r in zip(dim, random_candidates, strict=True):
            assert (r.steering.site, r.steering.alpha) == (a.steering.site, a.steering.alpha)
            torch.testing.assert_close(r.steering.vector.norm(), a.steering.vector.norm())
            cos = torch.nn.functional.cosine_similarity(r.steering.vector, a.steering.vector, dim=0)
            assert abs(float(cos)) < 0.9
    assert not torch.equal(draws[0][0].steering.vector, draws[1][0].steering.vector)
    same = _fake_task(lm)
    same = SteerTask("toy", "no contrast", "induce", SteerSplit(same.dev.negative, same.dev.negative,
                                                                same.dev.measure, same.dev.corpus), same.test)
    with pytest.raises(InputError, match="means differ"):
        methods["diff_in_means_addition"].run(lm, same, 0)


@pytest.mark.unit
def test_pca_and_probe_vectors_point_like_their_directions_with_the_diff_in_means_norm(tiny_lm):
    lm = tiny_lm("llama")
    task = _fake_task(lm)  # 8 positive and 8 negative dev inputs: pairs by index
    methods = {m.name: m for m in get_steer_methods(None)}
    for name, unit in (("pca_addition", lambda site, pos: pca_of_differences(lm, task.dev.positive, task.dev.negative,
                                                                                site, positions=pos)[0]),
                       ("probe_addition", lambda site, pos: probe_direction(
                           torch.cat([site_features(lm, task.dev.positive, site, positions=pos),
                                      site_features(lm, task.dev.negative, site, positions=pos)]), [1] * 8 + [0] * 8))):
        assert methods[name].applies(task) is None
        candidates = methods[name].run(lm, task, 0)
        assert [c.steering.alpha for c in candidates] == list(ADDITION_ALPHAS)  # induce: +alpha
        first = candidates[0]
        site, position, vector = first.steering.site, first.settings["position"], first.steering.vector
        v = diff_in_means(lm, task.dev.positive, task.dev.negative, site, positions=position)
        torch.testing.assert_close(vector.norm(), v.norm())
        cos = torch.nn.functional.cosine_similarity(vector, unit(site, position), dim=0)
        assert float(cos) == pytest.approx(1.0, abs=1e-5) and float(vector @ v) > 0, name
    unpaired = SteerTask("toy", "unpaired", "induce", SteerSplit(task.dev.positive[:5], task.dev.negative,
                                                                 task.dev.measure, task.dev.corpus), task.test)
    assert "5 positive and 8 negative" in methods["pca_addition"].applies(unpaired)
    assert methods["probe_addition"].applies(unpaired) is None
    assert "only the refusal_gate organism" in methods["refusal_direction"].applies(task)


# -- the organisms ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def steer_result():
    """Diff-in-means, ablation and the refusal-direction protocol on refusal_gate; the vector methods on
    binary_attribute (one result, as the benchmark would give it with the methods that apply)."""
    gate = run_steer_groundtruth(methods=["diff_in_means_addition", "directional_ablation", "refusal_direction"],
                                 organisms=["refusal_gate"])
    attribute = run_steer_groundtruth(methods=["diff_in_means_addition", "pca_addition", "probe_addition"],
                                      organisms=["binary_attribute"])
    return SteerRun(gate.tasks + attribute.tasks, gate.skipped_organisms)


def _task(result, name):
    return next(t for t in result.to_json()["tasks"] if t["task"] == name)


@pytest.mark.slow
@pytest.mark.integration
def test_refusal_gate_ablation_bypasses_refusal_and_keeps_the_task(steer_result):
    task = _task(steer_result, "bypass refusal")
    base, best = task["unsteered"], task["methods"]["directional_ablation"]["best"]
    assert base["success"] <= 0.05 and base["generalization"] <= 0.05  # refused at least 95% of the time
    assert best["success"] >= 0.95 and best["generalization"] >= 0.95  # refused at most 5% of the time
    assert best["specificity"] >= 0.98 * base["specificity"] and best["kl"] <= task["tau"]
    assert task["methods"]["random"]["best"]["success"] <= 0.05
    assert task["oracle"] is None and task["oracle_note"].startswith("n/a")
    protocol = task["methods"]["refusal_direction"]["best"]  # Arditi et al.'s selection on dev, graded on test
    assert protocol["success"] >= 0.95 and protocol["specificity"] >= 0.98 * base["specificity"]
    assert protocol["kl"] <= task["tau"] and set(protocol["settings"]) == {"layer", "position"}


@pytest.mark.slow
@pytest.mark.integration
def test_refusal_gate_addition_induces_refusal(steer_result):
    task = _task(steer_result, "induce refusal")
    best = task["methods"]["diff_in_means_addition"]["best"]
    assert task["unsteered"]["success"] <= 0.05 and task["methods"]["random"]["best"]["success"] <= 0.05
    assert best["success"] >= 0.45 and best["kl"] <= task["tau"]
    assert task["methods"]["directional_ablation"] == {
        "skipped": "ablation removes a direction; it cannot induce a behaviour"}


@pytest.mark.slow
@pytest.mark.integration
def test_binary_attribute_vector_methods_beat_random_at_equal_kl(steer_result):
    task = _task(steer_result, "marked attribute")
    dim, random = task["methods"]["diff_in_means_addition"], task["methods"]["random"]
    for name in ("pca_addition", "probe_addition"):  # every vector method's success-vs-KL curve is reported
        graded = task["methods"][name]
        assert [p["settings"]["alpha"] for p in graded["curves"][0]] == list(ADDITION_ALPHAS)
        assert graded["best"]["success"] >= random["best"]["success"] + 0.15 and graded["best"]["kl"] <= task["tau"]
    assert dim["best"]["success"] >= random["best"]["success"] + 0.25
    assert dim["best"]["success"] >= task["unsteered"]["success"] + 0.25 and dim["best"]["fluency"] >= 0.75
    for curve in random["curves"]:  # every random draw was strong enough to spend the same KL, and did worse there
        assert max(p["kl"] for p in curve) >= dim["best"]["kl"]
        assert max(p["success"] for p in curve if p["kl"] <= task["tau"]) < dim["best"]["success"]
    assert task["oracle"]["success"] == 0.75
    json.dumps(steer_result.to_json())  # JSON-ready
    assert SteerRun.from_json(steer_result.to_json()) == steer_result
    table = steer_table(steer_result)
    assert "binary_attribute / marked attribute (induce)" in table and "refusal_gate / bypass refusal (remove)" in table


@pytest.mark.slow
@pytest.mark.integration
def test_generated_replies_equal_the_organisms_own_sampler_under_a_steering():
    lm = load_organism("refusal_gate")
    test = ground_truth("refusal_gate")["splits"]["test"]
    texts = test["harmful"][:40] + test["harmless"][:40]
    steer = DirectionalAblation(torch.randn(64, generator=torch.Generator().manual_seed(0)) * 4)
    with steer.apply(lm):
        assert rg._generated_replies(lm, texts) == rg._replies(lm, texts, [])


# -- the command line ------------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_cli_kind_chooses_the_sides(tmp_path):
    runner = CliRunner()
    steer = runner.invoke(cli, ["bench", "groundtruth", "--kind", "steer", "--organisms", "induction"])
    assert steer.exit_code == 0, steer.output
    assert "induction: skipped (no steer task)" in steer.output and "AUROC" not in steer.output
    locate = runner.invoke(cli, ["bench", "groundtruth", "--kind", "locate", "--organisms", "binary_attribute"])
    assert locate.exit_code == 0, locate.output
    assert "binary_attribute: skipped (no locate task" in locate.output and "success" not in locate.output
    path = tmp_path / "gt.json"
    only_steer = runner.invoke(cli, ["bench", "groundtruth", "--methods", "directional_ablation", "--organisms",
                                     "induction", "--json", str(path)])
    assert only_steer.exit_code == 0, only_steer.output
    assert json.loads(path.read_text())["kinds"] == ["steer"]  # no locate method named: that side is left out


@pytest.mark.integration
def test_cli_unknown_names_and_bad_budgets_are_typed_errors():
    runner = CliRunner()
    both = runner.invoke(cli, ["bench", "groundtruth", "--methods", "no_such", "--organisms", "induction"])
    assert both.exit_code != 0 and "activation_patching" in both.output and "directional_ablation" in both.output
    steer = runner.invoke(cli, ["bench", "groundtruth", "--kind", "steer", "--methods", "activation_patching"])
    assert steer.exit_code != 0 and "steer method names" in steer.output
    tau = runner.invoke(cli, ["bench", "groundtruth", "--kind", "steer", "--tau", "-1", "--organisms", "induction"])
    assert tau.exit_code != 0 and "tau > 0" in tau.output
    organism = runner.invoke(cli, ["bench", "groundtruth", "--kind", "steer", "--organisms", "nope"])
    assert organism.exit_code != 0 and "refusal_gate" in organism.output
