"""The CUDA path: learner and hf engine on one GPU in bf16 (run by benchmarks/gpu_check.sh).

Skipped without CUDA. Tolerances are bf16's: a bf16 forward differs from an fp32 one by a few
units of 2^-8 relative per logit, which moves tiny-model log-probs by ~1e-2 nats.
"""

import json

import pytest
import torch

from posttrain.config import load_config
from posttrain.models.logprobs import completion_logprobs
from posttrain.models.tiny import tiny_model_and_tokenizer
from posttrain.rollout.engine import HFRolloutEngine, SamplingParams
from posttrain.tasks.base import Problem
from posttrain.trainers.learner import Learner

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_check.sh)")]

# The CPU suite's learnable and resumable runs (tests/core/test_rl_trainer.py), on CUDA.
LEARNABLE = ["model.name=tiny-random", "task.max_operand=20", "reward={type: format, pattern: '^[0-9]', match: search}",
             "rollout.num_prompts=8", "rollout.num_completions=8", "rollout.max_new_tokens=4", "trainer.lr=3e-3",
             "trainer.steps=25", "trainer.eval_problems=64", "trainer.micro_batch_size=64", "trainer.device=cuda"]
RESUMABLE = ["model.name=tiny-random", "rollout.num_prompts=4", "rollout.num_completions=4", "rollout.max_new_tokens=6",
             "trainer.lr=1e-3", "trainer.steps=4", "trainer.ppo_epochs=2", "trainer.mini_batches=2",
             "trainer.micro_batch_size=4", "trainer.checkpoint_every=1", "trainer.eval_problems=8",
             "trainer.lr_schedule=cosine", "trainer.warmup_steps=1", "algorithm.kl.coef=0.05", "trainer.device=cuda"]
PROBLEMS = [Problem(id=f"p{i}", prompt=f"What is {i} + {i}?", answer=str(2 * i)) for i in range(4)]


def _learner(model, **overrides):
    cfg = load_config(None, ["trainer.device=cuda", *[f"{k}={v}" for k, v in overrides.items()]])
    return Learner(model, cfg.trainer, cfg.model, temperature=1.0, device=torch.device("cuda"),
                   sampler_dtype=torch.bfloat16)


def test_cuda_learner_is_bf16_with_an_fp32_master_and_no_split():
    model, _ = tiny_model_and_tokenizer()
    learner = _learner(model)
    assert not learner.split_master  # the bf16 + 16-bit split is CPU-only (see trainers/learner.py)
    assert next(learner.policy.parameters()).dtype == torch.float32
    assert next(learner.model.parameters()).dtype == torch.bfloat16
    assert next(learner.model.parameters()).device.type == "cuda"


def test_cuda_sampling_and_learner_logprobs_agree_with_cpu_fp32():
    model, tok = tiny_model_and_tokenizer(seed=3)
    cpu = tiny_model_and_tokenizer(seed=3)[0]
    learner = _learner(model)
    engine = HFRolloutEngine(learner.model, tok, dtype=torch.bfloat16)
    assert engine.model is learner.model  # shared weights: no copy, no sync
    r = engine.generate(PROBLEMS, 4, SamplingParams(max_new_tokens=12), torch.Generator("cuda").manual_seed(0))
    mask = r.completion_mask.bool()
    gpu = learner.logprobs(r)
    with torch.no_grad():
        ref = completion_logprobs(cpu, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask)[0]
    # engine (bf16, KV cache) vs learner (bf16, full pass) vs CPU fp32 on the same tokens
    assert (r.behaviour_logprobs - gpu)[mask].abs().mean() < 0.03
    assert (gpu - ref)[mask].abs().mean() < 0.03
    assert (gpu - ref)[mask].abs().max() < 0.3


def test_cuda_optimizer_step_moves_the_master_and_refreshes_the_bf16_copy():
    model, tok = tiny_model_and_tokenizer()
    learner = _learner(model, **{"trainer.lr": 1e-2})
    engine = HFRolloutEngine(learner.model, tok, dtype=torch.bfloat16)
    r = engine.generate(PROBLEMS, 2, SamplingParams(max_new_tokens=6), torch.Generator("cuda").manual_seed(1))
    before = [p.detach().clone() for p in learner.policy.parameters()]
    learner.zero_grad()
    learner.forward_backward(r, lambda micro, logp, ent: -(logp * micro.completion_mask.to(logp.device)).sum())
    assert learner.clip_grad_norm() > 0
    learner.optim_step(1.0)
    moved = [not torch.equal(a, b) for a, b in zip(before, learner.policy.parameters())]
    assert sum(moved) >= len(moved) - 1  # every trained tensor moved (at most the frozen rotary buffer aside)
    for low, master in zip(learner.model.parameters(), learner.policy.parameters()):
        assert torch.equal(low, master.detach().to(torch.bfloat16))


def test_tiny_model_learns_a_trivial_task_on_cuda(tmp_path):
    from posttrain.trainers.rl_run import train_rl

    summary = train_rl(load_config(None, LEARNABLE), output_dir=str(tmp_path / "run"), quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["eval_after"]["accuracy"] > summary["eval_before"]["accuracy"] + 0.4, summary
    assert rows[-1]["reward/mean"] > rows[0]["reward/mean"]


def test_resume_on_cuda(tmp_path):
    """Interrupted + resumed equals straight through: exactly where CUDA kernels are deterministic,
    else within bf16 noise (the figure is printed for the GPU check's log)."""
    from safetensors.torch import load_file

    from posttrain.trainers.rl_run import train_rl

    overrides = RESUMABLE
    straight, split = tmp_path / "straight", tmp_path / "split"
    train_rl(load_config(None, overrides), output_dir=str(straight), quiet=True)
    train_rl(load_config(None, overrides), output_dir=str(split), quiet=True, stop_after=2)
    train_rl(load_config(split / "config.yaml"), output_dir=str(split), resume=True, quiet=True)
    a = load_file(straight / "checkpoints" / "step_4" / "model.safetensors")
    b = load_file(split / "checkpoints" / "step_4" / "model.safetensors")
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"resume on CUDA: largest weight difference {worst:.3g}")
    assert worst < 1e-3
