"""The knowledge-edit side of the ground-truth benchmark: the CounterFact-style scores of one case against a
prompt-by-prompt hand computation, the runner on fake methods (rows, skips, settings summaries), ROME and the
fine-tuning baselines on the fact-world organism against the grading thresholds, and ``lsi bench groundtruth
--kind edit``."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from lsi.bench.edit_methods import EditMethod, EditOutput, get_edit_methods
from lsi.bench.groundtruth import grade_edit_task, settings_summary
from lsi.bench.records import EditRun, EditTaskResult
from lsi.cli.main import cli
from lsi.core.weight_edit import WeightEdit, added_to_weights
from lsi.errors import InputError
from lsi.evaluation.edit import CaseScores, EditCase, EditTask, harmonic_score, measure_case, summarize
from lsi.evaluation.steer import reference
from lsi.report.text import edit_table
from lsi.steer.rome import EditRequest

NEW, TRUE = 7, 8
DOWN = "model.layers.1.mlp.down_proj.weight"


def _rows(seed: int, n: int, lengths=(4, 6)) -> tuple[tuple[int, ...], ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(tuple(torch.randint(3, 97, (lengths[i % 2],), generator=gen).tolist()) for i in range(n))


def _case(seed: int = 0) -> EditCase:
    prompts = _rows(seed, 3)
    return EditCase(EditRequest(prompts, [1] * 3, NEW, subject=f"s{seed}"), relation="r", true_id=TRUE,
                    subject_spans=((0, 2),) * 3, paraphrases=_rows(seed + 1, 2), neighbours=_rows(seed + 2, 5),
                    other_facts=_rows(seed + 3, 4), other_objects=(3, 4, 5, 6))


def _task(cases) -> EditTask:
    return EditTask("toy", "toy edits", tuple(cases), corpus=[list(r) for r in _rows(10, 4, (9, 7))],
                    heldout=[list(r) for r in _rows(11, 4, (8, 10))], planted_layer=1, metrics={"efficacy": "toy"})


def _random_edit(lm, seed: int, scale: float) -> WeightEdit:
    delta = scale * torch.randn(32, 48, generator=torch.Generator().manual_seed(seed))
    return WeightEdit.of(lm, {DOWN: delta}, label="random")


def _by_hand(lm, case: EditCase, deltas) -> dict[str, float]:
    """Each prompt run alone, unpadded, with the deltas added by hand."""
    def probs(rows):
        with added_to_weights(lm, deltas):
            return [lm.forward([list(r)])[0, -1].softmax(-1) for r in rows]

    def rate(hits):
        return sum(hits) / len(hits)

    return {"efficacy": rate([float(p[NEW] > p[TRUE]) for p in probs(case.request.prompts)]),
            "paraphrase": rate([float(p[NEW] > p[TRUE]) for p in probs(case.paraphrases)]),
            "neighbourhood": rate([float(p[TRUE] > p[NEW]) for p in probs(case.neighbours)]),
            "preservation": rate([float(int(p.argmax()) == o) for p, o in zip(probs(case.other_facts),
                                                                               case.other_objects, strict=True)])}


# -- one case --------------------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_case_scores_match_prompt_by_prompt_hand_computation(fresh_lm):
    lm = fresh_lm("llama")
    with torch.no_grad():  # make o and o* compete: give them similar, large logits
        lm.model.lm_head.weight[[NEW, TRUE]] *= 20
    task = _task([_case()])
    ref = reference(lm, task.heldout)
    case = task.cases[0]
    unedited = measure_case(lm, case, ref, None)
    assert (unedited.kl, unedited.dloss) == (0.0, 0.0)
    assert dataclasses.asdict(unedited) == pytest.approx({**_by_hand(lm, case, {}), "kl": 0.0, "dloss": 0.0})
    rates = set()
    for seed in range(6):
        edit = _random_edit(lm, seed, 2.0)
        scores = measure_case(lm, case, ref, edit)
        assert dataclasses.asdict(scores) == pytest.approx({**_by_hand(lm, case, edit.deltas), "kl": scores.kl,
                                                            "dloss": scores.dloss})
        assert scores.kl > 0
        rates |= {scores.efficacy, scores.paraphrase, scores.neighbourhood}
    assert len(rates) >= 3  # the rates are not stuck at one value


@pytest.mark.unit
def test_summaries_average_cases_and_take_the_harmonic_mean():
    scores = [CaseScores(1.0, 0.5, 1.0, 1.0, 0.02, 0.01), CaseScores(0.5, 0.5, 0.5, 0.0, 0.04, -0.03)]
    summary = summarize(scores)
    assert summary["efficacy"] == 0.75 and summary["preservation"] == 0.5 and summary["kl"] == pytest.approx(0.03)
    assert summary["score"] == pytest.approx(3 / (1 / 0.75 + 1 / 0.5 + 1 / 0.75))
    assert harmonic_score(1.0, 0.0, 1.0) == 0.0
    settings = [{"layer": 0, "moved": 10, "kind": "a"}, {"layer": 0, "moved": 12, "kind": "b"},
                {"layer": 2, "moved": 14, "kind": "a"}]
    assert settings_summary(settings) == {"layer": {"0": 2, "2": 1}, "moved": 12.0, "kind": {"a": 2, "b": 1}}
    assert settings_summary([{"layer": 1}, {"layer": 1}]) == {"layer": 1}


@pytest.mark.unit
def test_cases_without_probes_are_refused():
    case = _case()
    with pytest.raises(InputError, match="neighbour"):
        dataclasses.replace(case, neighbours=())
    with pytest.raises(InputError, match="one subject span per request prompt"):
        dataclasses.replace(case, subject_spans=((0, 2),))


# -- the runner ------------------------------------------------------------------------------------------------------
@pytest.mark.unit
def test_runner_grades_every_row_of_every_case_next_to_the_unedited_model(tiny_lm):
    lm = tiny_lm("llama")
    task = _task([_case(0), _case(20)])

    def two_rows(lm, task, case):
        seed = int(case.request.subject[1:])
        return [EditOutput("none@0", WeightEdit.of(lm, {DOWN: torch.zeros(32, 48)}), {"layer": 0}),
                EditOutput("random@1", _random_edit(lm, seed, 2.0), {"layer": 1, "seed": seed})]

    methods = [EditMethod("pair", "test-only", two_rows),
               EditMethod("never", "test-only", two_rows, applies=lambda task: "needs a planted layer 3")]
    record = grade_edit_task(lm, task, methods)
    assert EditTaskResult.from_json(record.to_json()) == record
    graded = record.to_json()
    unedited, rows = graded["unedited"], graded["methods"]["pair"]["rows"]
    assert list(rows) == ["none@0", "random@1"] and graded["methods"]["never"] == {"skipped": "needs a planted layer 3"}
    for key in ("efficacy", "paraphrase", "neighbourhood", "preservation", "score"):
        assert rows["none@0"][key] == unedited[key]  # a zero edit is the unedited model
    assert unedited["kl"] == 0.0 and rows["random@1"]["kl"] > 0
    ref = reference(lm, task.heldout)
    by_case = [measure_case(lm, c, ref, _random_edit(lm, s, 2.0)) for c, s in zip(task.cases, (0, 20), strict=True)]
    assert rows["random@1"]["per_case"] == [{**dataclasses.asdict(s), "layer": 1, "seed": seed}
                                            for s, seed in zip(by_case, (0, 20), strict=True)]
    assert rows["random@1"]["settings"] == {"layer": 1, "seed": 10.0}
    assert [r["subject"] for r in graded["requests"]] == ["s0", "s20"]
    table = edit_table(EditRun((record,), {"x": "no edit task"}))
    assert "toy / toy edits: means over 2 requests, planted layer 1" in table
    assert "skipped (needs a planted layer 3): never" in table and "x: skipped (no edit task)" in table
    (random_line,) = [line for line in table.splitlines() if line.lstrip().startswith("random@1")]
    assert random_line.endswith("layer=1, seed=10")  # the settings' mean, to 6 significant digits
    json.dumps(graded)


# -- the fact-world organism -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fact_world_edits():
    from lsi.organisms.fact_world import edit_tasks
    from lsi.organisms.registry import ground_truth, load_organism

    lm = load_organism("fact_world")
    task = edit_tasks(lm, ground_truth("fact_world"))[0]
    return lm, task, grade_edit_task(lm, dataclasses.replace(task, cases=task.cases[:6]), get_edit_methods(None))


@pytest.mark.slow
@pytest.mark.integration
def test_fact_world_edit_task_is_counterfactual():
    from lsi.organisms.fact_world import EDIT_REQUESTS, edit_tasks
    from lsi.organisms.registry import ground_truth, load_organism

    lm, truth = load_organism("fact_world"), ground_truth("fact_world")
    task = edit_tasks(lm, truth)[0]
    assert len(task.cases) == EDIT_REQUESTS == len({c.request.subject for c in task.cases})
    facts = {(f["subject"], f["relation"]): lm.tokenizer.convert_tokens_to_ids(f["object"]) for f in truth["facts"]}
    for case in task.cases:
        assert facts[(case.request.subject, case.relation)] == case.true_id != case.new_id
        assert len(case.request.prompts) == 4 and len(case.paraphrases) == 2 and len(case.other_facts) == 12
    edited = {c.request.subject for c in task.cases}
    assert len(task.heldout) == (len({f["subject"] for f in truth["facts"]}) - EDIT_REQUESTS) * 4 * 6
    heldout_text = {lm.tokenizer.decode(row) for row in task.heldout}
    assert not any(s in text for s in edited for text in heldout_text if f" {s} " in f" {text} ")


@pytest.mark.slow
@pytest.mark.integration
def test_rome_at_the_traced_layer_meets_the_grading_thresholds(fact_world_edits):
    _, task, record = fact_world_edits
    graded = record.to_json()
    rows = {name: row for m in graded["methods"].values() for name, row in m["rows"].items()}
    unedited, rome = graded["unedited"], rows["rome"]
    assert unedited["efficacy"] == 0.0 and unedited["neighbourhood"] == 1.0 and unedited["preservation"] == 1.0
    assert rome["settings"]["layer"] == task.planted_layer == 0  # causal tracing finds l* for every request
    assert rome["efficacy"] >= 0.95 and rome["paraphrase"] >= 0.8 and rome["neighbourhood"] >= 0.8
    assert rome["kl"] < 0.05
    assert rows["rome@0"]["per_case"] == rome["per_case"]  # the same edit at the traced layer
    assert rows["rome@3"]["efficacy"] == 0.0 and rows["rome@3"]["kl"] < 1e-6  # nothing reads it after the subject
    assert max(rows[f"rome@{layer}"]["score"] for layer in (1, 2, 3)) < rome["score"] - 0.5
    masked, full = rows["finetune_masked"], rows["finetune_full"]
    assert masked["settings"]["layer"] == 0 and 0 < masked["settings"]["moved"] <= 64 * 256 * 2 + 256 + 64
    assert full["settings"]["moved"] > 5 * masked["settings"]["moved"]
    assert masked["efficacy"] >= 0.95 and full["efficacy"] >= 0.95
    assert full["neighbourhood"] < masked["neighbourhood"]  # every parameter: the relation itself moves
    table = edit_table(EditRun((record,), {}))
    assert "fact_world / counterfactual edits: means over 6 requests, planted layer 0" in table


# -- the command line ------------------------------------------------------------------------------------------------
@pytest.mark.integration
def test_cli_kind_edit(tmp_path):
    runner = CliRunner()
    edit = runner.invoke(cli, ["bench", "groundtruth", "--kind", "edit", "--organisms", "induction"])
    assert edit.exit_code == 0, edit.output
    assert "induction: skipped (no edit task)" in edit.output and "AUROC" not in edit.output
    path = tmp_path / "gt.json"
    only_edit = runner.invoke(cli, ["bench", "groundtruth", "--methods", "rome", "--organisms", "induction",
                                    "--json", str(path)])
    assert only_edit.exit_code == 0, only_edit.output
    result = json.loads(path.read_text())
    assert result["kinds"] == ["edit"] and result["edit"]["skipped_organisms"] == {"induction": "no edit task"}
    unknown = runner.invoke(cli, ["bench", "groundtruth", "--kind", "edit", "--methods", "directional_ablation"])
    assert unknown.exit_code != 0 and "edit method names" in unknown.output and "rome_by_layer" in unknown.output
    both = runner.invoke(cli, ["bench", "groundtruth", "--methods", "no_such", "--organisms", "induction"])
    assert both.exit_code != 0 and "finetune_masked" in both.output and "directional_ablation" in both.output
