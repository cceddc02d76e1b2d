"""Plotly figures of a run's result (locate heatmaps, selection curves), each rendered as a ``<div>`` plus the
script that draws it; the page inlines plotly.js once (:func:`plotly_js`).

Text shown inside a figure goes through :func:`plotly_text`: plotly reads a subset of HTML in labels and
``%{...}`` placeholders in hover templates, so a token such as ``<bos>`` would otherwise vanish.

Example:
    >>> plotly_text("<bos> 50%{x}")
    '&lt;bos&gt; 50%&#123;x}'
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

CONFIG = {"displaylogo": False, "responsive": True}


def plotly_js() -> str:
    """The plotly.js bundle that ships with the plotly package (inlined: the page needs no network)."""
    from plotly.offline import get_plotlyjs

    return str(get_plotlyjs())


def plotly_text(text: str) -> str:
    """``text`` escaped for plotly's labels and hover templates (shown literally)."""
    return html.escape(text).replace("%{", "%&#123;")


def figure_div(figure: Any, div_id: str) -> str:
    """The ``<div>`` and inline script of a plotly figure (plotly.js itself is not included)."""
    import plotly.io as pio

    return str(pio.to_html(figure, full_html=False, include_plotlyjs=False, div_id=div_id, config=CONFIG))


def heatmap_figure(heatmap: Mapping[str, Any]) -> Any:
    """A heatmap of ``z`` over ``y`` (rows) × ``x`` (columns); the hover names the cell's labels (e.g. its token) and
    its hover text. Cells are placed by index, so repeated labels (the same token twice) stay separate columns."""
    import plotly.graph_objects as go

    x, y, z = heatmap["x"], heatmap["y"], heatmap["z"]
    hover = heatmap["hover"] or [["" for _ in x] for _ in y]
    custom = [[[plotly_text(x[j]), plotly_text(y[i]), plotly_text(hover[i][j])] for j in range(len(x))]
              for i in range(len(y))]
    x_label, y_label = plotly_text(heatmap["x_label"]), plotly_text(heatmap["y_label"])
    values = [v for row in z for v in row if v is not None]
    diverging = bool(values) and min(values) < 0 < max(values)
    trace = go.Heatmap(
        z=z, x=list(range(len(x))), y=list(range(len(y))), customdata=custom,
        colorscale="RdBu" if diverging else "Viridis", reversescale=diverging, zmid=0 if diverging else None,
        hovertemplate=(f"{y_label}: %{{customdata[1]}}<br>{x_label}: %{{customdata[0]}}<br>value: %{{z:.4~g}}"
                       "<br>%{customdata[2]}<extra></extra>"),
    )
    figure = go.Figure(trace)
    figure.update_layout(
        title=plotly_text(heatmap["title"]), template="plotly_white", height=max(320, 150 + 22 * len(y)),
        margin={"l": 70, "r": 20, "t": 50, "b": 90},
    )
    figure.update_xaxes(title=x_label, tickvals=list(range(len(x))), ticktext=[plotly_text(t) for t in x])
    figure.update_yaxes(title=y_label, tickvals=list(range(len(y))), ticktext=[plotly_text(t) for t in y])
    return figure


def curve_figure(curve: Mapping[str, Any]) -> Any:
    """One line per series (each point's label on hover), the chosen point marked by a star."""
    import plotly.graph_objects as go

    figure = go.Figure()
    for series in curve["series"]:
        figure.add_trace(_series_trace(go, series["name"], series["points"], chosen=False))
    chosen = curve["chosen"]
    if chosen is not None:
        points = next(s["points"] for s in curve["series"] if s["name"] == chosen["series"])
        figure.add_trace(_series_trace(go, f"chosen ({chosen['series']})", [points[chosen["index"]]], chosen=True))
    figure.update_layout(
        title=plotly_text(curve["title"]), template="plotly_white", height=380,
        xaxis_title=plotly_text(curve["x_label"]), yaxis_title=plotly_text(curve["y_label"]),
        margin={"l": 70, "r": 20, "t": 50, "b": 60},
    )
    return figure


def _series_trace(go: Any, name: str, points: Sequence[Mapping[str, Any]], *, chosen: bool) -> Any:
    marker = {"symbol": "star", "size": 18, "color": "#d62728", "line": {"width": 1, "color": "black"}} if chosen \
        else {"size": 7}
    return go.Scatter(
        x=[p["x"] for p in points], y=[p["y"] for p in points], name=plotly_text(name),
        mode="markers" if chosen else "lines+markers", marker=marker,
        customdata=[plotly_text(p["label"]) for p in points],
        hovertemplate=f"{plotly_text(name)}<br>%{{customdata}}<br>x: %{{x:.4~g}}<br>y: %{{y:.4~g}}<extra></extra>",
    )
