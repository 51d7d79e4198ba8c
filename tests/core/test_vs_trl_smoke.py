"""benchmarks/vs_trl.py runs end to end on the tiny model: posttrain, TRL tuned (bf16 and fp32 weights where
the CPU has bf16 instructions, fp32 throughout where it has not), TRL as shipped.

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

from posttrain.rollout.engine import cpu_has_native_bf16

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
    assert shipped["learner_dtype"] == "fp32 weights, bf16 autocast"  # as shipped on every CPU
    assert tuned["attention"] == "eager"
    workers = ["posttrain", "trl", "trl_tuned"]
    if cpu_has_native_bf16():
        assert result["fast_dtype"] == "bfloat16" and tuned["learner_dtype"] == "bf16 weights"
        fp32 = result["trl_tuned_fp32"]
        assert fp32["gradient_checkpointing"] is False and fp32["attention"] == "eager"
        assert fp32["learner_dtype"] == "fp32 weights, bf16 autocast"
        assert "vs TRL tuned, fp32 weights" in result["table"]
        workers.append("trl_tuned_fp32")
    else:  # bf16 is emulated here: tuned TRL computes in fp32, and the fp32-weights row would repeat it
        assert result["fast_dtype"] == "float32" and tuned["learner_dtype"] == "fp32 weights, no autocast"
        assert "trl_tuned_fp32" not in result and "no bf16 instructions" in result["table"]
        assert result["generate"]["dtype"] == "float32"
    for worker in workers:
        assert math.isfinite(result[worker]["step_s"]) and result[worker]["step_s"] > 0, worker
        assert result[worker]["peak_rss_mb"] > 0, worker
    assert "| median step time (s) |" in result["table"]
    # random weights: every row is run (their reward is 0, so skipping rows with A = 0 would leave one)
    assert result["posttrain"]["skipped_rows_frac"] == 0.0 and "posttrain's learner skipped" not in result["table"]
    assert "Environment: posttrain_commit" in proc.stdout
    assert result["device"] == "cpu" and "peak GPU memory" not in result["table"]
    assert all(result[w]["peak_gpu_mb"] == 0.0 for w in ("posttrain", "trl", "trl_tuned"))

    # a run without generate (--only posttrain --only trl_tuned): its table says so (this raised
    # KeyError: 'generate' before, and the driver printed no table)
    del result["generate"]
    result["posttrain"]["skipped_rows_frac"] = 0.3  # as the real model records it
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps(result))
    again = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vs_trl.py"), "--table-from", str(partial)],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "| median step time (s) |" in again.stdout and "not run in this invocation" in again.stdout
    assert "posttrain's learner skipped 30% of the rows" in again.stdout

    # the same figures as a CUDA run would record them (benchmarks/gpu_vs_trl.sh): the table adds peak GPU
    # memory with its ratio, names the GPU-sized matmul and drops the CPU's bf16 remark
    result["device"], result["peak_matrix_size"] = "cuda", 8192
    result["posttrain"]["peak_gpu_mb"], result["trl_tuned"]["peak_gpu_mb"] = 1000.0, 4000.0
    result["trl"]["peak_gpu_mb"] = 2000.0
    if "trl_tuned_fp32" in result:  # run on a CPU with bf16 instructions (this test once passed only without them)
        result["trl_tuned_fp32"]["peak_gpu_mb"] = 3000.0
    cuda = tmp_path / "cuda.json"
    cuda.write_text(json.dumps(result))
    shown = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vs_trl.py"), "--table-from", str(cuda)],
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert shown.returncode == 0, shown.stderr[-2000:]
    gpu_row = next(line for line in shown.stdout.splitlines() if line.startswith("| peak GPU memory allocated (MB) |"))
    assert "| 1000 |" in gpu_row and "0.25 of TRL's" in gpu_row and "0.50 of TRL's" in gpu_row
    assert "8192x8192, on the GPU" in shown.stdout and "no bf16 instructions" not in shown.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_vs_trl_refuses_cuda_without_a_gpu_before_any_work(tmp_path):
    out = tmp_path / "never.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "vs_trl.py"), "--device", "cuda",
                           "--model", "tiny-random", "--json", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0 and "--device cuda needs a CUDA GPU" in proc.stderr
    assert "running" not in proc.stdout and not out.exists()
