import numpy as np
import pytest

from lsi.errors import InputError
from lsi.improve.stats import Estimate, bootstrap


@pytest.mark.unit
def test_bootstrap_matches_a_brute_force_percentile_bootstrap():
    values = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    rng = np.random.default_rng(7)
    means = [values[rng.integers(0, 10, size=10)].mean() for _ in range(500)]  # the same draws, one at a time
    e = bootstrap(values, resamples=500, seed=7, level=0.9)
    assert e.value == pytest.approx(0.7) and e.n == 10
    assert (e.low, e.high) == pytest.approx(tuple(np.percentile(means, [5, 95])))


@pytest.mark.unit
def test_bootstrap_interval_narrows_with_more_examples():
    rng = np.random.default_rng(0)
    small = bootstrap(rng.random(20), seed=1)
    large = bootstrap(rng.random(2000), seed=1)
    assert large.high - large.low < (small.high - small.low) / 3


@pytest.mark.unit
@pytest.mark.parametrize("values", [[], [1.0, float("nan")]])
def test_bootstrap_refuses_empty_or_non_finite_values(values):
    with pytest.raises(InputError):
        bootstrap(values)


@pytest.mark.unit
def test_estimate_round_trips_through_json():
    e = Estimate(0.5, 0.25, 0.75, 8)
    assert Estimate.from_json(e.to_json()) == e
