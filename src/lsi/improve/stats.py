"""Uncertainty of test metrics: a point estimate with a percentile-bootstrap interval over examples.

Example:
    >>> e = bootstrap([1, 0, 1, 1], resamples=200, seed=0)
    >>> e.value, e.n, 0 <= e.low <= e.value <= e.high <= 1
    (0.75, 4, True)
    >>> bootstrap([2.0, 2.0]).to_json()
    {'value': 2.0, 'low': 2.0, 'high': 2.0, 'n': 2}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from lsi.errors import InputError

RESAMPLES = 1000
LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """A measured value with its interval (``None``: not measured / no interval) and the number of examples."""

    value: float | None
    low: float | None = None
    high: float | None = None
    n: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Estimate:
        return cls(data.get("value"), data.get("low"), data.get("high"), data.get("n"))


def bootstrap(values: Sequence[float] | np.ndarray, *, resamples: int = RESAMPLES, level: float = LEVEL,
              seed: int = 0) -> Estimate:
    """The mean of per-example ``values`` with a percentile-bootstrap ``level`` interval (``resamples`` draws of
    the examples with replacement, seeded)."""
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise InputError("at least one per-example value", "none", "measure the metric on a non-empty split")
    if not np.isfinite(x).all():
        raise InputError("finite per-example values", f"{int((~np.isfinite(x)).sum())} non-finite of {x.size}",
                         "check the measure (a NaN usually means a division by zero or a diverged model)")
    if resamples < 1 or not 0 < level < 1:
        raise InputError("resamples >= 1 and 0 < level < 1", f"resamples={resamples}, level={level}",
                         f"e.g. resamples={RESAMPLES}, level={LEVEL}")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Estimate(float(x.mean()), float(low), float(high), int(x.size))
