"""benchmarks/lora_vs_full.py --smoke runs both arms end to end on the tiny model (2 steps, seed 0).

The figures mean nothing at this size; the test checks that each arm ran the command it claims
(LoRA section and learning rate in the run's own config.yaml, adapter in its summary), that the
reported figures are the runs' own (medians of metrics.jsonl, accuracies of eval.jsonl), that the
paired difference and ratio are LoRA - full and LoRA / full, and that --resume reruns nothing.
"""

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("peft", reason="LoRA needs peft: pip install -e '.[lora]'")

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path, *extra):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "lora_vs_full.py"), "--smoke",
                           "--work-dir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out"), *extra],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_lora_vs_full_smoke_runs_both_arms_and_reports_their_own_figures(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    result = json.loads((tmp_path / "out" / "lora_vs_full.json").read_text())
    work = tmp_path / "work"

    # each arm ran what it says: the run's own saved config and summary
    full_cfg = yaml.safe_load((work / "full_seed0" / "config.yaml").read_text())
    lora_cfg = yaml.safe_load((work / "lora_seed0" / "config.yaml").read_text())
    assert full_cfg["model"].get("lora") is None and full_cfg["trainer"]["lr"] == pytest.approx(2e-5)
    assert lora_cfg["model"]["lora"]["rank"] == 16 and lora_cfg["model"]["lora"]["alpha"] == 32
    assert lora_cfg["trainer"]["lr"] == pytest.approx(2e-4)
    assert full_cfg["trainer"]["seed"] == lora_cfg["trainer"]["seed"] == 0
    assert full_cfg["trainer"]["steps"] == lora_cfg["trainer"]["steps"] == 2
    lora_summary = json.loads((work / "lora_seed0" / "summary.json").read_text())
    assert lora_summary["lora"]["trainable_params"] > 0
    assert lora_summary["lora"]["trainable_params"] < lora_summary["lora"]["total_params"]
    assert result["runs"]["lora"]["0"]["trainable_params"] == lora_summary["lora"]["trainable_params"]
    assert result["runs"]["full"]["0"]["trainable_params"] is None

    # figures are the runs' own: median step time after the 1-step warm-up, eval.jsonl's accuracies
    for arm in ("full", "lora"):
        rows = [json.loads(x) for x in (work / f"{arm}_seed0" / "metrics.jsonl").read_text().splitlines()]
        evals = [json.loads(x) for x in (work / f"{arm}_seed0" / "eval.jsonl").read_text().splitlines()]
        run = result["runs"][arm]["0"]
        assert run["step_s"] == pytest.approx(statistics.median(r["time/step_s"] for r in rows[1:]))
        assert run["accuracy_before"] == evals[0]["accuracy"] and run["accuracy_after"] == evals[-1]["accuracy"]
        assert math.isfinite(run["step_s"]) and run["step_s"] > 0 and run["peak_rss_mb"] > 100
        assert not (work / f"{arm}_seed0" / "checkpoints").exists()  # deleted once read

    agg, runs = result["aggregate"], result["runs"]
    assert agg["paired_difference"]["step_s"]["mean"] == pytest.approx(runs["lora"]["0"]["step_s"]
                                                                       - runs["full"]["0"]["step_s"])
    assert agg["ratio"]["peak_rss_mb"]["mean"] == pytest.approx(runs["lora"]["0"]["peak_rss_mb"]
                                                                / runs["full"]["0"]["peak_rss_mb"])
    assert agg["arms"]["full"]["accuracy_after"]["n"] == 1
    md = (tmp_path / "out" / "lora_vs_full.md").read_text()
    assert "| median step time (s) |" in md and "LoRA / full" in md and "Environment: posttrain_commit" in md
    assert (tmp_path / "out" / "lora_vs_full.png").stat().st_size > 1000

    # --resume reads the finished runs and starts none
    stamp = (work / "full_seed0" / "bench.json").read_text()
    again = _run(tmp_path, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier") == 2 and "done in" not in again.stdout
    assert (work / "full_seed0" / "bench.json").read_text() == stamp
