"""LocateResult: labels, ranking, selections, save/load round trip, plotting, bad input."""

import json

import pytest
import torch

from lsi.errors import InputError
from lsi.locate.result import LocateResult
from lsi.report.plot import plot_locate

pytestmark = pytest.mark.unit


@pytest.fixture
def grid() -> LocateResult:
    scores = torch.tensor([[0.1, -0.9, 0.3], [0.4, float("nan"), -0.2]])
    return LocateResult(scores, (("site", ("blocks.0.resid_pre", "blocks.1.resid_pre")), ("position", ("0", "1", "2"))),
                        method="activation_patching", metric="logit_diff", settings={"direction": "denoise"})


def test_labels_follow_row_major_order(grid: LocateResult) -> None:
    assert grid.labels[:4] == ["blocks.0.resid_pre@0", "blocks.0.resid_pre@1", "blocks.0.resid_pre@2",
                               "blocks.1.resid_pre@0"]
    assert grid.as_dict()["blocks.1.resid_pre@2"] == pytest.approx(-0.2)


def test_top_ranks_signed_or_by_magnitude_and_puts_nan_last(grid: LocateResult) -> None:
    assert [label for label, _ in grid.top(2)] == ["blocks.1.resid_pre@0", "blocks.0.resid_pre@2"]
    assert grid.top(1, by="abs")[0] == ("blocks.0.resid_pre@1", pytest.approx(-0.9))
    assert grid.top(6)[-1][0] == "blocks.1.resid_pre@1"


def test_mask_and_select_agree(grid: LocateResult) -> None:
    mask = grid.mask(k=2, by="abs")
    assert mask.shape == grid.shape and mask.sum() == 2
    assert mask[0, 1] and mask[1, 0]
    assert grid.select(k=2, by="abs") == ["blocks.0.resid_pre@1", "blocks.1.resid_pre@0"]
    assert grid.select(threshold=0.3) == ["blocks.1.resid_pre@0", "blocks.0.resid_pre@2"]
    assert grid.mask(threshold=0.3).tolist() == [[False, False, True], [True, False, False]]
    assert grid.mask(threshold=0.3, by="abs").tolist() == [[False, True, True], [True, False, False]]
    assert grid.above(0.35, by="abs") == ["blocks.0.resid_pre@1", "blocks.1.resid_pre@0"]


def test_save_load_round_trip(grid: LocateResult, tmp_path) -> None:
    path = grid.save(tmp_path / "runs" / "patching")
    assert path.suffix == ".json" and json.loads(path.read_text())["settings"] == {"direction": "denoise"}
    back = LocateResult.load(tmp_path / "runs" / "patching.json")
    assert back.axes == grid.axes and back.method == grid.method and back.metric == grid.metric
    assert torch.equal(back.scores.nan_to_num(7.0), grid.scores.nan_to_num(7.0))


def test_over_builds_a_flat_result_and_the_report_plots_it() -> None:
    flat = LocateResult.over(["blocks.0", "blocks.1"], [0.5, 0.1], method="block_influence", n_texts=3)
    assert flat.axes == (("object", ("blocks.0", "blocks.1")),) and flat.settings == {"n_texts": 3}
    import matplotlib

    matplotlib.use("Agg")
    assert plot_locate(flat).get_title() == "block_influence: "
    assert "block_influence" in repr(flat)


def test_bad_input_is_typed(grid: LocateResult, tmp_path) -> None:
    with pytest.raises(InputError, match="scores shaped like the axes"):
        LocateResult(torch.zeros(3), (("object", ("a", "b")),), method="m")
    with pytest.raises(InputError, match="exactly one of k= and threshold="):
        grid.mask()
    with pytest.raises(InputError, match="exactly one of k= and threshold="):
        grid.select(k=1, threshold=0.5)
    with pytest.raises(InputError, match="missing"):
        LocateResult.load(tmp_path / "nothing")
    cube = LocateResult(torch.zeros(1, 1, 1), (("a", ("0",)), ("b", ("0",)), ("c", ("0",))), method="m")
    with pytest.raises(InputError, match="one or two axes"):
        plot_locate(cube)


def test_ranking_refuses_an_unknown_by_and_a_negative_k():
    r = LocateResult.over(["a", "b", "c"], [0.1, -0.5, 0.3], method="demo")
    with pytest.raises(InputError, match="by in"):
        r.top(2, by="absolute")
    with pytest.raises(InputError, match="by in"):
        r.select(k=1, by="magnitude")
    with pytest.raises(InputError, match="k, a whole number"):
        r.top(-1)
    assert r.top(0) == [] and [label for label, _ in r.top(3, by="abs")] == ["b", "c", "a"]


def test_a_name_with_a_dot_keeps_its_whole_name_on_disk(tmp_path):
    r = LocateResult.over(["a", "b"], [1.0, 2.0], method="demo")
    r.save(tmp_path / "alpha0.5")
    LocateResult.over(["a", "b"], [3.0, 4.0], method="demo").save(tmp_path / "alpha0.25")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alpha0.25.json", "alpha0.25.safetensors",
                                                          "alpha0.5.json", "alpha0.5.safetensors"]
    assert LocateResult.load(tmp_path / "alpha0.5.json").scores.tolist() == [1.0, 2.0]
    assert LocateResult.load(tmp_path / "alpha0.5").scores.tolist() == [1.0, 2.0]


def test_mask_refuses_a_negative_k():
    with pytest.raises(InputError, match="k, a whole number"):
        LocateResult.over(["a", "b", "c"], [0.1, -0.5, 0.3], method="demo").mask(k=-1)
