"""benchmarks/vs_trl.py runs end to end on the tiny model: posttrain, TRL tuned (bf16 and fp32 weights), TRL as shipped.

One step each, so the figures mean nothing; the test checks that every worker runs, that the two
TRL rows differ in exactly the settings the benchmark says they do, and that every invocation
records what produced it (commit, versions, CPU, threads).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="TRL is the benchmark's peer: pip install -e '.[bench]'")

ROOT = Path(__file__).resolve().parents[2]


def test_vs_trl_runs_one_step_on_the_tiny_model(tmp_path):
    out = tmp_path / "vs_trl.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "vs_trl.py"), "--model", "tiny-random", "--steps", "1",
         "--warmup", "0", "--gen-reps", "1", "--max-new-tokens", "4", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    env = result["environment"]
    assert env["trl"] != "not installed" and env["torch"].startswith("2.") and env["cpus"] >= 1
    assert len(env["posttrain_commit"].split()[0]) >= 7 and env["torch_threads"] >= 1
    shipped, tuned = result["trl"], result["trl_tuned"]
    assert shipped["gradient_checkpointing"] is True and tuned["gradient_checkpointing"] is False
    assert tuned["attention"] == "eager" and tuned["learner_dtype"] == "bf16 weights"
    fp32 = result["trl_tuned_fp32"]
    assert fp32["gradient_checkpointing"] is False and fp32["attention"] == "eager"
    assert fp32["learner_dtype"] == "fp32 weights, bf16 autocast"
    for worker in ("posttrain", "trl", "trl_tuned", "trl_tuned_fp32"):
        assert math.isfinite(result[worker]["step_s"]) and result[worker]["step_s"] > 0, worker
        assert result[worker]["peak_rss_mb"] > 0, worker
    assert "| median step time (s) |" in result["table"] and "vs TRL tuned, fp32 weights" in result["table"]
    assert "Environment: posttrain_commit" in proc.stdout
