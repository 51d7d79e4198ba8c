"""SIGTERM (a plain `kill`, a job scheduler) stops `posttrain rl` like Ctrl-C: cleanup runs,
the exit code says so, and complete checkpoints stay for --resume."""

import os
import signal
import subprocess
import sys
import time


def test_sigterm_unwinds_and_keeps_complete_checkpoints(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "posttrain.cli", "rl", "examples/arithmetic.yaml", "model.name=tiny-random",
           "trainer.steps=200", "trainer.eval_problems=8", "trainer.checkpoint_every=1", "rollout.max_new_tokens=4",
           "trainer.threads=1", "--output-dir", str(run)]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((run / "checkpoints").glob("step_*/COMPLETE")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert "interrupted; the run directory keeps its last checkpoint" in err
    done = [int(p.parent.name[5:]) for p in (run / "checkpoints").glob("step_*/COMPLETE")]
    assert done and max(done) < 200
