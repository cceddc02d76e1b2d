"""The README's main job: ``lsi improve`` runs every scenario on its built-in organism, prints a table per scenario
and writes one report that draws every figure in headless Chromium."""

import json
import os
import subprocess
import sys

import pytest

from lsi.improve.registry import load_recipes

pytestmark = [pytest.mark.acceptance, pytest.mark.slow]


def test_lsi_improve_runs_every_scenario_into_one_report(tmp_path, browser):
    from lsi.report.browser import visit

    out = tmp_path / "runs"
    done = subprocess.run([sys.executable, "-c", "from lsi.cli.main import main; main()", "improve", "--out",
                           str(out)], check=True, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    scenarios = sorted(load_recipes())
    for name in scenarios:
        assert f"== {name} (" in done.stdout
        assert json.loads((out / name / "result.json").read_text())["headline"]
    report = out / "report.html"
    assert f"report: {report}" in done.stdout
    figures = sum(len(r["curves"]) + len(r["heatmaps"]) for r in
                  (json.loads((out / n / "result.json").read_text()) for n in scenarios))
    with visit(report) as seen:
        seen.wait_until_drawn()
        assert seen.figure_count() == figures
        assert seen.problems() == []
