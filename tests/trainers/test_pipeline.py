"""examples/pipeline.sh: SFT -> DPO -> RL, each stage loading the previous stage's run directory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_each_stage_starts_from_the_previous_stage(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "POSTTRAIN_ALLOCATOR": "system"}
    out = tmp_path / "p"
    proc = subprocess.run(["bash", "examples/pipeline.sh", str(out), "model.name=tiny-random", "trainer.steps=1",
                           "trainer.eval_problems=4", "trainer.threads=1", "rollout.max_new_tokens=4"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stages = [line.split()[0] for line in proc.stdout.splitlines() if line.split()[:1] in (["1-sft"], ["2-dpo"], ["3-rl"])]
    assert stages == ["1-sft", "2-dpo", "3-rl"]
    # every later stage's config names the previous stage's run directory as its model
    for stage, previous in (("2-dpo", "1-sft"), ("3-rl", "2-dpo")):
        assert yaml.safe_load((out / stage / "config.yaml").read_text())["model"]["name"] == str(out / previous)
        assert json.loads((out / stage / "summary.json").read_text())["steps"] == 1
