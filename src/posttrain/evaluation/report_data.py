"""Reading run directories for the HTML report (``posttrain.evaluation.report``).

``load_run`` reads whatever a run directory holds (``config.yaml``, ``metrics.jsonl``,
``eval.jsonl``, ``summary.json``, ``eval_*.json``; see the ``report`` module docstring) into a
``RunData`` and never raises for missing or malformed files. ``group_seed_runs`` groups runs that
are seeds of one configuration. Also holds the small value helpers the report sections share.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["RunData", "load_run", "group_seed_runs"]

STANDARD_FILES = ("config.yaml", "metrics.jsonl", "eval.jsonl", "summary.json")

# config keys that may differ between seeds of "the same config"
_RUN_SPECIFIC = {
    "output_dir", "out_dir", "outdir", "output", "run_dir", "save_dir", "log_dir", "logging_dir",
    "run_name", "wandb_run_name", "checkpoint_dir",
}


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
# score data
# ---------------------------------------------------------------------------------------------


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
