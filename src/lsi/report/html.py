"""The HTML report of run directories: one self-contained offline file (plotly.js inlined once, no network
reference) per run, or over several runs with a comparison table first.

A run's page shows its headline and notes, the metric table (variants incl. baselines × metrics grouped, with
intervals, better / worse than unsteered), the selection curves with the chosen point, the locate heatmaps with
token labels on hover, before / after generations, export checksums and the manifest (model, config, data hashes,
versions, seed, step timings). Empty parts of a result are left out. Needs plotly (a core dependency).

Example:
    >>> from pathlib import Path
    >>> write_report([Path("runs/safety")], Path("runs/safety/report.html"))  # doctest: +SKIP
    PosixPath('runs/safety/report.html')
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from lsi.errors import InputError
from lsi.report.html_figures import curve_figure, figure_div, heatmap_figure, plotly_js
from lsi.report.html_tables import (
    export_block,
    generations_table,
    kv_table,
    metric_table,
    ordered_metrics,
    steps_table,
)
from lsi.report.run_files import RunFiles, read_run

# The page may load nothing: scripts, styles and images are inline (plotly draws images as data: / blob: URLs).
_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
           "img-src data: blob:; font-src data:")
_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; color: #222; margin: 0; background: #fafafa; }
main { max-width: 1200px; margin: 0 auto; padding: 1rem 1.5rem 3rem; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 2px solid #ccc; padding-bottom: .2rem; margin-top: 2.5rem; }
h3 { margin-top: 1.8rem; }
nav > ul { columns: 2; } .headline { font-size: 1.1rem; font-weight: 600; }
.warning { background: #fff3cd; border: 1px solid #e0c36a; padding: .4rem .7rem; }
table { border-collapse: collapse; margin: .5rem 0; background: #fff; }
th, td { border: 1px solid #ddd; padding: .25rem .5rem; vertical-align: top; text-align: left; }
th.group { text-align: center; background: #eef; } td.num { text-align: right; white-space: nowrap; }
.ci, .legend { color: #666; font-size: .85em; } .na { color: #999; }
.better { background: #c8ecc8; } .better.within { background: #ecf8ec; }
.worse { background: #f6c6c6; } .worse.within { background: #fcecec; }
.kind { font-size: .75em; color: #fff; background: #777; border-radius: 3px; padding: 0 .3em; }
.kind.method { background: #3465a4; } .chosen { color: #d62728; }
tr.pending td { color: #a60; } tr.total td { font-weight: 600; }
table.generations td { width: 30%; } table.generations td:last-child { width: 10%; }
pre { white-space: pre-wrap; margin: 0; font: 13px/1.35 ui-monospace, monospace; }
code { font: 12px ui-monospace, monospace; word-break: break-all; }
dl.metrics dt { font-weight: 600; } dl.metrics dd { margin: 0 0 .3rem 1.5rem; color: #444; }
.figure { background: #fff; border: 1px solid #ddd; margin: .8rem 0; }
"""


def render_run(run_dir: Path) -> str:
    """The HTML page of one run directory (see :func:`render_runs`)."""
    return render_runs([run_dir])


def render_runs(run_dirs: Sequence[Path]) -> str:
    """The HTML page of one or more run directories; over several, a comparison comes first (an overview and one
    metric table with every run's rows on the metrics they share), then each run's own sections."""
    if isinstance(run_dirs, (str, Path)) or not run_dirs:
        raise InputError("a list of one or more run directories", repr(run_dirs), "pass [Path('runs/NAME'), ...]")
    runs = [read_run(Path(d)) for d in run_dirs]
    names = [run.run["name"] for run in runs]
    title = f"lsi run: {names[0]}" if len(runs) == 1 else f"lsi runs: {', '.join(names)}"
    parts = [_parts(run, f"run{i}") for i, run in enumerate(runs)]
    sections = [_run_section(run, f"run{i}", run_parts)
                for i, (run, run_parts) in enumerate(zip(runs, parts, strict=True))]
    comparison = _comparison(runs) if len(runs) > 1 else ""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{_POLICY}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{_STYLE}</style><script>{plotly_js()}</script></head>"
            f"<body><main><h1>{escape(title)}</h1>{_contents(runs, parts)}{comparison}{''.join(sections)}"
            f"</main></body></html>")


def write_report(run_dirs: Sequence[Path], out: Path) -> Path:
    """Write the page of ``run_dirs`` to ``out`` atomically (a temporary file beside it, then a rename);
    returns ``out``."""
    page = render_runs(run_dirs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(page)
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return out


# -- page parts -----------------------------------------------------------------------------------------------------
def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h3>{escape(title)}</h3>{body}</section>' if body else ""


def _parts(run: RunFiles, prefix: str) -> list[tuple[str, str, str]]:
    """``(anchor, title, body)`` of a run's sections (an empty body: left out)."""
    result = run.result
    table = _metrics_block(result) if result["metrics"] and result["rows"] else ""
    curves = "".join(_figure(curve_figure(c), f"{prefix}-curve-{i}") for i, c in enumerate(result["curves"]))
    heatmaps = "".join(_figure(heatmap_figure(h), f"{prefix}-heatmap-{i}") for i, h in enumerate(result["heatmaps"]))
    generations = generations_table(result["generations"]) if result["generations"] else ""
    export = export_block(result["export"]) if result["export"] is not None else ""
    return [
        (f"{prefix}-results", "Results: target, side effects and baselines", table),
        (f"{prefix}-curves", "Selection curves", curves),
        (f"{prefix}-heatmaps", "Locate heatmaps", heatmaps),
        (f"{prefix}-generations", "Generations before / after", generations),
        (f"{prefix}-export", "Export", export),
        (f"{prefix}-manifest", "Manifest", _manifest(run.run)),
    ]


_LEGEND = ('<p class="legend">Green: better than the unsteered row, red: worse (pale: the value\'s interval contains '
           "the unsteered value). ↑ / ↓: higher / lower is better. ★: the chosen variant. [low, high]: the interval; "
           "hover a value for its sample size, a variant for what it is.</p>")


def _metrics_block(result: Mapping[str, Any]) -> str:
    """The metric table, its legend and what each metric measures."""
    described = "".join(f"<dt>{escape(m['label'])} ({escape(m['group'])})</dt><dd>{escape(m['description'])}</dd>"
                        for m in ordered_metrics(result["metrics"]))
    return f'{metric_table([(None, result)], result["metrics"])}{_LEGEND}<dl class="metrics">{described}</dl>'


def _figure(figure: Any, div_id: str) -> str:
    return f'<div class="figure">{figure_div(figure, div_id)}</div>'


def _run_section(run: RunFiles, prefix: str, parts: Sequence[tuple[str, str, str]]) -> str:
    manifest, result = run.run, run.result
    model = manifest["model"]
    lines = [
        f'<section class="run" id="{prefix}"><h2>{escape(manifest["name"])}</h2>',
        f"<p>scenario <b>{escape(manifest['scenario'])}</b> · recipe <b>{escape(manifest['recipe'])}</b> · "
        f"model <b>{escape(model['spec'])}</b></p>",
        f"<p>{escape(manifest['description'])}</p>",
        f'<p class="headline">{escape(result["headline"])}</p>',
    ]
    pending = [s["name"] for s in manifest["steps"] if s["status"] != "done"]
    if manifest["finished"] is None or pending:
        lines.append(f'<p class="warning">unfinished run: pending steps {escape(", ".join(pending) or "none")}</p>')
    if result["chosen"] is not None:
        lines.append(f"<p>chosen: <b>{escape(result['chosen'])}</b> <span class=\"chosen\">★</span></p>")
    if result["notes"]:
        lines.append('<ul class="notes">' + "".join(f"<li>{escape(n)}</li>" for n in result["notes"]) + "</ul>")
    lines.extend(_section(*part) for part in parts)
    lines.append("</section>")
    return "".join(lines)


def _manifest(run: Mapping[str, Any]) -> str:
    model = run["model"]
    overview = {"name": run["name"], "scenario": run["scenario"], "recipe": run["recipe"], "model": model["spec"],
                "family": model["family"], "seed": run["seed"], "started": run["started"], "finished": run["finished"]}
    return "".join([
        kv_table(overview),
        "<h4>Model identity</h4>", kv_table(model["identity"]),
        "<h4>Config</h4>", kv_table(run["config"]),
        "<h4>Data (sha256)</h4>", kv_table(run["data"], code=True),
        "<h4>Versions</h4>", kv_table(run["versions"]),
        "<h4>Steps</h4>", steps_table(run["steps"]),
    ])


def _contents(runs: Sequence[RunFiles], parts: Sequence[Sequence[tuple[str, str, str]]]) -> str:
    items = ['<li><a href="#comparison">Comparison</a></li>'] if len(runs) > 1 else []
    for i, (run, run_parts) in enumerate(zip(runs, parts, strict=True)):
        links = "".join(f'<li><a href="#{anchor}">{escape(title)}</a></li>' for anchor, title, body in run_parts
                        if body)
        items.append(f'<li><a href="#run{i}">{escape(run.run["name"])}</a><ul>{links}</ul></li>')
    return f"<nav><ul>{''.join(items)}</ul></nav>"


def _comparison(runs: Sequence[RunFiles]) -> str:
    overview = "".join(
        f'<tr><td><a href="#run{i}">{escape(r.run["name"])}</a></td><td>{escape(r.run["scenario"])}</td>'
        f'<td>{escape(r.run["model"]["spec"])}</td><td>{escape(r.result["chosen"] or "—")}</td>'
        f'<td>{escape(r.result["headline"])}</td></tr>' for i, r in enumerate(runs))
    shared_keys = set.intersection(*({m["key"] for m in r.result["metrics"]} for r in runs))
    shared = [m for m in runs[0].result["metrics"] if m["key"] in shared_keys]
    table = (metric_table([(r.run["name"], r.result) for r in runs], shared) if shared
             else "<p>The runs share no metric.</p>")
    return ('<section id="comparison"><h2>Comparison</h2><table class="overview"><tr><th>run</th><th>scenario</th>'
            f"<th>model</th><th>chosen</th><th>headline</th></tr>{overview}</table>"
            f"<h3>Metrics every run measured</h3>{table}{_LEGEND if shared else ''}</section>")
