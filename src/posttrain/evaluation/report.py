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

This module assembles the page; reading run directories lives in ``report_data`` and drawing
the figures in ``report_figures``.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from itertools import combinations
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from posttrain.evaluation.report_data import (
    STANDARD_FILES,
    RunData,
    _flatten,
    _get,
    _is_num,
    _k_sorted,
    _problem_matrix,
    _short,
    _unique_names,
    group_seed_runs,
    load_run,
)
from posttrain.evaluation.report_figures import (
    KNOWN_GROUPS,
    MAX_KEYS_PER_FIGURE,
    _color,
    _e,
    _eval_over_steps_figure,
    _Figures,
    _interval_figure,
    _ordered_groups,
    _pass_at_k_figure,
    _profile_figure,
    _scaling_figure,
    _training_figure,
)
from posttrain.evaluation.stats import Interval, aggregate_with_ci, probability_of_improvement_ci

__all__ = ["RunData", "load_run", "group_seed_runs", "write_report", "render_pass_at_k_table"]

# config keys (last dotted component) worth showing in the overview, in priority order
HIGHLIGHT_KEYS = (
    "algorithm", "algo", "advantage", "advantage_estimator", "estimator", "loss", "loss_type",
    "policy_loss", "aggregation", "loss_agg_mode", "model", "model_name", "model_name_or_path",
    "task", "dataset", "reward", "seed", "lr", "learning_rate", "group_size", "num_generations",
    "n_samples", "batch_size", "rollout_batch_size", "max_steps", "steps", "epochs", "kl_coef",
    "beta", "clip_low", "clip_high", "clip_eps", "temperature", "max_new_tokens", "max_tokens",
)
MAX_HIGHLIGHTS = 16

BOOTSTRAP_REPS = 2000


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
        caption = "Faint: raw values; bold: centred moving average (window ≈ 4% of the run, at least 5 steps)." if long_runs else ""
        extra = f" ({len(keys) - len(shown)} more keys not plotted)" if len(keys) > len(shown) else ""
        parts.append(f"<h3>{_e(title)}{_e(extra)}</h3>")
        parts.append('<p class="hint">' + " ".join(f"<code>{_e(k)}</code>" for k in keys) + "</p>")
        parts.append(_training_figure(figs, runs, series, group, shown, multi, caption))
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
    parts.append("<h3>Evaluation metrics over training steps</h3>")
    parts.append(_eval_over_steps_figure(figs, runs, have))
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
    parts.append("<h3>pass@k</h3>")
    parts.append(_pass_at_k_figure(figs, curves))
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
    figure = _scaling_figure(figs, methods, names)
    rows = []
    for m in names:
        for label, _, pts in methods[m]:
            rows.append([m, label, ", ".join(f"N={k}: {_fmt(v)}" for k, v in pts)])
    return (figure
            + "<details><summary>Scaling numbers</summary>" + _table(["method", "source", "accuracy by N"], rows) + "</details>")


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
        parts.append(_profile_figure(figs, f, per_group))
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
