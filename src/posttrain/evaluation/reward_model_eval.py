"""Reliability of reward models and judges: the RETA curve and judge flip rates (numpy only).

**RETA** ("Reliable at η"; Chen et al., "Establishing Reliability Metrics for Reward Models in
Large Language Models", 2025-04-21, catalog 001-14; the seed digest that lists it gives no arXiv
id): the average quality, scored by an oracle, of the top-η quantile of responses as ranked by
the reward model (the proxy). Per prompt ``i`` with ``N_i`` responses, proxy scores ``r_ij``
and oracle scores ``o_ij``::

    k_i(η)    = ceil(η · N_i)                                   (at least 1 response)
    RETA_i(η) = 1/k_i · Σ_{j ∈ top_k_i(r_i)} o_ij
    RETA(η)   = 1/P · Σ_i RETA_i(η)                            (every prompt weighs the same)

``RETA(1)`` is the mean oracle score (random selection); the curve ranked by the oracle itself
is the best any proxy can do. A reliable RM has a curve that rises as η shrinks; the η with the
highest RETA is the quantile to keep in rejection sampling with that RM (the paper's use when the
RM is unreliable). The abstract gives the definition in words only; the formula above is our
reading of it. Ties in the proxy at the cut are split in expectation (each tied response counts
with weight (slots left) / (responses tied)), which is the mean over random tie-breaking, so a
constant proxy gives ``RETA(η) = RETA(1)`` for every η instead of favouring list order.

**Flip rates** (Tripathi et al., "Pairwise or Pointwise? Evaluating Feedback Protocols for Bias
in LLM-Based Evaluation", 2025-04-20, catalog 001-15; no arXiv id in the seed digest either): a
generator can flip a judge's preference by embedding a distractor feature in the worse
response; pairwise preferences flipped in about 35% of cases against 9% for absolute
(pointwise) scores. The abstract gives no formula;
our construction, for pairs ``(x, y)`` and a judge's signed *margin* ``m(x, y)`` (> 0: x
preferred; pointwise: ``s(x) − s(y)``; pairwise: see :func:`pairwise_margin`)::

    distractor flip_i = 1[m(x, y') < 0]  if m(x, y) > 0   (the distractor goes into the loser y)
                        1[m(x', y) > 0]  if m(x, y) < 0
                        excluded         if m(x, y) = 0   (no preference to flip)
    flip rate         = mean of flip_i over the pairs not excluded

with ``x'``, ``y'`` the responses with the distractor injected. Two diagnostics come with it:
the **order-swap flip** of a pairwise judge (its decision changes when A and B swap places:
position bias; a pointwise judge is order-invariant by construction) and the **protocol
disagreement** (pointwise and pairwise prefer different responses).

Confidence intervals are percentile bootstraps over prompts / pairs, through
:func:`posttrain.evaluation.stats.stratified_bootstrap_ci` (intervals per η, not a simultaneous
band).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from posttrain.evaluation.stats import Interval, stratified_bootstrap_ci

__all__ = [
    "reta_per_prompt",
    "reta_curve",
    "reta_summary",
    "default_etas",
    "check_etas",
    "pairwise_margin",
    "distractor_flips",
    "order_swap_flips",
    "protocol_disagreement",
    "rate_with_ci",
    "plot_reta",
]


# ---------------------------------------------------------------------------------------------
# RETA
# ---------------------------------------------------------------------------------------------


def check_etas(etas: Sequence[float]) -> list[float]:
    """The η values as floats, each in (0, 1]; a ``ValueError`` naming the bad ones otherwise."""
    out = []
    for e in etas:
        try:
            v = float(e)
        except (TypeError, ValueError):
            raise ValueError(f"eta {e!r} is not a number; every eta must lie in (0, 1]") from None
        if not (0.0 < v <= 1.0):
            raise ValueError(f"eta {e!r} out of range: every eta must lie in (0, 1] (the top fraction kept)")
        out.append(v)
    if not out:
        raise ValueError("no eta values given")
    return sorted(set(out))


def default_etas(n: int) -> list[float]:
    """``k/n`` for ``k = 1..n``: with ``n`` responses per prompt these are the distinct cuts."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [k / n for k in range(1, n + 1)]


def _top_k(n: int, eta: float) -> int:
    # the small slack keeps float products such as 0.3 * 10 = 3.0000000000000004 from rounding up
    return max(1, min(n, math.ceil(eta * n - 1e-9)))


def _reta_one(proxy: np.ndarray, oracle: np.ndarray, k: int) -> float:
    """Mean oracle of the top ``k`` by proxy, ties at the cut split in expectation."""
    order = np.argsort(-proxy, kind="stable")
    cut = proxy[order[k - 1]]
    above = proxy > cut
    tied = proxy == cut
    slots = k - int(above.sum())
    return float((oracle[above].sum() + slots * oracle[tied].mean()) / k)


def _groups(proxy_scores, oracle_scores, groups) -> list[tuple[np.ndarray, np.ndarray]]:
    r = np.asarray(proxy_scores, dtype=np.float64).reshape(-1)
    o = np.asarray(oracle_scores, dtype=np.float64).reshape(-1)
    g = np.asarray(groups).reshape(-1)
    if not (r.size == o.size == g.size):
        raise ValueError(f"proxy_scores, oracle_scores and groups differ in length: {r.size}, {o.size}, {g.size}")
    if r.size == 0:
        raise ValueError("no responses to rank")
    if not (np.isfinite(r).all() and np.isfinite(o).all()):
        raise ValueError("proxy and oracle scores must be finite")
    # first-appearance order of the groups, so per-prompt rows follow the input
    _, first = np.unique(g, return_index=True)
    return [(r[g == g[i]], o[g == g[i]]) for i in sorted(first)]


def reta_per_prompt(proxy_scores, oracle_scores, groups, etas: Sequence[float]) -> np.ndarray:
    """``[P, len(etas)]`` matrix of ``RETA_i(η)`` (see the module docstring); rows follow the
    order in which the groups first appear, columns the given ``etas``."""
    etas = list(etas)
    check_etas(etas)  # the order of the given etas is kept: columns follow them
    etas = [float(e) for e in etas]
    return np.array([[_reta_one(r, o, _top_k(r.size, e)) for e in etas]
                     for r, o in _groups(proxy_scores, oracle_scores, groups)])


def reta_curve(proxy_scores, oracle_scores, groups, etas: Sequence[float]) -> np.ndarray:
    """``RETA(η)`` for each η: per prompt, rank its responses by ``proxy_scores``, average the
    ``oracle_scores`` of the top ``ceil(η N)``; then average over prompts. Flat arrays, one
    entry per response; ``groups`` holds each response's prompt id."""
    return reta_per_prompt(proxy_scores, oracle_scores, groups, etas).mean(axis=0)


def _index_bootstrap(per_unit: np.ndarray, reps: int, conf: float, seed: int) -> Interval:
    """Bootstrap interval of the column means of ``per_unit [U, C]``, resampling whole rows:
    the resampled 'scores' are row indices, so every replicate keeps a row's columns together."""
    idx = np.arange(per_unit.shape[0], dtype=np.float64)
    return stratified_bootstrap_ci(idx, lambda m: per_unit[m[:, 0].astype(int)].mean(axis=0),
                                   reps=reps, conf=conf, seed=seed)


def reta_summary(proxy_scores, oracle_scores, groups, etas: Optional[Sequence[float]] = None, *,
                 reps: int = 1000, conf: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """The RETA curve with bootstrap intervals over prompts, plus references, JSON-ready.

    Keys: ``etas``, ``curve``, ``low``, ``high`` (per-η percentile interval), ``oracle_curve``
    (ranked by the oracle: the best a proxy can do), ``random`` (``RETA(1)``, the mean oracle
    score), ``best_eta`` / ``best_value`` (the η with the highest RETA, the smallest on ties),
    ``n_prompts``, ``responses_per_prompt`` (min and max), ``conf``, ``reps``. ``etas=None``
    uses :func:`default_etas` of the largest group.
    """
    grouped = _groups(proxy_scores, oracle_scores, groups)
    sizes = [r.size for r, _ in grouped]
    etas = check_etas(default_etas(max(sizes)) if etas is None else etas)
    per = reta_per_prompt(proxy_scores, oracle_scores, groups, etas)
    best_possible = reta_per_prompt(oracle_scores, oracle_scores, groups, etas).mean(axis=0)
    ci = _index_bootstrap(per, reps, conf, seed)
    curve = per.mean(axis=0)
    best = int(np.argmax(curve))  # argmax takes the first, i.e. the smallest eta, on ties
    random = float(np.mean([o.mean() for _, o in grouped]))
    return {
        "etas": etas,
        "curve": curve.tolist(),
        "low": np.atleast_1d(ci.low).tolist(),
        "high": np.atleast_1d(ci.high).tolist(),
        "oracle_curve": best_possible.tolist(),
        "random": random,
        "best_eta": etas[best],
        "best_value": float(curve[best]),
        "n_prompts": len(grouped),
        "responses_per_prompt": [min(sizes), max(sizes)],
        "conf": conf,
        "reps": reps,
    }


# ---------------------------------------------------------------------------------------------
# flip rates
# ---------------------------------------------------------------------------------------------


def pairwise_margin(q_xy, q_yx) -> np.ndarray:
    """Order-averaged pairwise margin ``P(x ≻ y) − ½`` from a judge asked in both orders:
    ``q_xy = P(judge answers 'A' | A = x, B = y)`` and ``q_yx = P('A' | A = y, B = x)``, each
    renormalised over {A, B}. ``P(x ≻ y) = ½ (q_xy + 1 − q_yx)``, so the margin is
    ``½ (q_xy − q_yx)``; averaging the two orders cancels a constant position bias."""
    return 0.5 * (np.asarray(q_xy, dtype=np.float64) - np.asarray(q_yx, dtype=np.float64))


def distractor_flips(margin, margin_x_distracted, margin_y_distracted) -> np.ndarray:
    """Per pair: 1.0 if injecting the distractor into the losing response flips the preference,
    0.0 if not, NaN when there was no preference (``margin == 0``). ``margin = m(x, y)``,
    ``margin_x_distracted = m(x', y)``, ``margin_y_distracted = m(x, y')``: the formula is in
    the module docstring. A tie after injection is not a flip."""
    m = np.asarray(margin, dtype=np.float64)
    mx = np.asarray(margin_x_distracted, dtype=np.float64)
    my = np.asarray(margin_y_distracted, dtype=np.float64)
    if not (m.shape == mx.shape == my.shape):
        raise ValueError(f"margins differ in shape: {m.shape}, {mx.shape}, {my.shape}")
    out = np.full(m.shape, np.nan)
    out[m > 0] = (my[m > 0] < 0).astype(np.float64)
    out[m < 0] = (mx[m < 0] > 0).astype(np.float64)
    return out


def order_swap_flips(q_xy, q_yx) -> np.ndarray:
    """Per pair: 1.0 if a pairwise judge's decision changes when the two responses swap places
    (it prefers x as A but y when x is B, or the reverse: ``q_xy > ½`` and ``q_yx > ½``, or both
    below), 0.0 if it is consistent, NaN when either order is an exact tie."""
    a = np.asarray(q_xy, dtype=np.float64) - 0.5
    b = np.asarray(q_yx, dtype=np.float64) - 0.5
    out = (np.sign(a) == np.sign(b)).astype(np.float64)  # same slot chosen both times
    out[(a == 0) | (b == 0)] = np.nan
    return out


def protocol_disagreement(margin_pointwise, margin_pairwise) -> np.ndarray:
    """Per pair: 1.0 if the pointwise and pairwise protocols prefer different responses, 0.0 if
    the same, NaN when either has no preference."""
    a = np.sign(np.asarray(margin_pointwise, dtype=np.float64))
    b = np.sign(np.asarray(margin_pairwise, dtype=np.float64))
    out = (a != b).astype(np.float64)
    out[(a == 0) | (b == 0)] = np.nan
    return out


def rate_with_ci(indicators, *, reps: int = 1000, conf: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """``{"rate", "low", "high", "n"}``: the mean of the non-NaN ``indicators`` (0/1 flips, or
    per-pair differences of two protocols' flips) with a percentile bootstrap interval over pairs
    (``None`` for all three when none is left; no interval from a single pair)."""
    x = np.asarray(indicators, dtype=np.float64).reshape(-1)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return {"rate": None, "low": None, "high": None, "n": 0}
    if x.size == 1:
        return {"rate": float(x[0]), "low": None, "high": None, "n": 1}
    ci = stratified_bootstrap_ci(x, lambda m: m.mean(), reps=reps, conf=conf, seed=seed)
    return {"rate": float(ci.point), "low": float(ci.low), "high": float(ci.high), "n": int(x.size)}


# ---------------------------------------------------------------------------------------------
# figure
# ---------------------------------------------------------------------------------------------


def plot_reta(summary: dict[str, Any], path: str | Path, title: str = "RETA") -> Path:
    """Draw the RETA curve of :func:`reta_summary` (with its interval band, the oracle-ranked
    upper bound and the random-selection level) to a PNG; matplotlib's Agg canvas, no pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(5.0, 3.4), dpi=96, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    etas = summary["etas"]
    ax.fill_between(etas, summary["low"], summary["high"], color="#1f77b4", alpha=0.2, linewidth=0,
                    label=f"{int(round(100 * summary['conf']))}% CI")
    ax.plot(etas, summary["curve"], "o-", color="#1f77b4", markersize=3, label="reward model")
    ax.plot(etas, summary["oracle_curve"], "--", color="#2ca02c", label="ranked by oracle")
    ax.axhline(summary["random"], color="#7f7f7f", linestyle=":", label="random (η = 1)")
    ax.set_xlabel("η (top fraction kept per prompt)")
    ax.set_ylabel("mean oracle score")
    ax.set_xlim(0, 1.02)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3, linewidth=0.6)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=7, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", metadata={"Software": None})
    return path
