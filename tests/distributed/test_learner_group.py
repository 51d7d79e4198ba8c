"""Data-parallel learners in the RL loop on a real local Ray cluster: rank 0 is the driver, rank 1
a Ray actor, joined over gloo. Two learners must train like one; a learner killed with SIGKILL
must stop the run with a clear error, and --resume must then finish it bit-identically."""

import json
import os
import signal

import pytest
import torch

ray = pytest.importorskip("ray")

from posttrain.config import load_config  # noqa: E402
from posttrain.trainers import rl  # noqa: E402
from posttrain.trainers.learner_group import LearnerCrashError  # noqa: E402
from posttrain.trainers.rl_run import train_rl  # noqa: E402

# The tiny model and learnable reward of test_ray_rollouts, in fp32 so that the one- and
# two-learner gradients differ only by summation order (~1e-7 relative), two PPO mini-batches
# so that old log-probs are recomputed (a sharded, all-gathered pass) and the KL to a
# reference is in the loss (another one).
FP32 = ["model.name=tiny-random", "task.max_operand=20", "reward={type: format, pattern: '^[0-9]', match: search}",
        "rollout.num_prompts=8", "rollout.num_completions=4", "rollout.max_new_tokens=4", "trainer.lr=3e-3",
        "trainer.eval_problems=16", "trainer.micro_batch_size=4", "trainer.mini_batches=2",
        "algorithm.kl.coef=0.05", "trainer.autocast=none", "rollout.dtype=float32", "distributed.cpus_per_learner=1"]


@pytest.fixture(scope="module", autouse=True)
def local_cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run, step):
    from safetensors.torch import load_file

    return load_file(run / "checkpoints" / f"step_{step}" / "model.safetensors")


def test_two_learners_make_the_one_learner_update(tmp_path, monkeypatch):
    ranks = []
    original = rl.RLTrainer.train_step

    def recording_step(self):
        if self.learner_group is not None and not ranks:
            ranks.extend(self.learner_group.where())
        return original(self)

    monkeypatch.setattr(rl.RLTrainer, "train_step", recording_step)
    one, two = tmp_path / "one", tmp_path / "two"
    train_rl(load_config(None, FP32 + ["trainer.steps=2", "distributed.learners=1"]), output_dir=str(one), quiet=True)
    train_rl(load_config(None, FP32 + ["trainer.steps=2", "distributed.learners=2"]), output_dir=str(two), quiet=True)
    assert len(ranks) == 1 and ranks[0][0] != os.getpid()  # rank 1 is another process
    a, b = _rows(one), _rows(two)
    # Step 1: the same rollouts (same weights, same generator), so equal loss, KL, gradients.
    assert a[0]["reward/mean"] == b[0]["reward/mean"]
    for key in ("loss/total", "grad_norm", "kl/mean"):
        assert b[0][key] == pytest.approx(a[0][key], rel=1e-5, abs=1e-7), key
    assert b[0]["time/collective_s"] > 0 and "time/collective_s" not in a[0]
    wa, wb = _weights(one, 2), _weights(two, 2)
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    assert worst < 1e-5, worst  # two Adam steps at lr 3e-3 from a 1e-7 gradient difference
    assert any(not torch.equal(wa[k], wb[k]) for k in wa) or worst == 0  # (summation order may differ)


def test_a_killed_learner_stops_the_run_and_resume_finishes_it_identically(tmp_path, monkeypatch):
    overrides = FP32 + ["trainer.steps=4", "trainer.checkpoint_every=1", "distributed.learners=2"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train_rl(load_config(None, overrides), output_dir=str(straight), quiet=True)

    original = rl.RLTrainer.train_step

    def killing_step(self):
        if self.step == 2:  # at the start of step 3: SIGKILL rank 1's process
            os.kill(self.learner_group.where()[0][0], signal.SIGKILL)
        return original(self)

    monkeypatch.setattr(rl.RLTrainer, "train_step", killing_step)
    with pytest.raises(LearnerCrashError, match=r"learner rank 1 died during step 3.*--resume.*step_2"):
        train_rl(load_config(None, overrides), output_dir=str(crashed), quiet=True)
    assert [r["step"] for r in _rows(crashed)] == [1, 2]
    monkeypatch.setattr(rl.RLTrainer, "train_step", original)
    train_rl(load_config(crashed / "config.yaml"), output_dir=str(crashed), resume=True, quiet=True)
    assert [r["step"] for r in _rows(crashed)] == [1, 2, 3, 4]
    a, b = _weights(straight, 4), _weights(crashed, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss/total"] for r in _rows(crashed)] == [r["loss/total"] for r in _rows(straight)]
