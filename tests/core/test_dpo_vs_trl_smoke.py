"""benchmarks/dpo_vs_trl.py --smoke runs posttrain's DPO and TRL's DPOTrainer (eager and sdpa) on the
tiny model: 1 warm-up + 2 steps of 4 pairs.

The timings mean nothing at this size; the test checks what makes the comparison a comparison:
both systems trained on the same tokens in the same order (TRL's per-step token counts equal
posttrain's, and no pair tokenized differently), with the settings the docstring claims (posttrain's
own saved config, TRL's recorded options), that both start from policy = reference (first loss ln 2),
and that the report carries the environment.
"""

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("trl", reason="TRL is the benchmark's peer: pip install -e '.[bench]'")

ROOT = Path(__file__).resolve().parents[2]


def test_dpo_vs_trl_smoke_same_pairs_same_tokens_same_settings(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "dpo_vs_trl.py"), "--smoke",
                           "--work-dir", str(work), "--out-dir", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    result = json.loads((out / "dpo_vs_trl.json").read_text())
    p = result["posttrain"]

    # posttrain ran with the benchmark's settings (its own saved config)
    cfg = yaml.safe_load((work / "posttrain_run" / "config.yaml").read_text())
    assert cfg["data"]["batch_size"] == 4 and cfg["preference"]["beta"] == pytest.approx(0.1)
    assert cfg["trainer"]["lr"] == pytest.approx(1e-6) and cfg["trainer"]["steps"] == 3
    assert cfg["trainer"]["adam_betas"] == [0.9, 0.99] and cfg["trainer"]["warmup_steps"] == 0
    rows = [json.loads(x) for x in (work / "posttrain_run" / "metrics.jsonl").read_text().splitlines()]
    assert p["step_s"] == pytest.approx(statistics.median(r["time/step_s"] for r in rows[1:]))
    n_pairs = len((work / "pairs.jsonl").read_text().splitlines())
    assert result["pairs"] == n_pairs > 100  # examples/dpo.yaml's train pairs, held-out slice left out

    for name, attention in (("trl_eager", "eager"), ("trl_sdpa", "sdpa")):
        t = result[name]
        from posttrain.rollout.engine import cpu_has_native_bf16

        assert t["attention"] == attention and t["weights"] == ("bf16" if cpu_has_native_bf16() else "fp32")
        assert t["gradient_checkpointing"] is False and t["precompute_ref_log_probs"] is True
        # same pairs, same order, same tokens: per-step token counts of what each system trained on
        assert t["pairs_with_other_tokens"] == 0 and t["pairs_checked"] == t["pairs_in_dataset"] == 12
        assert t["tokens"] == [int(n) for n in p["tokens"]]
        assert t["ref_precompute_s"] > 0 and len(t["step_times"]) == 3
        # step 1: policy = reference, so the sigmoid DPO loss is ln 2 in both (bf16 in TRL)
        assert t["losses"][0] == pytest.approx(math.log(2), abs=2e-3)
        for key in ("step_s", "peak_rss_mb", "reference_plus_training_s"):
            assert math.isfinite(t[key]) and t[key] > 0, (name, key)
    assert p["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert p["peak_rss_mb"] > 100 and p["steps_with_reference_pass"] == 2  # 12 draws of 179 pairs: all new

    md = (out / "dpo_vs_trl.md").read_text()
    assert "| median step time (s) |" in md and "TRL eager" in md and "TRL sdpa" in md
    assert "Environment: posttrain_commit" in md and "0 of 12 pairs tokenized differently" in md
