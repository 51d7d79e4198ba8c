"""The RL loop on vLLM rollouts (real vLLM, CPU build): it trains, logs a real train-inference
mismatch, applies a correction to it, and resumes from a checkpoint to the same end."""

import json

import pytest

pytestmark = [pytest.mark.vllm]
pytest.importorskip("vllm")

from safetensors.torch import load_file  # noqa: E402

from posttrain.config import load_config  # noqa: E402
from posttrain.trainers.rl_run import train_rl  # noqa: E402


def overrides(tiny_dir, *extra):
    return [f"model.name={tiny_dir}", "rollout.engine=vllm", "rollout.kv_cache_gb=0.05", "rollout.num_prompts=4",
            "rollout.num_completions=4", "rollout.max_new_tokens=6", "trainer.lr=1e-3", "trainer.steps=4",
            "trainer.checkpoint_every=1", "trainer.eval_problems=8", "trainer.micro_batch_size=8",
            "algorithm.correction.name=tis_token",
            # bf16 by name: auto samples in fp32 on a CPU without bf16 instructions, and fp32 vLLM against an
            # fp32 learner leaves a mismatch too small for the test below to see
            "rollout.dtype=bfloat16", *extra]


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_vllm_rollouts_train_log_the_mismatch_and_resume_to_the_same_end(tiny_dir, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_rl(load_config(None, overrides(tiny_dir)), output_dir=str(straight), quiet=True)
    got = rows(straight)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    # bf16 vLLM sampling vs the learner's log-probs: a real, small mismatch, and TIS acts on it
    assert all(r["mismatch/kl_k3"] > 0 and r["time/sync_s"] > 0 for r in got)
    assert all(0.0 <= r["correction/truncated_frac"] <= 1.0 and r["correction/weight_mean"] > 0 for r in got)
    assert all("entropy/learner" in r for r in got)  # vLLM records no entropies: the learner's stand in

    train_rl(load_config(None, overrides(tiny_dir)), output_dir=str(split), quiet=True, stop_after=2)
    train_rl(load_config(split / "config.yaml"), output_dir=str(split), resume=True, quiet=True)
    assert [r["step"] for r in rows(split)] == [1, 2, 3, 4]
    a = load_file(straight / "checkpoints" / "step_4" / "model.safetensors")
    b = load_file(split / "checkpoints" / "step_4" / "model.safetensors")
    # vLLM samples from per-request seeds drawn from the trainer's generator (restored on
    # resume) with the same weights pushed, so the resumed run samples the same tokens
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst == 0.0, worst
    assert [r["reward/mean"] for r in rows(split)] == [r["reward/mean"] for r in got]
