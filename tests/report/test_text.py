"""Text rendering of hand-built records: every benchmark table line written out, a locate result's top objects,
and a selection's curve; the records round-trip through JSON."""

import json

import pytest
import torch

from lsi.bench.records import (
    BenchmarkRun,
    EditMethodResult,
    EditRow,
    EditRun,
    EditTaskResult,
    LocateGrades,
    LocateRun,
    LocateTaskResult,
    Skipped,
    SteerMethodResult,
    SteerRun,
    SteerTaskResult,
)
from lsi.errors import InputError
from lsi.evaluation.edit import CaseScores
from lsi.evaluation.steer import CurvePoint, SteerScores
from lsi.locate.result import LocateResult
from lsi.report.text import locate_result, render, selection_curve
from lsi.steer.selection import Selection

pytestmark = pytest.mark.unit

LOCATE = LocateRun((LocateTaskResult(
    "toy", "two heads", "", 4, ("a", "b"), False, {"a": 1.0, "b": 0.5, "c": 0.0, "d": 0.0}, 0.5,
    {"oracle": LocateGrades(1.0, 1.0, 1.0, 1.0, 0.25),
     "circuit": LocateGrades(0.5, 0.75, 0.5, 0.4, 1.5, extras={"faithfulness": {
         "percent_of_edges": [50.0, 100.0], "values": [0.25, 1.0], "area": 0.5}}),
     "heads_only": Skipped("not heads"), "other": Skipped("not heads")}),), {"quiet": "no locate task"})
STEER = SteerRun((SteerTaskResult(
    "toy", "induce x", "induce", "", 0.1, {"success": "rate of x"},
    CurvePoint({}, SteerScores(0.0, None, 1.0, 1.0), 0.0, 0.0), 0.5, None, "n/a: no oracle",
    {"add": SteerMethodResult(CurvePoint({"site": "blocks.0.resid_pre", "alpha": 2.0, "norm": 3.0},
                                         SteerScores(0.75), 0.05, 0.01), 1,
                              ((CurvePoint({"alpha": 2.0}, SteerScores(0.75), 0.05, 0.01),),), 2.0),
     "weak": SteerMethodResult(None, 0, ((CurvePoint({"alpha": 9.0}, SteerScores(1.0), 0.5, 0.2),),), 1.0)}),), {})
CASE = CaseScores(1.0, 0.5, 1.0, 1.0, 0.01, 0.02)
ROW = EditRow({"efficacy": 1.0, "paraphrase": 0.5, "neighbourhood": 1.0, "preservation": 1.0, "kl": 0.01,
               "dloss": 0.02, "score": 0.75}, {"layer": 1}, 0.5, ((CASE, {"layer": 1}),))
EDIT = EditRun((EditTaskResult("toy", "edits", "", {"efficacy": "ES"}, 1, ({"subject": "s"},), ROW,
                               {"rome": EditMethodResult({"rome": ROW}), "never": Skipped("no layer")}),), {})


def test_benchmark_tables_line_by_line() -> None:
    text = render(BenchmarkRun(("locate", "steer", "edit"), LOCATE, STEER, EDIT))
    assert text.split("\n") == [
        "    method        P@|G|  AUROC     AP    rho       s",
        "-" * 52,
        "toy / two heads: |U|=4, |G|=2, oracle margin +0.500",
        "    oracle        1.000  1.000  1.000  1.000    0.25",
        "    circuit       0.500  0.750  0.500  0.400    1.50",
        "      faithfulness of the top edges (area 0.500): 50%:0.25 100%:1.00",
        "    skipped (not heads): heads_only, other",
        "quiet: skipped (no locate task)",
        "",
        "    method                 success general  specif fluency      KL    dloss      s  at",
        "-" * 86,
        "toy / induce x (induce): best success at KL <= 0.1 nats on the test split",
        "      success: rate of x",
        "    unsteered                0.000       -   1.000   1.000  0.0000  +0.0000   0.50",
        "    oracle                 n/a: no oracle",
        "    add                      0.750       -       -       -  0.0500  +0.0100   2.00  "
        "site=blocks.0.resid_pre, alpha=2",
        "    weak                   no candidate within KL <= 0.1",
        "",
        "    method               ES     PS     NS      S preserv      KL    dloss      s  settings",
        "-" * 90,
        "toy / edits: means over 1 requests, planted layer 1",
        "      efficacy: ES",
        "    unedited          1.000  0.500  1.000  0.750   1.000  0.0100  +0.0200   0.50  layer=1",
        "    rome              1.000  0.500  1.000  0.750   1.000  0.0100  +0.0200   0.50  layer=1",
        "    skipped (no layer): never",
    ]


@pytest.mark.parametrize("record", [LOCATE, STEER, EDIT, BenchmarkRun(("steer", "edit"), steer=STEER, edit=EDIT)])
def test_records_round_trip_through_json(record) -> None:
    data = json.loads(json.dumps(record.to_json()))
    assert data["schema"] == 3 and type(record).from_json(data) == record


def test_a_record_of_another_schema_is_refused() -> None:
    with pytest.raises(InputError, match="schema 3"):
        LocateRun.from_json({**LOCATE.to_json(), "schema": 2})


def test_locate_result_and_selection_curve_text() -> None:
    result = LocateResult(torch.tensor([[0.5, -2.0], [0.25, 0.0]]), (("layer", ("0", "1")), ("head", ("0", "1"))),
                          method="patching", metric="logit_diff")
    assert locate_result(result, k=2).split("\n") == [
        "patching on logit_diff: layer[2] × head[2]", "  1. 0@1  -2", "  2. 0@0  0.5"]
    curve = (CurvePoint({"alpha": 1.0}, SteerScores(0.25), 0.01, 0.0),
             CurvePoint({"alpha": 2.0}, SteerScores(0.5), 0.2, 0.125))
    text = selection_curve(Selection(curve, (None, None), 0.1, skipped=({"alpha": 4.0},)))
    assert text.split("\n") == [
        "    success        KL     dloss  settings (KL budget 0.1)",
        "*      0.25      0.01        +0  alpha=1",
        "-       0.5       0.2    +0.125  alpha=2",
        "    skipped  alpha=4",
    ]
