"""Ranking metrics for grading a locate method's scores against a known set of components.

Example:
    >>> scores = {"a": 0.9, "b": 0.1, "c": 0.5, "d": 0.0}
    >>> r_precision(scores, {"a", "c"}), auroc_of(scores, {"a", "c"}), average_precision(scores, {"a", "c"})
    (1.0, 1.0, 1.0)
    >>> auroc([1.0, 0.5], [0.5])
    0.75
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def auroc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """Mann–Whitney AUROC of scores ``pos`` against ``neg`` (ties count one half)."""
    p, n = np.asarray(pos, dtype=float), np.asarray(neg, dtype=float)
    greater = (p[:, None] > n[None, :]).sum()
    ties = (p[:, None] == n[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(p) * len(n)))


def _ranked(scores: Mapping[str, float]) -> list[str]:
    return sorted(scores, key=lambda k: -scores[k])


def precision_at_k(scores: Mapping[str, float], truth: set[str], k: int) -> float:
    """Fraction of the ``k`` highest-scoring components that are in ``truth``."""
    return sum(u in truth for u in _ranked(scores)[:k]) / k


def r_precision(scores: Mapping[str, float], truth: set[str]) -> float:
    """precision@|G|: of the |G| highest-scoring components, the fraction in G."""
    return precision_at_k(scores, truth, len(truth))


def auroc_of(scores: Mapping[str, float], truth: set[str]) -> float:
    """AUROC of the scores with the truth as positives and every other component as negatives."""
    return auroc([s for u, s in scores.items() if u in truth], [s for u, s in scores.items() if u not in truth])


def average_precision(scores: Mapping[str, float], truth: set[str]) -> float:
    """Mean of precision@k over the ranks k at which a true component appears."""
    hits, total = 0, 0.0
    for k, u in enumerate(_ranked(scores), start=1):
        if u in truth:
            hits += 1
            total += hits / k
    return total / len(truth)


def rank_correlation(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of two equally long sequences (average ranks for ties); nan if one is constant."""
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def spearman(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Spearman rank correlation of two score maps over the same components; 0 if either is constant."""
    keys = list(a)
    rho = rank_correlation([a[k] for k in keys], [b[k] for k in keys])
    return 0.0 if math.isnan(rho) else rho


def _ranks(values: Sequence[float]) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    order = v.argsort(kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(len(v), dtype=float)
    for value in np.unique(v):  # average the ranks of ties
        tied = v == value
        ranks[tied] = ranks[tied].mean()
    return ranks
