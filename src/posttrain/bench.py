"""Throughput and memory of a configured RL run, measured on this machine.

Figures (medians over the measured steps, after warm-up):
- step time, generation time, learner time;
- generation throughput: completion tokens per second of sampling;
- learner throughput: (prompt + completion) tokens of the batch per second of the update;
- learner MFU: FLOPs the learner actually executes / learner time / measured matmul peak
  (the highest of the peaks measured after each step; and, per step, the one measured next to it),
  where FLOPs = 6 * N_nonembed * (prompt tokens processed + completion tokens)
              + 6 * hidden * vocab * completion tokens        (output projection, chunked)
  and "prompt tokens processed" counts each group's prompt once when the learner shares the
  prompt pass (it does by default), once per sample otherwise;
- peak resident memory of the process.
"""

from __future__ import annotations

import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch


def peak_matrix_size(device: torch.device | str) -> int:
    """The n of the n x n matmul the peak is measured with: a GPU needs large matrices to reach its
    peak; 2048 is this library's CPU figure."""
    return 8192 if torch.device(device).type == "cuda" else 2048


def matmul_peak_gflops(dtype: torch.dtype = torch.float32, n: int | None = None, reps: int = 6,
                       device: torch.device | str = "cpu") -> float:
    """Best-of-``reps`` GFLOP/s of an n x n matmul in ``dtype`` on ``device`` (a CPU: all torch threads;
    n defaults to ``peak_matrix_size(device)``)."""
    n = n or peak_matrix_size(device)
    g = torch.Generator().manual_seed(0)  # its own: measuring between steps must not move the global RNG
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    torch.mm(a, b)  # warm-up
    sync()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def model_dims(model) -> tuple[int, int, int]:
    """(matmul weights outside the embedding and LM head, hidden size, vocabulary size). Norm
    scales and biases are left out: they cost no matmul."""
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    skip = {emb.data_ptr(), head.data_ptr()}
    nonembed = sum(p.numel() for p in model.parameters() if p.dim() >= 2 and p.data_ptr() not in skip)
    return nonembed, emb.shape[1], emb.shape[0]


def learner_flops(nonembed: int, hidden: int, vocab: int, prompt_tokens: float, completion_tokens: float,
                  passes: int = 1, rows: int = 0) -> float:
    """Model FLOPs of the learner's forward + backward (``passes`` times):

        6 * nonembed * (prompt_tokens + completion_tokens - rows) + 6 * hidden * vocab * completion_tokens

    6 = 2 (multiply-add) x 3 (forward, input gradient, weight gradient). The decoder runs on every
    input position, and a row's last completion token is never an input (pass ``rows`` to count
    that; 0 keeps the usual 6 N D convention); the LM head runs on completion positions only.
    Attention's own matmuls (QK^T and AV: 12 L^2 H per layer and row of length L) are excluded,
    as in the usual MFU accounting. tests/core/test_flops.py checks the matmul part against
    torch.utils.flop_counter, exactly.
    """
    positions = prompt_tokens + completion_tokens - rows
    return passes * (6.0 * nonembed * positions + 6.0 * hidden * vocab * completion_tokens)


def mfu_figures(gflops: list[float], peaks: list[float]) -> dict:
    """Learner GFLOP/s per step and the matmul peak measured after each step -> the MFU figures.

    ``learner_mfu`` divides the median by the highest peak (conservative); ``learner_mfu_step_peak``
    is the median of each step's GFLOP/s over the peak measured right after it.
    """
    med = statistics.median
    return {
        "learner_gflops": med(gflops),
        "matmul_peak_gflops": max(peaks),
        "step_peaks_gflops": peaks,
        "learner_mfu": med(gflops) / max(peaks),
        "learner_mfu_step_peak": med(g / p for g, p in zip(gflops, peaks)),
    }


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_config(cfg, steps: int = 5, warmup: int = 1) -> dict:
    """Run ``warmup + steps`` training steps of ``cfg`` (no evaluation, no checkpoints).

    The matmul peak is measured right after every step (outside its timing): a shared machine's
    speed drifts within minutes, so each step's MFU is also given against the peak measured
    next to it (``learner_mfu_step_peak``), besides the one against the highest peak of all
    (``learner_mfu``, the conservative figure).

    MFU counts the model FLOPs of the rows the learner ran: rows whose gradient is exactly zero are
    skipped (``skipped_rows_frac``, RLUpdate.rows_to_learn), while ``learner_tok_per_s`` divides all of
    the batch's tokens by the learner's time, the rate a user gets.
    """
    from posttrain.allocator import active_allocator
    from posttrain.models.loading import load_model_and_tokenizer
    from posttrain.rewards.registry import build_reward
    from posttrain.rollout.engine import resolve_dtype
    from posttrain.runs import RunDir
    from posttrain.tasks.registry import build_task
    from posttrain.trainers.rl import RLTrainer

    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    model, tokenizer = load_model_and_tokenizer(cfg.model.name)
    task = build_task(cfg.task)
    reward = build_reward(cfg.reward, tokenizer=tokenizer)
    rows, peaks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        trainer = RLTrainer(cfg, model, tokenizer, task, reward, RunDir(Path(tmp)))
        # MFU is against the machine's faster precision, whatever the learner runs in: a CPU that
        # emulates bf16 would otherwise report a high MFU of a slow, emulated peak.
        peak_dtype = resolve_dtype("auto", trainer.device)
        for _ in range(warmup + steps):
            rows.append(trainer.train_step())
            peaks.append(matmul_peak_gflops(peak_dtype, device=trainer.device))
        trainer.close()
    rows, peaks = rows[warmup:], peaks[warmup:]
    learner_dtype = trainer.learner.dtype
    key = "bf16" if learner_dtype == torch.bfloat16 else "fp32"
    nonembed, hidden, vocab = model_dims(model)
    # The tokens the learner ran: per mini-batch (a mean over mini-batches and epochs), after the rows
    # it skipped (A = 0, RLUpdate.rows_to_learn) and with each group's prompt once under share_prompt_pass.
    mini_batches, passes = cfg.trainer.mini_batches, cfg.trainer.ppo_epochs
    rows_per_step = cfg.rollout.num_prompts * cfg.rollout.num_completions
    flops = [learner_flops(nonembed, hidden, vocab, r.get("learner/prompt_tokens", 0.0) * mini_batches,
                           r.get("learner/completion_tokens", 0.0) * mini_batches, passes,
                           rows_per_step * (1.0 - r.get("learner/skipped_rows_frac", 0.0))) for r in rows]
    med = statistics.median
    learn_s = med(r["time/learn_s"] for r in rows)
    gen_s = med(r["time/gen_s"] for r in rows)
    gflops = [f / r["time/learn_s"] / 1e9 for f, r in zip(flops, rows)]
    return mfu_figures(gflops, peaks) | {
        "steps_measured": len(rows),
        "step_s": med(r["time/step_s"] for r in rows),
        "gen_s": gen_s,
        "learn_s": learn_s,
        "completion_tokens_per_step": med(r["tokens/completion"] for r in rows),
        "gen_tok_per_s": med(r["tokens/completion"] / r["time/gen_s"] for r in rows),
        "learner_tok_per_s": med((r["tokens/prompt"] + r["tokens/completion"]) / r["time/learn_s"] for r in rows),
        "learner_dtype": key,
        "peak_rss_mb": peak_rss_mb(),
        "device": str(trainer.device),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if trainer.device.type == "cuda" else 0.0,
        "reward_mean": med(r["reward/mean"] for r in rows),
        "skipped_rows_frac": statistics.mean(r.get("learner/skipped_rows_frac", 0.0) for r in rows),
        "allocator": active_allocator(),
    }


def print_bench(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="posttrain bench")
    table.add_column("figure")
    table.add_column("value", justify="right")
    fmt = {
        "step_s": "{:.2f} s", "gen_s": "{:.2f} s", "learn_s": "{:.2f} s", "gen_tok_per_s": "{:.0f}",
        "learner_tok_per_s": "{:.0f}", "learner_gflops": "{:.0f}", "matmul_peak_gflops": "{:.0f}",
        "learner_mfu": "{:.0%}", "learner_mfu_step_peak": "{:.0%}", "peak_rss_mb": "{:.0f} MB",
        "completion_tokens_per_step": "{:.0f}",
    }
    for key, pattern in fmt.items():
        table.add_row(key, pattern.format(result[key]))
    if result.get("peak_gpu_mb"):
        table.add_row("peak GPU memory (torch allocator)", f"{result['peak_gpu_mb']:.0f} MB")
    table.add_row("device", result.get("device", "cpu"))
    table.add_row("learner dtype", result["learner_dtype"])
    table.add_row("allocator", result["allocator"])
    Console().print(table)
