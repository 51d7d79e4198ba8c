"""Figures for the HTML report (``posttrain.evaluation.report``).

Figures are drawn with matplotlib's Agg canvas directly (no pyplot, no change to the global
backend); ``_Figures`` turns each into PNG bytes, saves them to the report's figures folder and
returns an ``<img>`` with a base64 data URI. The ``*_figure`` functions draw one figure of a
report section each and return that HTML.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from posttrain.evaluation.report_data import RunData, _is_num, _k_sorted
from posttrain.evaluation.stats import Interval, performance_profile

# training-curve groups (prefix before the first "/"), in display order, with titles
KNOWN_GROUPS: dict[str, str] = {
    "reward": "Reward",
    "reward_component": "Reward components",
    "response_length": "Response length",
    "entropy": "Entropy",
    "kl": "KL divergence",
    "loss": "Loss and clipping",
    "mismatch": "Training-inference mismatch",
    "time": "Step time",
    "lr": "Learning rate",
}
# keys shown first inside their group
KNOWN_KEYS = (
    "reward/mean", "reward/std", "response_length/mean", "entropy/mean", "kl/mean",
    "loss/clip_frac", "mismatch/kl_k3", "mismatch/ratio_p95", "time/step_s", "lr",
)
MAX_KEYS_PER_FIGURE = 12


# ---------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22")


def _color(i: int) -> str:
    return _COLORS[i % len(_COLORS)]


class _Figures:
    """Collects figures: PNG bytes saved to the figures folder and embedded as data URIs."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.count = 0

    def new(self, nplots: int = 1, ncols: int = 3, width: float = 11.0, row_height: float = 3.0):
        from matplotlib.figure import Figure

        ncols = max(1, min(ncols, nplots))
        nrows = max(1, math.ceil(nplots / ncols))
        fig = Figure(figsize=(width, row_height * nrows + 0.5), dpi=96, layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False).reshape(-1)
        for ax in axes[nplots:]:
            ax.set_visible(False)
        for ax in axes[:nplots]:
            ax.grid(True, alpha=0.3, linewidth=0.6)
            ax.spines[["top", "right"]].set_visible(False)
            ax.tick_params(labelsize=8)
        return fig, list(axes[:nplots])

    def embed(self, fig, slug: str, alt: str, caption: str = "") -> str:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", metadata={"Software": None})
        data = buf.getvalue()
        self.count += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        fname = f"fig_{self.count:02d}_{re.sub(r'[^A-Za-z0-9_-]+', '_', slug).strip('_')[:60]}.png"
        (self.folder / fname).write_bytes(data)
        b64 = base64.b64encode(data).decode("ascii")
        cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
        return (
            f'<figure><img class="fig" src="data:image/png;base64,{b64}" alt="{_e(alt)}" '
            f'data-file="{_e(self.folder.name + "/" + fname)}">{cap}</figure>'
        )


def _smooth(v: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average ignoring NaNs (no lag, windows shrink at the edges)."""
    half = window // 2
    ok = np.isfinite(v)
    if not ok.any():
        return v.copy()
    center = float(np.mean(v[ok]))  # cumulative sums of centred values keep constants exact-ish
    csum = np.concatenate([[0.0], np.cumsum(np.where(ok, v - center, 0.0))])
    ccnt = np.concatenate([[0], np.cumsum(ok)])
    idx = np.arange(v.size)
    lo, hi = np.maximum(idx - half, 0), np.minimum(idx + half + 1, v.size)
    cnt = ccnt[hi] - ccnt[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(cnt > 0, center + (csum[hi] - csum[lo]) / np.maximum(cnt, 1), np.nan)


def _smooth_window(n: int) -> int:
    return max(5, (n // 25) | 1)


def _plot_series(ax, steps: np.ndarray, vals: np.ndarray, color: str, label: str | None) -> None:
    if vals.size >= 50:
        ax.plot(steps, vals, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, _smooth(vals, _smooth_window(vals.size)), color=color, linewidth=1.6, label=label)
    else:
        ax.plot(steps, vals, color=color, linewidth=1.4, marker="o" if vals.size <= 20 else None, markersize=3, label=label)


def _maybe_log_y(ax, arrays: Sequence[np.ndarray]) -> None:
    vals = np.concatenate([a[np.isfinite(a)] for a in arrays]) if arrays else np.array([])
    if vals.size and (vals > 0).all() and vals.max() / vals.min() > 1e3:
        ax.set_yscale("log")
    else:
        ax.ticklabel_format(axis="y", useOffset=False)  # no "1e-12+9e-1" offsets on flat curves


def _group_of(key: str) -> str:
    if "/" in key:
        return key.split("/", 1)[0]
    return key if key in KNOWN_GROUPS else "other"


def _ordered_groups(keys: Iterable[str]) -> list[tuple[str, list[str]]]:
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(_group_of(k), []).append(k)
    order = [g for g in KNOWN_GROUPS if g in groups] + sorted(g for g in groups if g not in KNOWN_GROUPS)
    rank = {k: i for i, k in enumerate(KNOWN_KEYS)}
    return [(g, sorted(groups[g], key=lambda k: (rank.get(k, len(rank)), k))) for g in order]


# ---------------------------------------------------------------------------------------------
# section figures
# ---------------------------------------------------------------------------------------------


def _training_figure(figs: _Figures, runs: Sequence[RunData], series: dict, group: str, shown: Sequence[str],
                     multi: bool, caption: str) -> str:
    """Training curves of one metric group: a panel per key in ``shown``, runs overlaid."""
    fig, axes = figs.new(len(shown))
    for ax, key in zip(axes, shown):
        arrays = []
        for i, r in enumerate(runs):
            if key in series[r.name]:
                s, v = series[r.name][key]
                _plot_series(ax, s, v, _color(i), r.name if multi else None)
                arrays.append(v)
        _maybe_log_y(ax, arrays)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    if multi:
        _run_legend(fig, axes[0])
    return figs.embed(fig, f"train_{group}", f"training curves: {', '.join(shown)}", caption)


def _run_legend(fig, ax) -> None:
    """One legend above the figure naming the runs (taken from the first panel)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside upper center", ncols=min(len(labels), 5), fontsize=8, frameon=False)


def _eval_over_steps_figure(figs: _Figures, runs: Sequence[RunData], have: Sequence[RunData]) -> str:
    """Accuracy (and pass@k) over training steps from ``eval.jsonl``, a panel per metric."""
    panels: list[str] = ["accuracy"]
    for r in have:
        for e in r.evals:
            for k, _ in _k_sorted(e.get("pass_at_k") or {}):
                if f"pass@{k}" not in panels:
                    panels.append(f"pass@{k}")
    panels = panels[:1] + sorted(panels[1:], key=lambda p: int(p[5:]))
    panels = panels[:6]
    fig, axes = figs.new(len(panels))
    multi = len(runs) > 1
    for ax, panel in zip(axes, panels):
        for i, r in enumerate(runs):
            pts = []
            for j, e in enumerate(r.evals):
                step = e.get("step", j)
                v = e.get("accuracy") if panel == "accuracy" else dict(_k_sorted(e.get("pass_at_k") or {})).get(int(panel[5:]))
                if _is_num(v) and _is_num(step):
                    pts.append((float(step), float(v)))
            if pts:
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=4, color=_color(i), label=r.name if multi else None)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    if multi:
        _run_legend(fig, axes[0])
    return figs.embed(fig, "eval_over_steps", "evaluation over steps")


def _pass_at_k_figure(figs: _Figures, curves: Sequence[tuple[str, str, Any, list[tuple[int, float]]]]) -> str:
    """pass@k against k (log scale); ``curves`` holds ``(label, color, linestyle, [(k, v)])``."""
    fig, (ax,) = figs.new(1, width=10.0, row_height=4.2)
    all_k = sorted({k for *_, pts in curves for k, _ in pts})
    for label, color, ls, pts in curves:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle=ls, marker="o", markersize=4, color=color, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(all_k, [str(k) for k in all_k])
    ax.set_xlabel("k (log scale)", fontsize=9)
    ax.set_ylabel("pass@k", fontsize=9)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    return figs.embed(fig, "pass_at_k", "pass@k curves",
                      "Solid: last evaluation in eval.jsonl; dotted: first; dashed: eval_*.json files. Unbiased estimator.")


def _scaling_figure(figs: _Figures, methods: dict[str, list[tuple[str, str, list[tuple[int, float]]]]], names: Sequence[str]) -> str:
    """Test-time scaling: accuracy against the number of samples N, a panel per method."""
    fig, axes = figs.new(len(names), ncols=2, width=10.0, row_height=3.6)
    for ax, m in zip(axes, names):
        ns = sorted({k for _, _, pts in methods[m] for k, _ in pts})
        for label, color, pts in methods[m]:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=4, color=color, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(k) for k in ns])
        ax.set_title({"majority": "majority vote", "best_of_n": "best-of-N"}.get(m, m), fontsize=9)
        ax.set_xlabel("N samples (log scale)", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    fig.legend([handles[lab] for lab in labels], labels, loc="outside upper center", ncols=min(len(labels), 4), fontsize=8, frameon=False)
    return figs.embed(fig, "scaling", "test-time scaling curves", "Accuracy against the number of samples N.")


def _interval_figure(figs: _Figures, title: str, results: Sequence[tuple[str, dict[str, Interval]]], metrics=("iqm", "mean")) -> str:
    fig, axes = figs.new(len(metrics), ncols=len(metrics), width=10.0, row_height=max(1.6, 0.45 * len(results) + 0.9))
    labels = [lab for lab, _ in results]
    y = np.arange(len(results))[::-1]
    for ax, m in zip(axes, metrics):
        for yi, (i, (_, res)) in zip(y, enumerate(results)):
            iv = res[m]
            ax.plot([iv.low, iv.high], [yi, yi], color=_color(i), linewidth=6, alpha=0.45, solid_capstyle="butt")
            ax.plot([iv.point], [yi], marker="|", color=_color(i), markersize=16, markeredgewidth=2)
        ax.set_yticks(y, labels if ax is axes[0] else [""] * len(labels), fontsize=8)
        ax.set_title({"iqm": "IQM", "mean": "mean", "median": "median", "optimality_gap": "optimality gap"}[m], fontsize=9)
        ax.set_ylim(-0.7, len(results) - 0.3)
    return figs.embed(fig, f"ci_{title}", f"interval estimates: {title}", "Bars: 95% stratified bootstrap confidence intervals; ticks: point estimates.")


def _profile_figure(figs: _Figures, file: str, per_group: dict[str, tuple[np.ndarray, list]]) -> str:
    """Performance profiles (fraction of problems with accuracy above τ) with bootstrap bands."""
    taus = np.linspace(0.0, 1.0, 51)
    fig, (ax,) = figs.new(1, width=7.5, row_height=3.8)
    for i, (label, (mat, _)) in enumerate(per_group.items()):
        pp = performance_profile(mat, taus, reps=500, seed=0)
        ax.plot(taus, pp.profile, color=_color(i), label=label)
        ax.fill_between(taus, pp.low, pp.high, color=_color(i), alpha=0.2, linewidth=0)
    ax.set_xlabel("per-problem accuracy τ", fontsize=9)
    ax.set_ylabel("fraction of problems with accuracy > τ", fontsize=9)
    ax.legend(fontsize=8)
    return figs.embed(fig, f"profile_{file}", f"performance profile {file}", "Performance profile with 95% bootstrap bands.")
