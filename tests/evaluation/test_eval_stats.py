"""rliable-style aggregates, stratified bootstrap and probability of improvement."""

from __future__ import annotations

import numpy as np
import pytest

from posttrain.evaluation import (
    Interval,
    aggregate_mean,
    aggregate_median,
    aggregate_with_ci,
    iqm,
    optimality_gap,
    performance_profile,
    probability_of_improvement,
    probability_of_improvement_ci,
    stratified_bootstrap_ci,
)


def _trim_mean_reference(x, prop=0.25):
    """scipy.stats.trim_mean(x, prop, axis=None) written out (scipy is not a dependency)."""
    a = np.sort(np.ravel(x))
    lowercut = int(prop * a.size)
    return a[lowercut : a.size - lowercut].mean()


def test_iqm_by_hand():
    assert iqm([8, 1, 7, 2, 6, 3, 5, 4]) == pytest.approx(4.5)  # middle: 3, 4, 5, 6
    assert iqm([[0, 100, 1, 2], [3, 4, 100, 0]]) == pytest.approx(2.5)  # pooled runs x tasks
    assert iqm(np.arange(10.0)) == pytest.approx(np.mean([2, 3, 4, 5, 6, 7]))  # cut = int(2.5) = 2
    assert iqm([3.0]) == 3.0
    assert iqm([1.0, 5.0, 9.0]) == pytest.approx(5.0)  # int(0.75) = 0: plain mean


def test_iqm_matches_trim_mean():
    rng = np.random.default_rng(0)
    for shape in [(3, 1), (5, 7), (10, 3), (1, 13), (4, 4)]:
        x = rng.standard_normal(shape)
        assert iqm(x) == pytest.approx(_trim_mean_reference(x), abs=1e-12)


def test_iqm_matches_scipy_trim_mean():
    rng = np.random.default_rng(5)
    scipy_stats = pytest.importorskip("scipy.stats", reason="scipy not installed (iqm is checked against the written-out trim_mean formula instead)")
    x = rng.standard_normal((7, 5))
    assert iqm(x) == pytest.approx(scipy_stats.trim_mean(x, 0.25, axis=None))


def test_mean_median_optimality_gap():
    x = np.array([[0.5, 1.2, 0.1], [0.9, 0.0, 0.3]])
    assert aggregate_mean(x) == pytest.approx(x.mean())
    assert aggregate_median(x) == pytest.approx(np.median([0.7, 0.6, 0.2]))
    # gaps: 0.5, 0, 0.9, 0.1, 1.0, 0.7 -> 3.2 / 6
    assert optimality_gap(x) == pytest.approx(3.2 / 6)
    assert optimality_gap(x, gamma=0.5) == pytest.approx((0 + 0 + 0.4 + 0 + 0.5 + 0.2) / 6)


def test_bootstrap_is_deterministic_and_leaves_global_rng_alone():
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(5, 8))
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = stratified_bootstrap_ci(x, iqm, reps=300, seed=7)
    b = stratified_bootstrap_ci(x, iqm, reps=300, seed=7)
    c = stratified_bootstrap_ci(x, iqm, reps=300, seed=8)
    assert (a.point, a.low, a.high) == (b.point, b.low, b.high)
    assert (a.low, a.high) != (c.low, c.high)
    assert a.low <= a.point <= a.high
    assert np.array_equal(np.random.get_state()[1], before)
    point, low, high = a  # unpacks
    assert isinstance(a, Interval) and point == a.point


def test_bootstrap_is_stratified_by_task():
    x = np.array([[0.0, 10.0], [1.0, 11.0], [2.0, 12.0]])

    def stays_in_column(m):
        return float(all(set(m[:, j]) <= set(x[:, j]) for j in range(x.shape[1])) and m.shape == x.shape)

    iv = stratified_bootstrap_ci(x, stays_in_column, reps=200, seed=0)
    assert iv.low == iv.high == 1.0


def test_bootstrap_vector_statistic():
    x = np.random.default_rng(2).uniform(size=(6, 4))
    iv = stratified_bootstrap_ci(x, lambda m: np.array([m.mean(), iqm(m)]), reps=200)
    assert iv.point.shape == iv.low.shape == iv.high.shape == (2,)
    assert np.all(iv.low <= iv.high)


def test_bootstrap_coverage_sanity():
    rng = np.random.default_rng(3)
    true_mean, hits, trials = 0.3, 0, 60
    for t in range(trials):
        x = rng.normal(true_mean, 1.0, size=(20, 3))
        iv = stratified_bootstrap_ci(x, aggregate_mean, reps=400, seed=t)
        hits += iv.contains(true_mean)
    assert hits / trials >= 0.8  # nominal 0.95; the percentile bootstrap undercovers a little


def test_aggregate_with_ci_single_seed_is_degenerate():
    res = aggregate_with_ci(np.array([[0.4]]), reps=50)
    assert res["mean"].point == res["mean"].low == res["mean"].high == pytest.approx(0.4)
    assert res["optimality_gap"].point == pytest.approx(0.6)


def test_probability_of_improvement_by_hand():
    x = np.array([[1, 2, 3], [3, 2, 1]])  # 2 runs x 3 tasks
    y = np.array([[2, 2, 2], [0, 5, 1]])
    # task 0: 3/4; task 1: (0.5 + 0 + 0.5 + 0)/4 = 1/4; task 2: (1 + 1 + 0 + 0.5)/4 = 5/8
    assert probability_of_improvement(x, y) == pytest.approx((0.75 + 0.25 + 0.625) / 3)
    assert probability_of_improvement(x, y) + probability_of_improvement(y, x) == pytest.approx(1.0)
    assert probability_of_improvement(x, x) == pytest.approx(0.5)
    # unequal run counts are fine; unequal task counts are not
    assert probability_of_improvement(np.ones((3, 2)), np.zeros((5, 2))) == 1.0
    with pytest.raises(ValueError):
        probability_of_improvement(np.ones((3, 2)), np.zeros((3, 3)))


def test_probability_of_improvement_ci():
    rng = np.random.default_rng(4)
    x = rng.normal(1.0, 0.3, size=(5, 4))
    y = rng.normal(0.0, 0.3, size=(5, 4))
    iv = probability_of_improvement_ci(x, y, reps=300, seed=0)
    assert iv.low <= iv.point <= iv.high and iv.point > 0.9
    again = probability_of_improvement_ci(x, y, reps=300, seed=0)
    assert (iv.low, iv.high) == (again.low, again.high)


def test_performance_profile():
    x = np.array([[0.1, 0.5], [0.9, 0.5]])
    pp = performance_profile(x, [0.0, 0.5, 0.95], reps=0)
    assert pp.profile.tolist() == [1.0, 0.25, 0.0]
    pp = performance_profile(x, [0.0, 0.5, 0.95], reps=200, seed=0)
    assert np.all(pp.low <= pp.profile + 1e-12) and np.all(pp.profile <= pp.high + 1e-12)
