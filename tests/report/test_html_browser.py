"""The written report in a real headless browser (the Debian chromium, driven by playwright): every figure is
drawn, nothing is logged as an error, nothing is requested from the network, and a heatmap's hover names the token.

Skipped when Chromium or playwright is missing, unless ``LSI_REQUIRE_BROWSER=1`` (CI), which turns that into a
failure."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lsi.report.browser import FIGURES, visit
from lsi.report.html import write_report

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("browser")]


def test_a_comparison_page_draws_every_figure_offline(make_run_dir: Callable[..., Path], result_json: dict[str, Any],
                                                      tmp_path: Path) -> None:
    out = write_report([make_run_dir("alpha"), make_run_dir("beta")], tmp_path / "report.html")
    expected = 2 * (len(result_json["curves"]) + len(result_json["heatmaps"]))
    with visit(out) as seen:
        seen.wait_until_drawn()
        assert seen.figure_count() == expected
        assert seen.page.locator(FIGURES).count() == seen.page.locator(".js-plotly-plot").count()
        assert seen.page.title() == "lsi runs: alpha, beta"
        assert seen.problems() == []


def test_a_heatmap_names_the_token_under_the_pointer(run_dir: Path, result_json: dict[str, Any],
                                                     tmp_path: Path) -> None:
    out = write_report([run_dir], tmp_path / "report.html")
    heatmap = result_json["heatmaps"][0]
    with visit(out) as seen:
        seen.wait_until_drawn()
        assert seen.figure_count() == len(result_json["curves"]) + len(result_json["heatmaps"])
        area = seen.page.locator("#run0-heatmap-0 .nsewdrag")
        area.scroll_into_view_if_needed()
        box = area.bounding_box()
        assert box is not None
        columns, rows = len(heatmap["x"]), len(heatmap["y"])
        # layer "2" (the top row: row 0 is at the bottom) at position 2, the second of two "the" tokens
        seen.page.mouse.move(box["x"] + box["width"] * 2.5 / columns, box["y"] + box["height"] * 0.5 / rows)
        hover = seen.page.locator("#run0-heatmap-0 .hovertext")
        hover.wait_for(timeout=10_000)
        assert hover.text_content() == "layer: 2position: thevalue: 1.1cell 2,2"
        assert seen.problems() == []
