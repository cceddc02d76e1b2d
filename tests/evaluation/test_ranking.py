"""Ranking metrics against brute-force definitions."""

import itertools
import random

import pytest

from lsi.evaluation import ranking as metrics

pytestmark = pytest.mark.unit


def _brute_auroc(scores, truth):
    pairs = [(scores[p], scores[n]) for p in truth for n in scores if n not in truth]
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)


def _brute_ap(scores, truth):
    ranked = sorted(scores, key=lambda u: -scores[u])
    return sum(sum(v in truth for v in ranked[:k]) / k for k, u in enumerate(ranked, 1) if u in truth) / len(truth)


def _brute_spearman(a, b):
    """Pearson correlation of average ranks (a value's rank: how many are smaller, plus half its other ties)."""
    def ranks(v):
        return [sum(y < x for y in v) + (sum(y == x for y in v) - 1) / 2 for x in v]

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    return cov / (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5


def test_metrics_match_brute_force_on_random_cases():
    rng = random.Random(0)
    for _ in range(50):
        universe = [f"u{i}" for i in range(rng.randint(3, 12))]
        scores = {u: float(rng.randint(0, 5)) for u in universe}  # small integers: many ties
        truth = set(rng.sample(universe, rng.randint(1, len(universe) - 1)))
        assert metrics.auroc_of(scores, truth) == pytest.approx(_brute_auroc(scores, truth))
        other = {u: float(rng.randint(0, 3)) for u in universe}
        if len(set(scores.values())) > 1 and len(set(other.values())) > 1:
            assert metrics.spearman(scores, other) == pytest.approx(_brute_spearman(list(scores.values()),
                                                                                    list(other.values())))
        distinct = {u: s + 1e-3 * i for i, (u, s) in enumerate(scores.items())}
        assert metrics.average_precision(distinct, truth) == pytest.approx(_brute_ap(distinct, truth))


def test_precision_and_rank_correlation_by_hand():
    scores = {"a": 3.0, "b": 2.0, "c": 1.0, "d": 0.0}
    assert metrics.r_precision(scores, {"a", "c"}) == 0.5
    assert metrics.precision_at_k(scores, {"a", "c"}, 3) == pytest.approx(2 / 3)
    assert metrics.average_precision(scores, {"a", "c"}) == pytest.approx((1 + 2 / 3) / 2)
    assert metrics.spearman(scores, {k: 10 * v for k, v in scores.items()}) == pytest.approx(1.0)
    assert metrics.spearman(scores, {k: -v for k, v in scores.items()}) == pytest.approx(-1.0)
    constant = dict.fromkeys(scores, 1.0)
    assert metrics.spearman(scores, constant) == 0.0


def test_random_rankings_average_to_chance():
    universe = [f"u{i}" for i in range(6)]
    truth = {"u0", "u1"}
    perms = list(itertools.permutations(range(6)))
    aurocs = [metrics.auroc_of(dict(zip(universe, map(float, p), strict=True)), truth) for p in perms]
    assert sum(aurocs) / len(aurocs) == pytest.approx(0.5)
