"""LocateResult: the one result type of every locate method.

Scores live in a tensor whose axes are named and labelled (``layer × position``, ``layer × head``, or a single
``object`` axis of site names). Every cell is one object of the universe; its label joins the axis labels with
``@`` (``"blocks.3.resid_pre@5"``), or is the single axis label. The result records the method, the metric and
the settings that produced it, and turns into a selection another method can consume. :mod:`lsi.report` renders
it (:func:`lsi.report.text.locate_result`, :func:`lsi.report.plot.plot_locate`).

Example:
    >>> import torch
    >>> r = LocateResult(torch.tensor([[0.25, 0.75], [0.5, -0.125]]), (("layer", ("0", "1")), ("head", ("0", "1"))),
    ...                  method="demo", metric="logit_diff")
    >>> r.top(2)
    [('0@1', 0.75), ('1@0', 0.5)]
    >>> r.mask(k=1).tolist()
    [[False, True], [False, False]]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from lsi.core.bundle import load_bundle, save_bundle
from lsi.errors import InputError

Axis = tuple[str, tuple[str, ...]]  # (axis name, one label per index)
By = Literal["signed", "abs"]
FORMAT_VERSION = 1


@dataclass(frozen=True)
class LocateResult:
    """Scores over a named universe. ``axes`` names each dimension of ``scores`` and labels every index.

    ``higher = more important`` for ``by="signed"``; ``by="abs"`` ranks by magnitude (effects of either sign).
    """

    scores: torch.Tensor
    axes: tuple[Axis, ...]
    method: str
    metric: str = ""
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        scores = self.scores.detach().to("cpu", torch.float32)
        axes = tuple((str(name), tuple(str(x) for x in labels)) for name, labels in self.axes)
        shape = tuple(len(labels) for _, labels in axes)
        if tuple(scores.shape) != shape:
            raise InputError(f"scores shaped like the axes {shape}", f"shape {tuple(scores.shape)}",
                             "give one label per index on every axis")
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "axes", axes)

    @classmethod
    def over(cls, labels: Sequence[str], scores: torch.Tensor | Sequence[float], *, method: str, metric: str = "",
             axis: str = "object", **settings: Any) -> LocateResult:
        """A result over a flat list of objects (site names, layers, edges, parameters)."""
        return cls(torch.as_tensor(scores, dtype=torch.float32), ((axis, tuple(labels)),), method=method,
                   metric=metric, settings=settings)

    # -- reading -----------------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.scores.shape)

    @property
    def labels(self) -> list[str]:
        """One label per cell, in row-major order (the order of ``scores.flatten()``)."""
        out = [""]
        for i, (_, labels) in enumerate(self.axes):
            out = [f"{prefix}@{label}" if i else label for prefix in out for label in labels]
        return out

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.labels, self.scores.flatten().tolist(), strict=True))

    def _key(self, by: By) -> torch.Tensor:
        if by not in get_args(By):
            raise InputError(f"by in {get_args(By)}", repr(by), "rank by='signed' (largest first) or by='abs'")
        flat = self.scores.flatten()
        return flat.abs() if by == "abs" else flat

    def _check_k(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise InputError("k, a whole number >= 0", repr(k), f"e.g. k=5; there are {self.scores.numel()} objects")

    def _order(self, by: By) -> torch.Tensor:
        key = self._key(by)
        key = torch.where(torch.isnan(key), torch.full_like(key, -math.inf), key)
        return torch.argsort(key, descending=True, stable=True)

    def top(self, k: int, *, by: By = "signed") -> list[tuple[str, float]]:
        """The ``k`` highest-scoring objects with their scores."""
        self._check_k(k)
        labels, flat = self.labels, self.scores.flatten()
        return [(labels[i], float(flat[i])) for i in self._order(by)[:k].tolist()]

    def above(self, threshold: float, *, by: By = "signed") -> list[str]:
        """Labels of the objects whose score (or |score|) is at least ``threshold``, best first."""
        key, labels = self._key(by), self.labels
        return [labels[i] for i in self._order(by).tolist() if key[i] >= threshold]

    def mask(self, *, k: int | None = None, threshold: float | None = None, by: By = "signed") -> torch.Tensor:
        """Boolean tensor shaped like ``scores``: the top ``k`` cells, or the cells at or above ``threshold``."""
        if k is not None and threshold is None:
            self._check_k(k)
            flat = torch.zeros(self.scores.numel(), dtype=torch.bool)
            flat[self._order(by)[:k]] = True
        elif threshold is not None and k is None:
            flat = self._key(by) >= threshold
        else:
            raise _k_or_threshold(k, threshold)
        return flat.reshape(self.scores.shape)

    def select(self, *, k: int | None = None, threshold: float | None = None, by: By = "signed") -> list[str]:
        """Labels of the selected objects (best first): what a steering method takes as its target."""
        if k is not None and threshold is None:
            return [label for label, _ in self.top(k, by=by)]
        if threshold is not None and k is None:
            return self.above(threshold, by=by)
        raise _k_or_threshold(k, threshold)

    # -- saving ------------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``path.json`` (axes, method, metric, settings) and ``path.safetensors`` (scores) atomically."""
        meta = {"format": FORMAT_VERSION, "method": self.method, "metric": self.metric,
                "axes": [[name, list(labels)] for name, labels in self.axes],
                "settings": jsonable(self.settings)}
        return save_bundle(path, {"scores": self.scores}, meta)

    @classmethod
    def load(cls, path: str | Path) -> LocateResult:
        """Read a result written by :meth:`save` (``path`` with or without a suffix)."""
        tensors, meta = load_bundle(path, what="a saved LocateResult", fix="pass the path given to LocateResult.save",
                                    format=FORMAT_VERSION)
        axes = tuple((name, tuple(labels)) for name, labels in meta["axes"])
        return cls(tensors["scores"], axes, method=meta["method"], metric=meta["metric"], settings=meta["settings"])

    def __repr__(self) -> str:
        dims = " × ".join(f"{name}[{len(labels)}]" for name, labels in self.axes)
        best = ", ".join(f"{label}={score:.3g}" for label, score in self.top(3, by="abs"))
        return f"LocateResult({self.method}, {self.metric or 'no metric'}; {dims}; top |score|: {best})"


def _k_or_threshold(k: int | None, threshold: float | None) -> InputError:
    return InputError("exactly one of k= and threshold=", f"k={k}, threshold={threshold}", "e.g. result.mask(k=5)")


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
