import json

import pytest

from lsi.errors import InputError
from lsi.improve.record import Curve, Export, Generation, Heatmap, Metric, Point, Result, Row, Series, table_text
from lsi.improve.stats import Estimate


def _result() -> Result:
    metrics = (Metric("hit", "target hits", "target", True), Metric("kl", "KL", "side effect", False))
    rows = (Row("unsteered", "baseline", {"hit": Estimate(0.1, 0.0, 0.2, 10), "kl": Estimate(0.0)}),
            Row("steered", "method", {"hit": Estimate(0.9, 0.8, 1.0, 10)}, "adds v"))
    return Result("steering works", metrics, rows, "steered",
                  (Curve("dose", "alpha", "hit", (Series("layer 1", (Point(1, 0.5, "a"), Point(2, 0.9))),),
                         ("layer 1", 1)),),
                  (Heatmap("h", "pos", "layer", ("a", "b"), ("0",), ((0.1, None),), (("x", "y"),)),),
                  (Generation("p", "b", "a"),), Export("export", {"model.safetensors": "ab"}), ("a note",))


@pytest.mark.unit
def test_result_round_trips_through_json_text():
    r = _result()
    assert Result.from_json(json.loads(json.dumps(r.to_json()))) == r
    assert r.value("steered", "hit") == 0.9 and r.value("steered", "kl") is None


@pytest.mark.unit
def test_result_refuses_values_of_undeclared_metrics_and_an_unknown_choice():
    metrics = (Metric("hit", "hits", "target", True),)
    with pytest.raises(InputError, match="declared metrics"):
        Result("x", metrics, (Row("a", "method", {"miss": Estimate(1.0)}),), "a")
    with pytest.raises(InputError, match="chosen variant"):
        Result("x", metrics, (Row("a", "method", {}),), "b")
    with pytest.raises(InputError, match="metric group"):
        Metric("m", "m", "targets", True)
    with pytest.raises(InputError, match="schema"):
        Result.from_json({**_result().to_json(), "schema": 99})


@pytest.mark.unit
def test_table_text_marks_the_chosen_row_and_shows_intervals_on_request():
    lines = table_text(_result()).splitlines()
    assert lines[2].startswith("*steered") and "—" in lines[2] and "[" not in lines[2]
    assert "0.9 [0.8, 1]" in table_text(_result(), intervals=True)
