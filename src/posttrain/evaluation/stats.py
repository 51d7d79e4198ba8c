"""Aggregate statistics with honest uncertainty, after Agarwal et al., "Deep Reinforcement
Learning at the Edge of the Statistical Precipice" (NeurIPS 2021, arXiv:2108.13264).

Scores are matrices shaped ``[runs, tasks]``: for LLM post-training, *runs* are training seeds
(or independent sampling seeds) and *tasks* are benchmarks or individual problems. A 1-D array
is read as ``[runs]`` of a single task.

Differences from the ``rliable`` package, on purpose:

* every resampling draws from an explicit ``numpy.random.Generator`` built from ``seed``; the
  same seed always gives the same interval and global RNG state is never touched (rliable's
  ``random_state`` argument does not control its resampling);
* numpy only (no scipy/arch), percentile intervals only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

__all__ = [
    "Interval",
    "iqm",
    "aggregate_mean",
    "aggregate_median",
    "optimality_gap",
    "stratified_bootstrap_ci",
    "aggregate_with_ci",
    "probability_of_improvement",
    "probability_of_improvement_ci",
    "performance_profile",
    "PerformanceProfile",
]

Statistic = Callable[[np.ndarray], "float | np.ndarray"]


def _as_matrix(scores) -> np.ndarray:
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        raise ValueError(f"scores must be [runs, tasks] (or [runs]), got shape {x.shape}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"scores must have at least one run and one task, got shape {x.shape}")
    if np.isnan(x).any():
        raise ValueError("scores contain NaN")
    return x


# ---------------------------------------------------------------------------------------------
# point estimates
# ---------------------------------------------------------------------------------------------


def iqm(scores) -> float:
    """Interquartile mean of all run x task scores pooled: sort the flattened scores, drop
    ``floor(0.25 * N)`` from each end and average the rest. Identical to
    ``scipy.stats.trim_mean(scores, 0.25, axis=None)``."""
    x = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))
    n = x.size
    if n == 0:
        raise ValueError("iqm of an empty array")
    cut = int(0.25 * n)
    return float(x[cut : n - cut].mean())


def aggregate_mean(scores) -> float:
    """Mean over tasks of the per-task mean over runs."""
    return float(_as_matrix(scores).mean(axis=0).mean())


def aggregate_median(scores) -> float:
    """Median over tasks of the per-task mean over runs (rliable's definition)."""
    return float(np.median(_as_matrix(scores).mean(axis=0)))


def optimality_gap(scores, gamma: float = 1.0) -> float:
    """Mean shortfall below the target ``gamma``: ``mean(max(gamma - x, 0))`` over all scores."""
    x = np.asarray(scores, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("optimality_gap of an empty array")
    return float(np.maximum(gamma - x, 0.0).mean())


# ---------------------------------------------------------------------------------------------
# bootstrap
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Interval:
    """A point estimate with a percentile bootstrap interval (floats, or arrays for vector
    statistics)."""

    point: float | np.ndarray
    low: float | np.ndarray
    high: float | np.ndarray
    conf: float = 0.95
    reps: int = 0

    def __iter__(self):  # allows ``point, low, high = interval``
        return iter((self.point, self.low, self.high))

    def contains(self, value: float) -> bool:
        return bool(np.all((self.low <= value) & (value <= self.high)))


def _percentiles(samples: np.ndarray, conf: float):
    if not 0.0 < conf < 1.0:
        raise ValueError(f"conf must lie in (0, 1), got {conf}")
    alpha = 100.0 * (1.0 - conf) / 2.0
    lo, hi = np.percentile(samples, [alpha, 100.0 - alpha], axis=0)
    return lo, hi


def _scalarize(v):
    v = np.asarray(v, dtype=np.float64)
    return float(v) if v.ndim == 0 else v


def _resample_runs(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Resample runs with replacement independently within every task (column)."""
    runs, tasks = x.shape
    idx = rng.integers(0, runs, size=(runs, tasks))
    return np.take_along_axis(x, idx, axis=0)


def stratified_bootstrap_ci(
    scores,
    statistic: Statistic = iqm,
    reps: int = 2000,
    conf: float = 0.95,
    seed: int = 0,
    *,
    task_bootstrap: bool = False,
) -> Interval:
    """Percentile bootstrap interval of ``statistic(scores)``.

    Each replicate resamples the runs with replacement independently within each task (the task
    is the stratum), so every task keeps its run count. With ``task_bootstrap=True`` the tasks
    are resampled with replacement as well (before the runs). ``statistic`` maps a
    ``[runs, tasks]`` matrix to a scalar or a 1-D array. Deterministic for a given ``seed``.
    """
    x = _as_matrix(scores)
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    rng = np.random.default_rng(seed)
    point = _scalarize(statistic(x))
    samples = []
    for _ in range(reps):
        xb = x
        if task_bootstrap:
            xb = xb[:, rng.integers(0, x.shape[1], size=x.shape[1])]
        samples.append(np.asarray(statistic(_resample_runs(xb, rng)), dtype=np.float64))
    lo, hi = _percentiles(np.stack(samples), conf)
    return Interval(point, _scalarize(lo), _scalarize(hi), conf, reps)


def aggregate_with_ci(
    scores,
    reps: int = 2000,
    conf: float = 0.95,
    seed: int = 0,
    gamma: float = 1.0,
) -> dict[str, Interval]:
    """IQM, mean, median and optimality gap of one score matrix, each with a stratified
    bootstrap interval from the *same* replicates."""
    names = ("iqm", "mean", "median", "optimality_gap")

    def stat(m: np.ndarray) -> np.ndarray:
        return np.array([iqm(m), aggregate_mean(m), aggregate_median(m), optimality_gap(m, gamma)])

    ci = stratified_bootstrap_ci(scores, stat, reps=reps, conf=conf, seed=seed)
    return {n: Interval(float(ci.point[i]), float(ci.low[i]), float(ci.high[i]), conf, reps) for i, n in enumerate(names)}


# ---------------------------------------------------------------------------------------------
# probability of improvement
# ---------------------------------------------------------------------------------------------


def probability_of_improvement(scores_x, scores_y) -> float:
    """P(X > Y): for each task, the Mann-Whitney statistic ``P(x > y) + 0.5 P(x == y)`` over
    all pairs of a run of X and a run of Y, then averaged over tasks. Run counts may differ;
    task counts must match."""
    x, y = _as_matrix(scores_x), _as_matrix(scores_y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"task counts differ: {x.shape[1]} vs {y.shape[1]}")
    diff = x[:, None, :] - y[None, :, :]  # [runs_x, runs_y, tasks]
    per_task = (diff > 0).mean(axis=(0, 1)) + 0.5 * (diff == 0).mean(axis=(0, 1))
    return float(per_task.mean())


def probability_of_improvement_ci(
    scores_x,
    scores_y,
    reps: int = 2000,
    conf: float = 0.95,
    seed: int = 0,
) -> Interval:
    """:func:`probability_of_improvement` with a percentile interval from resampling the runs
    of X and of Y independently (each stratified by task)."""
    x, y = _as_matrix(scores_x), _as_matrix(scores_y)
    rng = np.random.default_rng(seed)
    point = probability_of_improvement(x, y)
    samples = np.empty(reps)
    for b in range(reps):
        samples[b] = probability_of_improvement(_resample_runs(x, rng), _resample_runs(y, rng))
    lo, hi = _percentiles(samples, conf)
    return Interval(point, float(lo), float(hi), conf, reps)


# ---------------------------------------------------------------------------------------------
# performance profiles
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PerformanceProfile:
    taus: np.ndarray
    profile: np.ndarray
    low: np.ndarray
    high: np.ndarray


def _profile(x: np.ndarray, taus: np.ndarray) -> np.ndarray:
    # fraction of runs above tau per task, averaged over tasks (== pooled fraction when every
    # task has the same number of runs, which a matrix guarantees)
    return (x[None, :, :] > taus[:, None, None]).mean(axis=(1, 2))


def performance_profile(
    scores,
    taus: Sequence[float] | np.ndarray,
    reps: int = 2000,
    conf: float = 0.95,
    seed: int = 0,
) -> PerformanceProfile:
    """Score distribution ``P(score > tau)`` over all runs x tasks for each ``tau``, with
    stratified bootstrap percentile bands (``reps=0`` skips the bands: low = high = profile)."""
    x = _as_matrix(scores)
    t = np.asarray(taus, dtype=np.float64).reshape(-1)
    prof = _profile(x, t)
    if reps <= 0:
        return PerformanceProfile(t, prof, prof.copy(), prof.copy())
    ci = stratified_bootstrap_ci(x, lambda m: _profile(m, t), reps=reps, conf=conf, seed=seed)
    return PerformanceProfile(t, prof, np.atleast_1d(ci.low), np.atleast_1d(ci.high))
