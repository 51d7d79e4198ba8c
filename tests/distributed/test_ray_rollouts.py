"""Ray rollout workers on a real local Ray cluster: synchronous and asynchronous training, a
worker killed with SIGKILL mid-run, and the errors raised before any work starts."""

import json
import os
import signal
import threading
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from posttrain.config import ConfigError, load_config  # noqa: E402
from posttrain.distributed import ray_pool  # noqa: E402
from posttrain.trainers.rl_run import train_rl  # noqa: E402

# The tiny model and the "starts with a digit" reward of tests/core/test_rl_trainer.py.
LEARNABLE = ["model.name=tiny-random", "task.max_operand=20", "reward={type: format, pattern: '^[0-9]', match: search}",
             "rollout.num_prompts=8", "rollout.num_completions=8", "rollout.max_new_tokens=4", "trainer.lr=3e-3",
             "trainer.eval_problems=64", "trainer.micro_batch_size=64", "trainer.threads=1"]


@pytest.fixture(scope="module", autouse=True)
def local_cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)  # logical CPUs: 2 workers + headroom
    yield
    ray.shutdown()


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_rollout_workers_learn_on_policy(tmp_path):
    cfg = load_config(None, LEARNABLE + ["trainer.steps=25", "distributed.rollout_workers=2"])
    summary = train_rl(cfg, output_dir=str(tmp_path / "run"), quiet=True)
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 26))
    assert all(r["staleness/max"] == 0 for r in rows)  # synchronous: every rollout from the current weights
    assert summary["eval_after"]["accuracy"] > summary["eval_before"]["accuracy"] + 0.3, summary


def test_one_step_stale_rollouts_are_bounded_and_recorded(tmp_path):
    cfg = load_config(None, LEARNABLE + ["trainer.steps=5", "distributed.rollout_workers=2",
                                         "distributed.max_staleness=1", "algorithm.correction.name=tis_token"])
    train_rl(cfg, output_dir=str(tmp_path / "run"), quiet=True)
    rows = _rows(tmp_path / "run")
    # step 1 trains on version 0; each later batch was submitted before the previous push
    assert [r["staleness/max"] for r in rows] == [0, 1, 1, 1, 1]
    # stale behaviour log-probs differ from the learner's: the mismatch is real and corrected
    assert all(r["mismatch/kl_k3"] > 0 for r in rows[1:])
    assert all(0 <= r["perf/sampling_hidden_frac"] <= 1 for r in rows)


def test_a_killed_worker_is_replaced_and_no_step_is_lost_or_repeated(tmp_path, monkeypatch):
    pools = []
    original = ray_pool.RayRolloutPool.__init__

    def capture(self, *args, **kwargs):
        original(self, *args, **kwargs)
        pools.append(self)

    monkeypatch.setattr(ray_pool.RayRolloutPool, "__init__", capture)
    run = tmp_path / "run"

    def killer():
        while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip():
            time.sleep(0.05)
        os.kill(pools[0].where()[0][0], signal.SIGKILL)  # mid-run: step 2 or 3 is being sampled

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    cfg = load_config(None, LEARNABLE + ["trainer.steps=6", "distributed.rollout_workers=2"])
    train_rl(cfg, output_dir=str(run), quiet=True)
    thread.join(timeout=60)
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["workers/restarts"] >= 1
    assert all(r["tokens/completion"] > 0 and r["reward/mean"] >= 0 for r in rows)


def test_more_workers_than_cluster_cpus_fail_before_training(tmp_path):
    cfg = load_config(None, LEARNABLE + ["trainer.steps=1", "distributed.rollout_workers=3",
                                         "distributed.cpus_per_worker=2"])
    with pytest.raises(ray_pool.RayUnavailableError, match="= 6 CPUs, but the Ray cluster has 4"):
        train_rl(cfg, output_dir=str(tmp_path / "run"), quiet=True)
    assert not (tmp_path / "run").exists()


def test_bad_distributed_settings_are_config_errors():
    with pytest.raises(ConfigError, match="max_staleness needs distributed.rollout_workers >= 1"):
        load_config(None, ["distributed.max_staleness=1"])
    with pytest.raises(ConfigError, match="distributed.learners must be <= the mini-batch of 4 samples"):
        load_config(None, ["distributed.learners=5", "rollout.num_prompts=2", "rollout.num_completions=4",
                           "trainer.mini_batches=2"])


def test_an_address_nobody_answers_fails_fast():
    t0 = time.perf_counter()
    with pytest.raises(ray_pool.RayUnavailableError, match="nothing answers there"):
        ray_pool._check_reachable("127.0.0.1:1")
    assert time.perf_counter() - t0 < 5


def test_an_interrupted_synchronous_run_resumes_to_the_same_weights(tmp_path):
    """k = 0: nothing is in flight at a checkpoint, and chunk seeds come from the trainer's
    generator (restored on resume), so the resumed run samples and updates identically."""
    from safetensors.torch import load_file

    overrides = LEARNABLE + ["trainer.steps=4", "trainer.checkpoint_every=1", "distributed.rollout_workers=2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_rl(load_config(None, overrides), output_dir=str(straight), quiet=True)
    train_rl(load_config(None, overrides), output_dir=str(split), quiet=True, stop_after=2)
    train_rl(load_config(split / "config.yaml"), output_dir=str(split), resume=True, quiet=True)
    assert [r["step"] for r in _rows(split)] == [1, 2, 3, 4]
    a = load_file(straight / "checkpoints" / "step_4" / "model.safetensors")
    b = load_file(split / "checkpoints" / "step_4" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["reward/mean"] for r in _rows(split)] == [r["reward/mean"] for r in _rows(straight)]
