"""The HTML report of synthetic run directories: every section and figure, plotly.js inlined once, nothing that
points at the network, escaped text, the metric table's grouping and colouring, the comparison page, and typed
errors for run directories that cannot be rendered."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from lsi.errors import InputError
from lsi.report.html import render_run, render_runs, write_report
from lsi.report.html_figures import plotly_js
from lsi.report.run_files import GROUPS

pytestmark = pytest.mark.unit

SECTIONS = ("results", "curves", "heatmaps", "generations", "export", "manifest")
Json = dict[str, Any]


@pytest.fixture(scope="module")
def bundle() -> str:
    return plotly_js()


Table = list[list[tuple[str, str, str]]]


class _Tables(HTMLParser):
    """The tables of a page by class, in page order, each as rows of ``(tag, class, text)`` cells."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[Table]] = {}
        self._table: list[list[tuple[str, str, str]]] | None = None
        self._cell: list[Any] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        cls = dict(attrs).get("class") or ""
        if tag == "table":
            self._table = []
            self.tables.setdefault(cls, []).append(self._table)
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag in ("td", "th") and self._table is not None:
            self._cell = [tag, cls, ""]

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._table is not None and self._cell is not None:
            self._table[-1].append((self._cell[0], self._cell[1], " ".join(self._cell[2].split())))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell[2] += data


def tables(page: str) -> dict[str, list[Table]]:
    parser = _Tables()
    parser.feed(page)
    return parser.tables


def _without_bundle(page: str, bundle: str) -> str:
    assert page.count(bundle) == 1
    return page.replace(bundle, "")


def _figures(result: Json) -> int:
    return len(result["curves"]) + len(result["heatmaps"])


def test_a_run_page_has_every_section_and_figure(run_dir: Path, result_json: Json, bundle: str) -> None:
    page = render_run(run_dir)
    for section in SECTIONS:
        assert f'id="run0-{section}"' in page and f'href="#run0-{section}"' in page
    for figure in ("curve-0", "curve-1", "heatmap-0", "heatmap-1"):
        assert f'id="run0-{figure}"' in page
    rest = _without_bundle(page, bundle)
    assert _figures(result_json) == 4 and rest.count("Plotly.newPlot(") == 4
    assert rest.count("<script") == 1 + 4  # the bundle, then one per figure
    assert result_json["headline"] in page and result_json["notes"][0] in page
    assert 'id="comparison"' not in page
    assert render_runs([run_dir]) == page


class _Links(HTMLParser):
    """Every attribute of the page's elements that can load or link something."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str, str | None]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [(tag, name, value) for name, value in attrs if name in ("src", "href", "action", "srcset")]


def test_the_page_refers_to_nothing_on_the_network(run_dir: Path, bundle: str) -> None:
    page = render_run(run_dir)
    links = _Links()
    links.feed(page)
    assert links.links and all(tag == "a" and name == "href" and value and value.startswith("#")
                               for tag, name, value in links.links)  # in-page anchors only
    # plotly.js holds URL strings of features the page does not use (map tiles, its logo link); nothing else does
    rest = _without_bundle(page, bundle)
    assert not re.search(r"(https?:)?//[a-z]", rest, re.IGNORECASE)
    assert "default-src 'none'" in rest  # and the browser refuses any load


def test_text_is_escaped(run_dir: Path, hostile: str, bundle: str) -> None:
    rest = _without_bundle(render_run(run_dir), bundle)
    assert hostile == "<script>alert('x')</script> & \"quotes\""
    assert "<script>alert" not in rest and "alert(" in rest
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;quotes&quot;" in rest
    # inside a figure's JSON, the label is escaped for plotly and the JSON escapes its brackets
    assert "\\u003cbos\\u003e" not in rest and "&lt;bos&gt;" in rest


def test_the_metric_table_groups_metrics_and_colours_values_against_unsteered(run_dir: Path, result_json: Json,
                                                                             hostile: str) -> None:
    [(head, labels, *rows)] = tables(render_run(run_dir))["metrics"]
    assert [text for _, _, text in head[1:]] == list(GROUPS)  # one metric per group, in the report's order
    assert [text for _, _, text in labels] == [
        "refusal on held-out harmful ↓", "held-out templates ↓", "over-refusal on harmless ↓",
        "KL on unrelated text ↓", "capability retention ↑", "parameters touched ↓"]
    cells = {re.sub(r"( ★)? (method|baseline)$", "", row[0][2]): row[1:] for row in rows}
    assert list(cells) == [r["variant"] for r in result_json["rows"]]
    # (variant, column) -> (class, text), worked out by hand from the fixture
    expected = {
        ("unsteered", 0): ("num", "0.98 [0.95, 1]"),
        ("random direction", 3): ("num worse", "0.02"),
        ("random direction", 4): ("num worse within", "0.99 [0.97, 1]"),
        ("random direction", 0): ("num better within", "0.96 [0.9, 0.99]"),
        ("prompting", 0): ("num better", "0.5 [0.43, 0.57]"),
        ("prompting", 1): ("num na", "—"),  # no value
        ("prompting", 2): ("num na", "—"),  # null entry
        ("prompting", 3): ("num na", "—"),  # null value
        ("directional ablation", 2): ("num better", "0.02 [0, 0.04]"),
        ("directional ablation", 5): ("num worse", "12,288"),
        (f"addition {hostile}", 3): ("num worse", "0.3"),
        ("unsteered", 5): ("num", "0"),
    }
    for (variant, column), (cls, text) in expected.items():
        _, got_cls, got_text = cells[variant][column]
        assert (got_cls.strip(), got_text) == (cls, text), (variant, column)
    assert "★" in rows[3][0][2] and "★" not in "".join(c[2] for r in rows if r is not rows[3] for c in r)


def test_the_manifest_shows_config_hashes_versions_and_steps(run_dir: Path, hostile: str) -> None:
    found = tables(render_run(run_dir))
    kv = {row[0][2]: row[1][2] for table in found["kv"] for row in table}
    assert kv["recipe"] == "refusal_direction" and kv["model"] == "refusal_gate" and kv["seed"] == "0"
    assert kv["dev"] == "a" * 64 and kv["torch"] == "2.13.0" and kv["strengths"] == '{"min": 0.5, "max": 4.0}'
    assert kv["model.safetensors"] == "c" * 64  # export checksums
    assert [[c[2] for c in row] for row in found["steps"][0]] == [
        ["step", "status", "seconds"], ["locate", "done", "1.25"], ["steer", "done", "2.5"],
        ["evaluate", "done", "4"], ["total", "", "7.75"]]
    [generations] = found["generations"]
    assert [c[2] for c in generations[2]] == [hostile, "line one line two", hostile, "hostile text"]


def test_empty_parts_are_left_out(make_run_dir: Callable[..., Path], bundle: str) -> None:
    def unfinished(run: dict[str, Any]) -> None:
        run["finished"] = None
        run["steps"][-1] = {"name": "evaluate", "status": "pending", "seconds": None}

    def empty(result: dict[str, Any]) -> None:
        result.update(curves=[], heatmaps=[], generations=[], export=None, notes=[], metrics=[], rows=[],
                      chosen=None)

    page = render_run(make_run_dir("bare", unfinished, empty))
    for section in SECTIONS[:-1]:
        assert f'id="run0-{section}"' not in page and f'href="#run0-{section}"' not in page
    assert 'id="run0-manifest"' in page and 'class="notes"' not in page
    assert _without_bundle(page, bundle).count("Plotly.newPlot(") == 0
    assert "unfinished run: pending steps evaluate" in page


def test_a_comparison_page_over_two_runs(make_run_dir: Callable[..., Path], result_json: Json, bundle: str) -> None:
    def fewer_metrics(result: dict[str, Any]) -> None:
        result["metrics"] = [m for m in result["metrics"] if m["key"] != "params"]
        for row in result["rows"]:
            row["values"].pop("params", None)
        result["chosen"] = "prompting"

    first, second = make_run_dir("alpha"), make_run_dir("beta", edit_result=fewer_metrics)
    page = render_runs([first, second])
    assert page.count(bundle) == 1
    assert 'id="comparison"' in page and 'id="run0"' in page and 'id="run1"' in page
    for prefix in ("run0", "run1"):
        for figure in ("curve-0", "curve-1", "heatmap-0", "heatmap-1"):
            assert f'id="{prefix}-{figure}"' in page
    assert _without_bundle(page, bundle).count("Plotly.newPlot(") == 2 * _figures(result_json)
    found = tables(page)
    overview = [[c[2] for c in row] for row in found["overview"][0][1:]]
    assert [row[:2] + row[3:4] for row in overview] == [["alpha", "safety", "directional ablation"],
                                                       ["beta", "safety", "prompting"]]
    comparison, alpha, beta = found["metrics"]  # the comparison's, then each run's own
    head, labels, *rows = comparison
    assert [c[2] for c in head[2:]] == list(GROUPS[:-1])  # cost: measured by alpha only, not shared
    assert len(labels) == 5 and len(alpha[1]) == 6 and len(beta[1]) == 5
    n = len(result_json["rows"])
    assert len(rows) == 2 * n and rows[0][0] == ("th", "run-name", "alpha") and rows[n][0] == ("th", "run-name", "beta")
    assert all(len(row) == 1 + 5 for i, row in enumerate(rows) if i % n)  # variant + the 5 shared metrics
    assert "★" in rows[3][0][2] and "★" in rows[n + 2][0][2]  # each run's own chosen variant


def test_write_report_is_atomic(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "reports" / "safety.html"
    assert write_report([run_dir], out) == out
    assert out.read_text(encoding="utf-8") == render_run(run_dir)
    out.write_text("old")
    with pytest.raises(InputError):
        write_report([tmp_path / "nowhere"], out)
    assert out.read_text() == "old" and sorted(p.name for p in out.parent.iterdir()) == ["safety.html"]


def _set(**changes: Any) -> Callable[[Json], None]:
    return lambda data: data.update(changes)


# case: (file, change: None removes the file, a string replaces its text, a function edits its JSON),
#       then what the error's expected and found say
BAD: dict[str, tuple[str, Any, str, str]] = {
    "no run.json": ("run.json", None, "run.json in the run directory", "no such file"),
    "no result.json": ("result.json", None, "result.json in the run directory", "no such file"),
    "not JSON": ("result.json", "{'schema': 1", "result.json to hold JSON", "invalid JSON"),
    "newer schema": ("run.json", _set(schema=2), "schema 1", "schema an integer (2)"),
    "not an object": ("run.json", "[1, 2]", "schema 1", "schema an array"),
    "missing key": ("result.json", lambda r: r["rows"][1].pop("kind"), "rows[1].kind", "no such key"),
    "wrong type": ("run.json", _set(seed="0"), "seed to be an integer", "a string ('0')"),
    "bool for a number": ("result.json", lambda r: r["curves"][0]["series"][0]["points"][0].update(x=True),
                          "curves[0].series[0].points[0].x", "a boolean"),
    "unknown group": ("result.json", lambda r: r["metrics"][0].update(group="speed"),
                      "metrics[0].group to be one of 'target'", "a string ('speed')"),
    "unknown metric": ("result.json", lambda r: r["rows"][0]["values"].update(speed=None),
                       "keyed by metrics[].key", "['speed']"),
    "unknown chosen": ("result.json", _set(chosen="nothing"), "chosen naming a row", "'nothing'"),
    "chosen point out of range": ("result.json", lambda r: r["curves"][0]["chosen"].update(index=2),
                                  "curves[0].chosen naming a point", "index 2"),
    "heatmap shape": ("result.json", lambda r: r["heatmaps"][0]["z"][1].pop(),
                      "heatmaps[0].z with len(y) x len(x) = 3 x 4", "[4, 3, 4]"),
    "repeated variant": ("result.json", lambda r: r["rows"][1].update(variant="unsteered"),
                         "distinct rows[].variant", "['unsteered']"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_run_directories_raise_typed_errors(case: str, run_dir: Path) -> None:
    name, change, expected, found = BAD[case]
    path = run_dir / name
    if change is None:
        path.unlink()
    elif isinstance(change, str):
        path.write_text(change)
    else:
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
    with pytest.raises(InputError) as caught:
        render_run(run_dir)
    assert expected in caught.value.expected and found in caught.value.found and caught.value.fix


def test_a_missing_directory_or_no_directories_raise(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="a run directory"):
        render_run(tmp_path / "nowhere")
    with pytest.raises(InputError, match="one or more run directories"):
        render_runs([])
    with pytest.raises(InputError, match="one or more run directories"):
        render_runs(tmp_path)  # type: ignore[arg-type]
