"""Self-contained HTML report over one or more run directories.

A run directory may contain (every file is optional; the report says what is missing):

* ``config.yaml``   resolved config;
* ``metrics.jsonl`` one JSON object per training step (``"step"`` plus numeric keys such as
  ``"reward/mean"``; nested objects are flattened with ``/``);
* ``eval.jsonl``    one JSON object per evaluation (``"step"``, ``"accuracy"``, ``"n_problems"``,
  ``"pass_at_k": {"1": .., "8": ..}``, ...);
* ``summary.json``  e.g. ``{"eval_before": {"accuracy": ..}, "eval_after": {...}, "train_wall_s": ..}``;
* ``eval_*.json``   aggregate figures written by ``posttrain eval`` (``pass_at_k``, ``maj_at_k``,
  ``mean_accuracy``, ``tokens``, ``scaling``, ``problems``).

The output is ONE html file with the figures embedded as base64 PNG data URIs; the same PNGs are
also written to ``<name>_figures/`` next to it. Figures are drawn with matplotlib's Agg canvas
directly (no pyplot, no change to the global backend).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from posttrain.evaluation.stats import (
    Interval,
    aggregate_with_ci,
    performance_profile,
    probability_of_improvement_ci,
)

__all__ = ["RunData", "load_run", "group_seed_runs", "write_report", "render_pass_at_k_table"]

STANDARD_FILES = ("config.yaml", "metrics.jsonl", "eval.jsonl", "summary.json")

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

# config keys (last dotted component) worth showing in the overview, in priority order
HIGHLIGHT_KEYS = (
    "algorithm", "algo", "advantage", "advantage_estimator", "estimator", "loss", "loss_type",
    "policy_loss", "aggregation", "loss_agg_mode", "model", "model_name", "model_name_or_path",
    "task", "dataset", "reward", "seed", "lr", "learning_rate", "group_size", "num_generations",
    "n_samples", "batch_size", "rollout_batch_size", "max_steps", "steps", "epochs", "kl_coef",
    "beta", "clip_low", "clip_high", "clip_eps", "temperature", "max_new_tokens", "max_tokens",
)
MAX_HIGHLIGHTS = 16

# config keys that may differ between seeds of "the same config"
_RUN_SPECIFIC = {
    "output_dir", "out_dir", "outdir", "output", "run_dir", "save_dir", "log_dir", "logging_dir",
    "run_name", "wandb_run_name", "checkpoint_dir",
}

BOOTSTRAP_REPS = 2000


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------


@dataclass
class RunData:
    path: Path
    name: str
    config: dict[str, Any] | None = None
    config_text: str | None = None
    metrics: list[dict[str, float]] = field(default_factory=list)  # flattened numeric rows
    evals: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    eval_files: dict[str, dict[str, Any]] = field(default_factory=dict)  # "eval_x" -> content
    missing: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    # ---- derived -------------------------------------------------------------------------
    def series(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{key: (steps, values)}`` for every numeric metrics key, sorted by step."""
        keys: list[str] = []
        for row in self.metrics:
            for k in row:
                if k != "step" and k not in keys:
                    keys.append(k)
        out = {}
        for k in keys:
            pts = [(row.get("step", i), row[k]) for i, row in enumerate(self.metrics) if k in row]
            pts.sort(key=lambda p: p[0])
            s = np.array([p[0] for p in pts], dtype=np.float64)
            v = np.array([p[1] for p in pts], dtype=np.float64)
            v[~np.isfinite(v)] = np.nan
            out[k] = (s, v)
        return out

    def final_accuracy(self) -> tuple[float, str] | None:
        """Final accuracy and where it came from: ``summary.eval_after.accuracy``, else the last
        ``eval.jsonl`` entry."""
        acc = _get(self.summary, "eval_after", "accuracy")
        if _is_num(acc):
            return float(acc), "summary.json eval_after"
        for e in reversed(self.evals):
            if _is_num(e.get("accuracy")):
                return float(e["accuracy"]), f"eval.jsonl step {e.get('step', '?')}"
        return None

    def flat_config(self) -> dict[str, Any]:
        return _flatten(self.config) if isinstance(self.config, dict) else {}


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _flatten(d: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flatten(v, key, sep))
        else:
            out[key] = v
    return out


def _read_jsonl(path: Path, warnings: list[str]) -> list[dict[str, Any]]:
    rows, bad = [], 0
    with path.open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(obj, dict):
                rows.append(obj)
            else:
                bad += 1
    if bad:
        warnings.append(f"{path.name}: skipped {bad} unreadable line(s)")
    return rows


def _read_json(path: Path, warnings: list[str]) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        warnings.append(f"{path.name}: unreadable ({type(e).__name__})")
        return None
    if not isinstance(obj, dict):
        warnings.append(f"{path.name}: expected a JSON object")
        return None
    return obj


def load_run(path: Path | str, name: str | None = None) -> RunData:
    """Read whatever a run directory holds; never raises for missing or malformed files."""
    path = Path(path)
    run = RunData(path=path, name=name or path.name or str(path))
    if not path.is_dir():
        run.missing = ["(run directory does not exist)"]
        return run
    cfg = path / "config.yaml"
    if cfg.is_file():
        run.config_text = cfg.read_text(encoding="utf-8", errors="replace")
        try:
            import yaml

            obj = yaml.safe_load(run.config_text)
            run.config = obj if isinstance(obj, dict) else {"value": obj}
        except Exception as e:  # noqa: BLE001 - any parse problem is reported, not raised
            run.warnings.append(f"config.yaml: could not parse ({type(e).__name__})")
    else:
        run.missing.append("config.yaml")
    met = path / "metrics.jsonl"
    if met.is_file():
        for i, row in enumerate(_read_jsonl(met, run.warnings)):
            flat = {k: float(v) for k, v in _flatten(row, sep="/").items() if _is_num(v)}
            flat.setdefault("step", float(i))
            run.metrics.append(flat)
    else:
        run.missing.append("metrics.jsonl")
    ev = path / "eval.jsonl"
    if ev.is_file():
        run.evals = _read_jsonl(ev, run.warnings)
    else:
        run.missing.append("eval.jsonl")
    summ = path / "summary.json"
    if summ.is_file():
        run.summary = _read_json(summ, run.warnings)
    else:
        run.missing.append("summary.json")
    for p in sorted(path.glob("eval_*.json")):
        obj = _read_json(p, run.warnings)
        if obj is not None:
            run.eval_files[p.stem] = obj
    return run


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """Shortest trailing path components that tell the runs apart."""
    parts = [p.resolve().parts for p in paths]
    for depth in range(1, max((len(p) for p in parts), default=1) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [f"{n} #{i}" for i, n in enumerate(names)]


# ---------------------------------------------------------------------------------------------
# seed grouping
# ---------------------------------------------------------------------------------------------


def _is_run_specific(key: str) -> bool:
    last = key.split(".")[-1].lower()
    return last in _RUN_SPECIFIC or last == "seed" or last.endswith("_seed")


def _config_signature(run: RunData) -> str | None:
    if run.config is None:
        return None
    flat = {k: v for k, v in run.flat_config().items() if not _is_run_specific(k)}
    return json.dumps(flat, sort_keys=True, default=str)


def group_seed_runs(runs: Sequence[RunData]) -> list[tuple[str, list[RunData]]]:
    """Group runs whose configs are equal once seeds and output paths are ignored (keys named
    ``seed``, ``*_seed``, ``output_dir``, ``run_name``, ...). A run without a config is a group
    of its own. Groups are labelled by the config keys that tell them apart."""
    buckets: dict[str, list[RunData]] = {}
    for run in runs:
        sig = _config_signature(run)
        buckets.setdefault(sig if sig is not None else f"__noconfig__{run.name}", []).append(run)
    groups = list(buckets.values())
    if len(groups) == 1:
        return [("all runs" if len(groups[0]) > 1 else groups[0][0].name, groups[0])]
    flats = [{k: v for k, v in g[0].flat_config().items() if not _is_run_specific(k)} for g in groups]
    all_keys = sorted(set().union(*flats))
    differing = [k for k in all_keys if len({json.dumps(f.get(k, "<unset>"), default=str) for f in flats}) > 1]
    labels = []
    for g, f in zip(groups, flats):
        if g[0].config is None:
            labels.append(g[0].name)
            continue
        parts = [f"{k.split('.')[-1]}={_short(f.get(k, '<unset>'))}" for k in differing[:3]]
        if len(differing) > 3:
            parts.append("…")
        labels.append(", ".join(parts) or g[0].name)
    if len(set(labels)) < len(labels):
        labels = [f"{lab} [{g[0].name}]" for lab, g in zip(labels, groups)]
    return list(zip(labels, groups))


def _short(v: Any, n: int = 28) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s if len(s) <= n else s[: n - 1] + "…"


# ---------------------------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}" if abs(int(v)) >= 10000 else str(int(v))
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        if v == 0:
            return "0"
        if abs(v) >= 1e5:
            return f"{v:,.0f}"
        if abs(v) < 1e-3:
            return f"{v:.2e}"
        return f"{v:.4g}"
    if isinstance(v, (list, tuple, dict)):
        return _short(v, 60)
    return str(v)


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _duration(s: Any) -> str:
    if not _is_num(s):
        return "—"
    s = float(s)
    h, rem = divmod(int(round(s)), 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{s:.1f}s")


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, cls: str = "") -> str:
    """HTML table with escaped, formatted cells; numbers are right-aligned."""
    out = [f'<div class="table-wrap"><table class="{_e(cls)}"><thead><tr>']
    out += [f"<th>{_e(h)}</th>" for h in headers]
    out.append("</tr></thead><tbody>")
    for row in rows:
        out.append("<tr>")
        for cell in row:
            num = _is_num(cell) or cell is None
            out.append(f'<td class="num">{_e(_fmt(cell))}</td>' if num else f"<td>{_e(_fmt(cell))}</td>")
        out.append("</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _ci_text(iv: Interval) -> str:
    if iv.low == iv.high == iv.point:
        return f"{_fmt(iv.point)}"
    return f"{_fmt(iv.point)} [{_fmt(iv.low)}, {_fmt(iv.high)}]"


def _k_sorted(d: Mapping[Any, Any]) -> list[tuple[int, float]]:
    """``{"1": .., "8": ..}`` -> ``[(1, ..), (8, ..)]`` sorted by k, numeric values only."""
    out = []
    for k, v in d.items():
        try:
            kk = int(k)
        except (TypeError, ValueError):
            continue
        if _is_num(v):
            out.append((kk, float(v)))
    return sorted(out)


# ---------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------

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
# sections
# ---------------------------------------------------------------------------------------------


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{_e(anchor)}"><h2>{_e(title)}</h2>{body}</section>'


def _note(text: str, kind: str = "info") -> str:
    return f'<p class="note {kind}">{_e(text)}</p>'


def _highlight_keys(runs: Sequence[RunData]) -> list[str]:
    flats = [r.flat_config() for r in runs]
    keys = sorted(set().union(*flats)) if flats else []
    prio = {k: i for i, k in enumerate(HIGHLIGHT_KEYS)}
    chosen = sorted((k for k in keys if k.split(".")[-1].lower() in prio), key=lambda k: (prio[k.split(".")[-1].lower()], k))
    if len(runs) > 1:  # keys that differ between runs are always interesting
        differing = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flats}) > 1]
        chosen += [k for k in differing if k not in chosen]
    return chosen[:MAX_HIGHLIGHTS]


def _overview(runs: Sequence[RunData]) -> str:
    parts = []
    # summary numbers
    rows = []
    for r in runs:
        before = _get(r.summary, "eval_before", "accuracy")
        after = _get(r.summary, "eval_after", "accuracy")
        delta = float(after) - float(before) if _is_num(before) and _is_num(after) else None
        steps = _get(r.summary, "steps")
        if not _is_num(steps) and r.metrics:
            steps = int(max(row["step"] for row in r.metrics))
        final = r.final_accuracy()
        ser = r.series().get("reward/mean")
        last_reward = None
        if ser is not None and np.isfinite(ser[1]).any():
            last_reward = float(ser[1][np.isfinite(ser[1])][-1])
        present = [f for f in STANDARD_FILES if f not in r.missing] + sorted(f"{k}.json" for k in r.eval_files)
        rows.append([
            r.name,
            steps if _is_num(steps) else None,
            _duration(_get(r.summary, "train_wall_s")),
            before if _is_num(before) else None,
            after if _is_num(after) else None,
            delta,
            final[0] if final else None,
            last_reward,
            ", ".join(present) or "—",
            ", ".join(r.missing) or "none",
        ])
    parts.append("<h3>Runs</h3>")
    parts.append(_table(
        ["run", "steps", "train time", "acc before", "acc after", "Δ acc", "final acc", "last reward/mean", "files", "missing"],
        rows, cls="overview"))
    for r in runs:
        for m in r.missing:
            what = {
                "config.yaml": "no config highlights, not grouped with other seeds",
                "metrics.jsonl": "no training curves",
                "eval.jsonl": "no evaluation-over-steps table",
                "summary.json": "no before/after summary",
            }.get(m, "nothing to show")
            parts.append(_note(f"{r.name}: {m} missing — {what}.", "warn"))
        for w in r.warnings:
            parts.append(_note(f"{r.name}: {w}", "warn"))
    # config highlights (rows = keys, columns = runs)
    with_cfg = [r for r in runs if r.config is not None]
    if with_cfg:
        keys = _highlight_keys(with_cfg)
        if keys:
            flats = [r.flat_config() for r in with_cfg]
            body = ['<div class="table-wrap"><table class="config"><thead><tr><th>config key</th>']
            body += [f"<th>{_e(r.name)}</th>" for r in with_cfg]
            body.append("</tr></thead><tbody>")
            for k in keys:
                vals = [f.get(k) for f in flats]
                differs = len({json.dumps(v, default=str) for v in vals}) > 1
                body.append(f'<tr class="{"diff" if differs else ""}"><td><code>{_e(k)}</code></td>')
                body += [f"<td>{_e(_fmt(v))}</td>" for v in vals]
                body.append("</tr>")
            body.append("</tbody></table></div>")
            parts.append("<h3>Config highlights</h3>")
            if len(with_cfg) > 1:
                parts.append('<p class="hint">Rows shaded in yellow differ between runs.</p>')
            parts.append("".join(body))
        for r in with_cfg:
            parts.append(f"<details><summary>Full config of {_e(r.name)}</summary><pre>{_e(r.config_text or '')}</pre></details>")
    # other summary numbers
    extra_rows = []
    for r in runs:
        if not r.summary:
            continue
        for k, v in _flatten(r.summary).items():
            if k in ("eval_before.accuracy", "eval_after.accuracy", "train_wall_s", "steps"):
                continue
            if _is_num(v) or isinstance(v, (str, bool)):
                extra_rows.append([r.name, k, v])
    if extra_rows:
        parts.append("<details><summary>All summary.json fields</summary>")
        parts.append(_table(["run", "key", "value"], extra_rows))
        parts.append("</details>")
    return "".join(parts)


def _training_curves(runs: Sequence[RunData], figs: _Figures) -> str:
    series = {r.name: r.series() for r in runs}
    have = [r for r in runs if series[r.name]]
    if not have:
        return _note("No run has metrics.jsonl with numeric keys: no training curves.", "warn")
    all_keys: list[str] = []
    for r in have:
        all_keys += [k for k in series[r.name] if k not in all_keys]
    parts = []
    multi = len(have) > 1
    if multi:
        parts.append('<p class="hint">Runs are overlaid: ' + ", ".join(
            f'<span class="swatch" style="background:{_color(i)}"></span>{_e(r.name)}' for i, r in enumerate(runs)) + "</p>")
    long_runs = any(s[1].size >= 50 for r in have for s in series[r.name].values())
    for group, keys in _ordered_groups(all_keys):
        title = KNOWN_GROUPS.get(group, group.replace("_", " ").capitalize())
        shown = keys[:MAX_KEYS_PER_FIGURE]
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
            handles, labels = axes[0].get_legend_handles_labels()
            if handles:
                fig.legend(handles, labels, loc="outside upper center", ncols=min(len(labels), 5), fontsize=8, frameon=False)
        caption = "Faint: raw values; bold: centred moving average (window ≈ 4% of the run, at least 5 steps)." if long_runs else ""
        extra = f" ({len(keys) - len(shown)} more keys not plotted)" if len(keys) > len(shown) else ""
        parts.append(f"<h3>{_e(title)}{_e(extra)}</h3>")
        parts.append('<p class="hint">' + " ".join(f"<code>{_e(k)}</code>" for k in keys) + "</p>")
        parts.append(figs.embed(fig, f"train_{group}", f"training curves: {', '.join(shown)}", caption))
    missing = [r.name for r in runs if not series[r.name]]
    if missing:
        parts.append(_note("No training metrics for: " + ", ".join(missing) + ".", "warn"))
    return "".join(parts)


def _eval_scalar_keys(evals: Sequence[dict]) -> list[str]:
    keys: list[str] = []
    for e in evals:
        for k, v in e.items():
            if k not in ("step", "accuracy", "n_problems", "pass_at_k") and _is_num(v) and k not in keys:
                keys.append(k)
    return keys


def _eval_over_steps(runs: Sequence[RunData], figs: _Figures) -> str:
    have = [r for r in runs if r.evals]
    if not have:
        return _note("No run has eval.jsonl: no evaluation over steps.", "warn")
    parts = []
    for r in have:
        ks = sorted({k for e in r.evals for k, _ in _k_sorted(e.get("pass_at_k") or {})})
        extra = _eval_scalar_keys(r.evals)
        rows = []
        for e in sorted(r.evals, key=lambda e: e.get("step", 0) if _is_num(e.get("step")) else 0):
            pk = dict(_k_sorted(e.get("pass_at_k") or {}))
            rows.append([e.get("step"), e.get("accuracy"), e.get("n_problems")] + [pk.get(k) for k in ks] + [e.get(k) for k in extra])
        parts.append(f"<h3>{_e(r.name)}</h3>")
        parts.append(_table(["step", "accuracy", "n_problems"] + [f"pass@{k}" for k in ks] + extra, rows, cls="evals"))
    # accuracy (and pass@k) over steps
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
        handles, labels = axes[0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="outside upper center", ncols=min(len(labels), 5), fontsize=8, frameon=False)
    parts.append("<h3>Evaluation metrics over training steps</h3>")
    parts.append(figs.embed(fig, "eval_over_steps", "evaluation over steps"))
    missing = [r.name for r in runs if not r.evals]
    if missing:
        parts.append(_note("No eval.jsonl for: " + ", ".join(missing) + ".", "warn"))
    return "".join(parts)


def _eval_files_table(runs: Sequence[RunData]) -> str:
    srcs = [(r, n, d) for r in runs for n, d in r.eval_files.items()]
    if not srcs:
        return ""
    ks = sorted({k for _, _, d in srcs for k, _ in _k_sorted(d.get("pass_at_k") or {})})
    maj_cols: list[str] = []
    tok_cols: list[str] = []
    for _, _, d in srcs:
        m = d.get("maj_at_k")
        if isinstance(m, dict):
            maj_cols += [f"maj@{k}" for k, _ in _k_sorted(m) if f"maj@{k}" not in maj_cols]
        elif _is_num(m) and "maj@k" not in maj_cols:
            maj_cols.append("maj@k")
        t = d.get("tokens")
        if isinstance(t, dict):
            tok_cols += [f"tokens.{k}" for k, v in _flatten(t).items() if _is_num(v) and f"tokens.{k}" not in tok_cols]
        elif _is_num(t) and "tokens" not in tok_cols:
            tok_cols.append("tokens")
    maj_cols.sort(key=lambda c: int(c[4:]) if c[4:].isdigit() else 10**9)
    rows = []
    for r, n, d in srcs:
        pk = dict(_k_sorted(d.get("pass_at_k") or {}))
        m = d.get("maj_at_k")
        mk = dict(_k_sorted(m)) if isinstance(m, dict) else {}
        t = d.get("tokens")
        tf = _flatten(t) if isinstance(t, dict) else {}
        probs = d.get("problems")
        row = [r.name, n, len(probs) if isinstance(probs, list) else d.get("n_problems"), d.get("mean_accuracy")]
        row += [pk.get(k) for k in ks]
        row += [(m if c == "maj@k" else mk.get(int(c[4:]))) for c in maj_cols]
        row += [(t if c == "tokens" else tf.get(c[7:])) for c in tok_cols]
        rows.append(row)
    return "<h3>Evaluation files (<code>eval_*.json</code>)</h3>" + _table(
        ["run", "file", "problems", "mean acc"] + [f"pass@{k}" for k in ks] + maj_cols + tok_cols, rows, cls="evals")


def _pass_at_k_section(runs: Sequence[RunData], figs: _Figures) -> str:
    curves = []  # (label, color, linestyle, [(k, v)])
    for i, r in enumerate(runs):
        with_pk = [e for e in r.evals if len(_k_sorted(e.get("pass_at_k") or {})) > 0]
        if with_pk:
            last = with_pk[-1]
            curves.append((f"{r.name} · step {last.get('step', '?')}", _color(i), "-", _k_sorted(last["pass_at_k"])))
            first = with_pk[0]
            if first is not last:
                curves.append((f"{r.name} · step {first.get('step', '?')}", _color(i), ":", _k_sorted(first["pass_at_k"])))
        for j, (n, d) in enumerate(r.eval_files.items()):
            pk = _k_sorted(d.get("pass_at_k") or {})
            if pk:
                curves.append((f"{r.name} · {n}", _color(i), ["--", "-.", (0, (5, 1, 1, 1))][j % 3], pk))
    parts = [_eval_files_table(runs)]
    if not curves:
        parts.append(_note("No pass@k data (eval.jsonl 'pass_at_k' or eval_*.json) found.", "warn"))
        return "".join(parts)
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
    parts.append("<h3>pass@k</h3>")
    parts.append(figs.embed(fig, "pass_at_k", "pass@k curves",
                            "Solid: last evaluation in eval.jsonl; dotted: first; dashed: eval_*.json files. Unbiased estimator."))
    return "".join(parts)


def _scaling_section(runs: Sequence[RunData], figs: _Figures) -> str:
    methods: dict[str, list[tuple[str, str, list[tuple[int, float]]]]] = {}
    for i, r in enumerate(runs):
        for n, d in r.eval_files.items():
            sc = d.get("scaling")
            if not isinstance(sc, dict):
                continue
            for method, curve in sc.items():
                if isinstance(curve, dict) and _k_sorted(curve):
                    methods.setdefault(method, []).append((f"{r.name} · {n}", _color(i), _k_sorted(curve)))
    if not methods:
        return _note("No test-time scaling data ('scaling' in eval_*.json) found.", "warn")
    names = sorted(methods, key=lambda m: ({"majority": 0, "best_of_n": 1}.get(m, 2), m))
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
    rows = []
    for m in names:
        for label, _, pts in methods[m]:
            rows.append([m, label, ", ".join(f"N={k}: {_fmt(v)}" for k, v in pts)])
    return (figs.embed(fig, "scaling", "test-time scaling curves", "Accuracy against the number of samples N.")
            + "<details><summary>Scaling numbers</summary>" + _table(["method", "source", "accuracy by N"], rows) + "</details>")


def _problem_matrix(group: Sequence[RunData], file: str) -> tuple[np.ndarray, list] | None:
    """[seeds, problems] per-problem accuracy from ``eval_*.json`` ``problems``, if every run
    has the file and the problem ids line up (aligned by id)."""
    per_run = []
    for r in group:
        probs = r.eval_files.get(file, {}).get("problems")
        if not isinstance(probs, list) or not probs:
            return None
        acc = {}
        for j, p in enumerate(probs):
            if isinstance(p, dict) and _is_num(p.get("n")) and _is_num(p.get("correct")) and p["n"] > 0:
                acc[str(p.get("id", j))] = float(p["correct"]) / float(p["n"])
        per_run.append(acc)
    ids = sorted(set(per_run[0]))
    if not ids or any(set(a) != set(ids) for a in per_run):
        return None
    return np.array([[a[i] for i in ids] for a in per_run]), ids


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


def _comparison(runs: Sequence[RunData], figs: _Figures) -> str:
    if len(runs) < 2:
        return _note("A single run: nothing to compare. Pass several run directories (e.g. seeds) for IQM, bootstrap CIs and probability of improvement.")
    groups = group_seed_runs(runs)
    parts = []
    rows = [[label, len(g), ", ".join(r.name for r in g)] for label, g in groups]
    parts.append("<h3>Groups</h3>")
    parts.append('<p class="hint">Runs whose configs are identical except for seeds and output paths are grouped as seeds of one configuration.</p>')
    parts.append(_table(["group", "runs", "members"], rows))
    # final accuracy across seeds
    acc_rows, results, matrices = [], [], {}
    for label, g in groups:
        finals = [(r, r.final_accuracy()) for r in g]
        vals = [fa[0] for _, fa in finals if fa]
        lacking = [r.name for r, fa in finals if not fa]
        if lacking:
            parts.append(_note(f"{label}: no final accuracy for {', '.join(lacking)}.", "warn"))
        if not vals:
            continue
        mat = np.asarray(vals, dtype=np.float64)[:, None]
        matrices[label] = mat
        res = aggregate_with_ci(mat, reps=BOOTSTRAP_REPS, seed=0)
        results.append((label, res))
        acc_rows.append([label, len(vals), ", ".join(_fmt(v) for v in vals),
                         _ci_text(res["iqm"]), _ci_text(res["mean"]), _ci_text(res["median"]), _ci_text(res["optimality_gap"])])
    if acc_rows:
        parts.append("<h3>Final accuracy across seeds</h3>")
        parts.append('<p class="hint">Score matrix [seeds, 1]; IQM = 25%-trimmed mean; brackets: 95% percentile intervals from '
                     f"{BOOTSTRAP_REPS} stratified bootstrap resamples of the seeds (seed 0). One seed gives no interval.</p>")
        parts.append(_table(["group", "seeds", "final accuracies", "IQM [95% CI]", "mean [95% CI]", "median [95% CI]", "optimality gap [95% CI]"], acc_rows, cls="stats"))
        parts.append(_interval_figure(figs, "final_accuracy", results))
    # per-problem matrices from eval_*.json shared by the whole group
    files = sorted({f for r in runs for f in r.eval_files})
    prob_mats: dict[str, dict[str, tuple[np.ndarray, list]]] = {}
    for f in files:
        for label, g in groups:
            pm = _problem_matrix(g, f)
            if pm is not None:
                prob_mats.setdefault(f, {})[label] = pm
    for f, per_group in prob_mats.items():
        rows, res_list = [], []
        for label, (mat, ids) in per_group.items():
            res = aggregate_with_ci(mat, reps=BOOTSTRAP_REPS, seed=0)
            res_list.append((label, res))
            rows.append([label, mat.shape[0], mat.shape[1], _ci_text(res["iqm"]), _ci_text(res["mean"]), _ci_text(res["optimality_gap"])])
        parts.append(f"<h3>Per-problem accuracy: <code>{_e(f)}.json</code></h3>")
        parts.append('<p class="hint">Score matrix [seeds, problems] of per-problem accuracy (correct / n); runs resampled within each problem.</p>')
        parts.append(_table(["group", "seeds", "problems", "IQM [95% CI]", "mean [95% CI]", "optimality gap [95% CI]"], rows, cls="stats"))
        taus = np.linspace(0.0, 1.0, 51)
        fig, (ax,) = figs.new(1, width=7.5, row_height=3.8)
        for i, (label, (mat, _)) in enumerate(per_group.items()):
            pp = performance_profile(mat, taus, reps=500, seed=0)
            ax.plot(taus, pp.profile, color=_color(i), label=label)
            ax.fill_between(taus, pp.low, pp.high, color=_color(i), alpha=0.2, linewidth=0)
        ax.set_xlabel("per-problem accuracy τ", fontsize=9)
        ax.set_ylabel("fraction of problems with accuracy > τ", fontsize=9)
        ax.legend(fontsize=8)
        parts.append(figs.embed(fig, f"profile_{f}", f"performance profile {f}", "Performance profile with 95% bootstrap bands."))
    # probability of improvement
    if len(groups) < 2:
        parts.append(_note("All runs belong to one configuration: probability of improvement needs two or more groups."))
        return "".join(parts)
    poi_rows = []
    for (la, _), (lb, _) in combinations(groups, 2):
        if la in matrices and lb in matrices:
            iv = probability_of_improvement_ci(matrices[la], matrices[lb], reps=BOOTSTRAP_REPS, seed=0)
            poi_rows.append([f"P({la} > {lb})", "final accuracy", f"{matrices[la].shape[0]} vs {matrices[lb].shape[0]}", _ci_text(iv)])
        for f, per_group in prob_mats.items():
            if la in per_group and lb in per_group and per_group[la][1] == per_group[lb][1]:
                iv = probability_of_improvement_ci(per_group[la][0], per_group[lb][0], reps=BOOTSTRAP_REPS, seed=0)
                poi_rows.append([f"P({la} > {lb})", f"{f} per problem", f"{per_group[la][0].shape[0]} vs {per_group[lb][0].shape[0]}", _ci_text(iv)])
    if poi_rows:
        parts.append("<h3>Probability of improvement</h3>")
        parts.append('<p class="hint">P(X &gt; Y) = P(x &gt; y) + ½·P(x = y) over pairs of seeds (Mann–Whitney), averaged over tasks; '
                     "0.5 means no difference. 95% CIs from independent stratified bootstraps of both groups.</p>")
        parts.append(_table(["comparison", "on", "seeds", "P [95% CI]"], poi_rows, cls="stats"))
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# page
# ---------------------------------------------------------------------------------------------

_CSS = """
:root{--fg:#1d2330;--muted:#5b6475;--line:#dde2ea;--bg:#f6f8fb;--accent:#2b6cb0;--warn:#fff4e0;--warnline:#e5a23a}
*{box-sizing:border-box}
body{margin:0;font:15px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:var(--fg);background:var(--bg)}
header{background:#1f2a3c;color:#fff;padding:22px 32px}
header h1{margin:0;font-size:24px;font-weight:600}
header p{margin:4px 0 0;color:#c3cad6;font-size:13px}
nav{position:sticky;top:0;z-index:2;background:#fff;border-bottom:1px solid var(--line);padding:8px 32px;font-size:14px}
nav a{color:var(--accent);text-decoration:none;margin-right:18px}
nav a:hover{text-decoration:underline}
main{max-width:1240px;margin:0 auto;padding:8px 32px 48px}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:8px 24px 20px;margin:20px 0}
h2{font-size:20px;border-bottom:2px solid var(--line);padding-bottom:6px}
h3{font-size:16px;margin:22px 0 8px}
.table-wrap{overflow-x:auto;margin:6px 0 12px}
table{border-collapse:collapse;font-size:13px;min-width:40%}
th,td{border:1px solid var(--line);padding:5px 10px;text-align:left;vertical-align:top}
th{background:#eef2f7;font-weight:600;position:sticky;top:0}
tbody tr:nth-child(even){background:#fafbfd}
tbody tr:hover{background:#eef5ff}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tr.diff td{background:#fff8d6}
code{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#f0f2f5;padding:1px 4px;border-radius:3px}
pre{font:12px/1.45 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#f7f8fa;border:1px solid var(--line);padding:10px;overflow:auto;max-height:420px}
details{margin:8px 0}
summary{cursor:pointer;color:var(--accent)}
figure{margin:10px 0 18px}
img.fig{max-width:100%;height:auto;border:1px solid var(--line);border-radius:4px;background:#fff}
figcaption{font-size:12px;color:var(--muted);margin-top:4px}
.note{padding:7px 12px;border-radius:4px;font-size:13px;margin:6px 0;border-left:4px solid var(--accent);background:#eef5ff}
.note.warn{border-left-color:var(--warnline);background:var(--warn)}
.hint{color:var(--muted);font-size:13px;margin:4px 0}
.swatch{display:inline-block;width:12px;height:12px;border-radius:2px;margin:0 4px 0 10px;vertical-align:-1px}
footer{color:var(--muted);font-size:12px;text-align:center;padding:16px}
"""

# counts decoded figures once the page has loaded (lets headless browsers verify the images)
_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img.fig'), ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  document.body.setAttribute('data-figures-loaded', String(ok));
});
"""


def write_report(run_dirs: Sequence[Path | str], out_html: Path | str, *, title: str | None = None) -> Path:
    """Write one self-contained HTML report over ``run_dirs`` to ``out_html`` and return its path.

    Figures are embedded as base64 PNG data URIs and also saved to ``<stem>_figures/`` next to
    the HTML. Missing files are reported in the page, never raised.
    """
    out_html = Path(out_html)
    paths = [Path(p) for p in run_dirs]
    if not paths:
        raise ValueError("write_report needs at least one run directory")
    names = _unique_names(paths)
    runs = [load_run(p, n) for p, n in zip(paths, names)]
    out_html.parent.mkdir(parents=True, exist_ok=True)
    fig_dir = out_html.parent / f"{out_html.stem}_figures"
    if fig_dir.is_dir():  # drop our own stale figures from an earlier report of the same name
        for old in fig_dir.glob("fig_*.png"):
            old.unlink()
    figs = _Figures(fig_dir)
    title = title or ("posttrain report: " + (runs[0].name if len(runs) == 1 else f"{len(runs)} runs"))

    sections = [
        ("overview", "Run overview", _overview(runs)),
        ("training", "Training curves", _training_curves(runs, figs)),
        ("evaluation", "Evaluation over steps", _eval_over_steps(runs, figs)),
        ("passk", "pass@k", _pass_at_k_section(runs, figs)),
        ("scaling", "Test-time scaling", _scaling_section(runs, figs)),
        ("comparison", "Comparison across runs", _comparison(runs, figs)),
    ]
    from posttrain import __version__

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>",
        f'<body data-figures-total="{figs.count}" data-figures-loaded="0">',
        f"<header><h1>{_e(title)}</h1><p>{len(runs)} run(s): {_e(', '.join(r.name for r in runs))} · generated {stamp} · posttrain {_e(__version__)}</p></header>",
        "<nav>" + "".join(f'<a href="#{a}">{_e(t)}</a>' for a, t, _ in sections) + "</nav>",
        "<main>",
    ]
    page += [_section(a, t, body) for a, t, body in sections]
    page += [
        "</main>",
        f"<footer>{figs.count} figure(s), also saved as PNG in {_e(fig_dir.name)}/</footer>",
        f"<script>{_SCRIPT}</script>",
        "</body></html>",
    ]
    out_html.write_text("\n".join(page), encoding="utf-8")
    return out_html


# ---------------------------------------------------------------------------------------------
# markdown
# ---------------------------------------------------------------------------------------------


def render_pass_at_k_table(evals: Mapping[str, Mapping[str, Any]], digits: int = 3) -> str:
    """Markdown table of pass@k, one row per model.

    ``evals`` maps a model name to an eval dict holding ``"pass_at_k": {k: value}`` (keys may be
    strings), or directly to such a ``{k: value}`` mapping. Columns are the union of all k,
    sorted numerically; a missing value renders as an em dash.
    """
    table: dict[str, dict[int, float]] = {}
    for name, d in evals.items():
        pk = d.get("pass_at_k", d) if isinstance(d, Mapping) else {}
        table[name] = dict(_k_sorted(pk if isinstance(pk, Mapping) else {}))
    ks = sorted({k for row in table.values() for k in row})
    header = "| model | " + " | ".join(f"pass@{k}" for k in ks) + " |"
    sep = "|---|" + "|".join("---:" for _ in ks) + "|"
    lines = [header, sep]
    for name, row in table.items():
        cells = [f"{row[k]:.{digits}f}" if k in row else "—" for k in ks]
        lines.append(f"| {str(name).replace('|', '/')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
