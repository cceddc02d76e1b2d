"""Matplotlib figures of typed records (needs the ``plot`` extra; matplotlib is imported on the first call).

Example:
    >>> import torch
    >>> from lsi.locate.result import LocateResult
    >>> ax = plot_locate(LocateResult.over(["a", "b"], [0.5, 1.0], method="demo"))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from lsi.errors import InputError
from lsi.locate.result import LocateResult


def plot_locate(result: LocateResult, ax: Any = None, *, title: str | None = None) -> Any:
    """A bar chart (one axis) or heatmap (two axes) of a locate result; returns the matplotlib axes."""
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("matplotlib for plotting", "it is not installed", "pip install 'lsi[plot]'") from None
    if len(result.axes) > 2:
        raise InputError("a result with one or two axes to plot", f"{len(result.axes)} axes",
                         "index the scores first, e.g. a per-layer slice")
    if ax is None:
        _, ax = plt.subplots(figsize=(max(4.0, 0.35 * result.shape[-1]), 3.0 if len(result.axes) == 1 else 4.0))
    if len(result.axes) == 1:
        ax.bar(range(result.shape[0]), result.scores.numpy())
        ax.set_xticks(range(result.shape[0]), result.axes[0][1], rotation=90)
    else:
        lim = float(result.scores.abs().max()) or 1.0
        image = ax.imshow(result.scores.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_yticks(range(result.shape[0]), result.axes[0][1])
        ax.set_xticks(range(result.shape[1]), result.axes[1][1], rotation=90)
        ax.set_ylabel(result.axes[0][0])
        ax.set_xlabel(result.axes[1][0])
        ax.figure.colorbar(image, ax=ax)
    ax.set_title(title or f"{result.method}: {result.metric}")
    return ax
