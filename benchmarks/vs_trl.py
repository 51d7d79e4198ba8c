"""posttrain vs TRL's GRPOTrainer, side by side on this machine, in one invocation.

Same model (SmolLM2-135M-Instruct), same prompts (the quickstart's arithmetic train split in
the same order), 8 prompts x 8 completions per step (``--prompts``, ``--completions``), up to 64 new tokens, temperature 1, the
same loss (token-mean GRPO with group-std advantages, PPO clip 0.2, one epoch, no KL), the
same reward, learning rate and seed. Each system runs in its own subprocess so peak RSS is
its own. TRL runs twice:

* as shipped: its defaults (notably gradient_checkpointing=True), fp32 weights with bf16
  autocast (`bf16=True`), and the model's default attention (sdpa);
* tuned, as a competent user would set it on this CPU (the headline ratio is against this row, the
  fastest TRL measured):
  gradient checkpointing off (the 23 GB free make recomputation pointless), the weights loaded in
  bf16 (what posttrain computes on; TRL then trains them in bf16, a cheaper and less precise
  update than posttrain's fp32 masters, so the choice favours TRL), and eager attention, which
  is faster than sdpa at these lengths on CPU (the `generate` worker measures both). TRL's
  `torch_compile` is left off and was not tried: sampling changes the sequence length every
  token, which on CPU means a recompilation per new shape;
* tuned with fp32 weights (bf16 autocast): the same, minus the bf16 weights. Slower, but it is the TRL
  setting that learns at this learning rate (benchmarks/time_to_accuracy.py measured bf16-weight TRL
  stalling), so it is the peer a user who wants the model to improve would run.

All of that holds on a CPU with bf16 instructions (AVX512_BF16 or AMX). On one without them
(Ice Lake-class AVX-512) bf16 is emulated and slower than fp32, posttrain's ``auto`` precision
computes in fp32, and so does tuned TRL: fp32 weights, no autocast (``bf16=False``). The
"fp32 weights" row is then the tuned row itself and is not run; as shipped keeps TRL's bf16
autocast. MFU then divides by the fp32 peak: always the peak of the faster precision.

A further subprocess compares sampling alone: transformers' `generate` against posttrain's
rollout engine, same weights (in the faster precision), batch and length.

On a GPU (``--device cuda``; benchmarks/gpu_vs_trl.sh runs it) both systems train on CUDA: posttrain's
learner in bf16 with fp32 masters, TRL with fp32 weights under bf16 autocast (its GPU recipe) and its
default sdpa attention, "tuned" there only turning gradient checkpointing off. Sampling alone is not
run, the matmul peak is the GPU's (8192 x 8192), and peak GPU memory is reported next to RSS.

    pip install -e '.[bench]'            # TRL is a benchmark-only extra
    python benchmarks/vs_trl.py --json bench_out/vs_trl.json

Figures: median step time over the measured steps (after warm-up), completion tokens per
second of sampling, learner tokens (prompt + completion) per second of the update, learner
MFU against the faster precision's matmul peak measured in this run (see posttrain.bench for the FLOP
count), peak RSS; then the ratios posttrain / TRL.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from posttrain.allocator import preload_env

ROOT = Path(__file__).resolve().parents[1]
PROMPTS, COMPLETIONS = 8, 8
ALLOCATOR = {"library": None}


def base_overrides(args) -> list[str]:
    return [
        f"model.name={args.model}",
        f"rollout.num_prompts={args.prompts}",
        f"rollout.num_completions={args.completions}",
        f"rollout.max_new_tokens={args.max_new_tokens}",
        "rollout.temperature=1.0",
        "algorithm.advantage_estimator=grpo",
        "algorithm.policy_loss=ppo_clip",
        "algorithm.aggregation=token-mean",
        "algorithm.kl.coef=0.0",
        "trainer.ppo_epochs=1",
        "trainer.mini_batches=1",
        "trainer.warmup_steps=0",
        f"trainer.lr={args.lr}",
        f"trainer.seed={args.seed}",
    ] + ([f"trainer.device={args.device}"] if args.device != "cpu" else [])


# ---------------------------------------------------------------------------------- workers
def random_weights(model: str) -> bool:
    """A model with random weights: sweep.build_random_arch's directories (RANDOM_WEIGHTS.txt), tiny-random."""
    return model == "tiny-random" or (Path(model) / "RANDOM_WEIGHTS.txt").exists()


def worker_posttrain(args) -> dict:
    from posttrain.bench import bench_config
    from posttrain.config import load_config

    # Random weights earn reward 0 on every row, so every group has A = 0 and the learner would run one
    # row a step (RLUpdate.rows_to_learn): a speed figure of no update. There, every row is run.
    learn_all = ["trainer.skip_zero_advantage_rows=false"] if random_weights(args.model) else []
    cfg = load_config(ROOT / "examples" / "arithmetic.yaml", base_overrides(args) + learn_all + args.set)
    return bench_config(cfg, steps=args.steps, warmup=args.warmup)


def _completion_lengths(out, prompt_len: int, eos_ids: set[int]) -> list[int]:
    lengths = []
    for row in out[:, prompt_len:].tolist():
        n = len(row)
        for i, t in enumerate(row):
            if t in eos_ids:
                n = i + 1
                break
        lengths.append(n)
    return lengths


def worker_trl(args, tuned: bool = False, on_step=None, on_step_begin=None, config_overrides=None,
               bf16_weights: bool = True, checkpointing: bool | None = None) -> dict:
    """TRL's GRPOTrainer on the shape in ``args``. ``tuned`` turns gradient checkpointing off and picks
    eager attention; with ``bf16_weights`` (the speed row's choice) it also casts the weights to bf16,
    without it they stay fp32 under TRL's bf16 autocast, as shipped (an fp32 AdamW update: what
    benchmarks/time_to_accuracy.py's "TRL tuned, fp32 weights" row runs, because at lr 2e-5 a pure
    bf16 update rounds most steps away). ``on_step_begin()`` and ``on_step(row)``, when given,
    are called as each step begins and after it ends, with its timings (benchmarks/sweep.py uses them
    to give up on a cell whose first step predicts more than its time budget). ``config_overrides``
    replaces GRPOConfig arguments (benchmarks/time_to_accuracy.py saves checkpoints with it).
    ``checkpointing`` overrides the gradient checkpointing ``tuned`` implies (benchmarks/sweep.py turns it
    back on, tuned otherwise, where the tuned run does not fit in memory)."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.bench import learner_flops, matmul_peak_gflops, mfu_figures, model_dims, peak_rss_mb
    from posttrain.config import load_config
    from posttrain.models.loading import load_model_and_tokenizer
    from posttrain.rewards.registry import build_reward
    from posttrain.tasks.registry import build_task

    cfg = load_config(ROOT / "examples" / "arithmetic.yaml", base_overrides(args) + args.set)
    model, tokenizer = load_model_and_tokenizer(cfg.model.name)  # fp32 weights, as posttrain's learner
    device = args.device
    fast = fast_dtype(device)
    autocast = not tuned or fast == torch.bfloat16  # tuned on an emulated-bf16 CPU: fp32 throughout
    # On CUDA, tuned keeps TRL's GPU recipe (fp32 weights under bf16 autocast, sdpa attention) and only
    # turns checkpointing off: bf16 weights and eager attention are this CPU's choices, measured here.
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if tuned and device == "cpu":
        if bf16_weights and fast == torch.bfloat16:
            model = model.to(torch.bfloat16)
        model.config._attn_implementation = "eager"
    reward = build_reward(cfg.reward, tokenizer=tokenizer)
    # posttrain's sampler order for the same seed, so both see the same prompts per step
    from posttrain.trainers.rl import EpochSampler

    sampler = EpochSampler(list(build_task(cfg.task).problems("train")), cfg.trainer.seed)
    prompts_per_step, completions = args.prompts, args.completions
    problems = sampler.next(prompts_per_step * (args.steps + args.warmup))
    by_prompt = {p.prompt: p for p in problems}
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p.prompt}]} for p in problems])

    def reward_fn(prompts, completions, **kwargs):
        out = []
        for prompt, completion in zip(prompts, completions):
            problem = by_prompt[prompt[-1]["content"]]
            out.append(float(reward(problem, [completion[-1]["content"]]).rewards[0]))
        return out

    eos = {tokenizer.eos_token_id}
    gen = {"s": 0.0, "tokens": 0, "prompt_tokens": 0}
    cls = type(model)
    original = cls.generate

    def timed_generate(self, *a, **kw):
        sync()
        t = time.perf_counter()
        out = original(self, *a, **kw)
        sync()
        gen["s"] += time.perf_counter() - t
        ids = kw.get("input_ids", a[0] if a else None)
        mask = kw.get("attention_mask")
        gen["tokens"] += sum(_completion_lengths(out, ids.shape[1], eos))
        gen["prompt_tokens"] += int(mask.sum()) if mask is not None else int(ids.numel())
        return out

    cls.generate = timed_generate
    steps = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            if on_step_begin is not None:
                on_step_begin()
            sync()
            self.t0 = time.perf_counter()
            self.g0, self.n0, self.p0 = gen["s"], gen["tokens"], gen["prompt_tokens"]

        def on_step_end(self, *a, **kw):
            sync()
            total = time.perf_counter() - self.t0
            g = gen["s"] - self.g0
            steps.append({"step_s": total, "gen_s": g, "learn_s": total - g,
                          "completion_tokens": gen["tokens"] - self.n0, "prompt_tokens": gen["prompt_tokens"] - self.p0,
                          "peak": matmul_peak_gflops(fast, device=device)})  # after the timing, as posttrain.bench does
            if on_step is not None:
                on_step(steps[-1])

    with tempfile.TemporaryDirectory() as tmp:
        config = GRPOConfig(**dict(
            output_dir=tmp, per_device_train_batch_size=prompts_per_step * completions,
            gradient_accumulation_steps=1, num_generations=completions, max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0,
            top_k=0, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, beta=0.0,
            loss_type="dapo", scale_rewards="group", num_iterations=1, epsilon=0.2, max_grad_norm=1.0,
            max_steps=args.steps + args.warmup, logging_steps=1, report_to="none", save_strategy="no",
            seed=args.seed, bf16=autocast, use_cpu=device == "cpu", shuffle_dataset=False, disable_tqdm=True,
            dataloader_num_workers=0, gradient_checkpointing=not tuned if checkpointing is None else checkpointing,
        ) | (config_overrides or {}))
        trainer = GRPOTrainer(model=model, reward_funcs=reward_fn, args=config, train_dataset=data,
                              processing_class=tokenizer, callbacks=[Timer()])
        trainer.train()
    rows = steps[args.warmup:]
    med = statistics.median
    nonembed, hidden, vocab = model_dims(model)
    peaks = [r["peak"] for r in rows]
    flops = [learner_flops(nonembed, hidden, vocab, r["prompt_tokens"], r["completion_tokens"]) for r in rows]
    gflops = [f / r["learn_s"] / 1e9 for f, r in zip(flops, rows)]
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h][args.warmup:]
    return mfu_figures(gflops, peaks) | {
        "steps_measured": len(rows),
        "step_s": med(r["step_s"] for r in rows),
        "gen_s": med(r["gen_s"] for r in rows),
        "learn_s": med(r["learn_s"] for r in rows),
        "completion_tokens_per_step": med(r["completion_tokens"] for r in rows),
        "gen_tok_per_s": med(r["completion_tokens"] / r["gen_s"] for r in rows),
        "learner_tok_per_s": med((r["prompt_tokens"] + r["completion_tokens"]) / r["learn_s"] for r in rows),
        "learner_dtype": ("bf16 weights" if model.dtype == torch.bfloat16
                          else "fp32 weights, bf16 autocast" if autocast else "fp32 weights, no autocast"),
        "attention": model.config._attn_implementation,
        "peak_rss_mb": peak_rss_mb(),
        "device": device,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0,
        "reward_mean": med(rewards) if rewards else float("nan"),
        "gradient_checkpointing": config.gradient_checkpointing,
    }


def fast_dtype(device: str = "cpu"):
    """The precision posttrain's ``auto`` computes in on ``device`` (on a CPU, bf16 only where it has bf16 instructions)."""
    import torch

    from posttrain.rollout.engine import resolve_dtype

    return resolve_dtype("auto", torch.device(device))


def worker_trl_tuned(args) -> dict:
    return worker_trl(args, tuned=True)


def worker_trl_tuned_fp32(args) -> dict:
    """Tuned, but fp32 weights under bf16 autocast: slower than bf16 weights, and the TRL row that learns
    (benchmarks/time_to_accuracy.py: with bf16 weights a 2e-5 update rounds away on most weights)."""
    return worker_trl(args, tuned=True, bf16_weights=False)


def worker_generate(args) -> dict:
    """transformers' generate vs posttrain's engine: same weights (in the faster precision), batch and length."""
    import torch

    from posttrain.config import load_config
    from posttrain.models.loading import load_model_and_tokenizer
    from posttrain.rollout.engine import HFRolloutEngine, SamplingParams
    from posttrain.tasks.registry import build_task

    cfg = load_config(ROOT / "examples" / "arithmetic.yaml", base_overrides(args))
    model, tokenizer = load_model_and_tokenizer(cfg.model.name)
    engine = HFRolloutEngine(model, tokenizer, dtype=fast_dtype())
    problems = build_task(cfg.task).problems("train")[:args.prompts]
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p.prompt}], tokenize=False,
                                           add_generation_prompt=True) for p in problems]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    eos = {tokenizer.eos_token_id}
    default_attention = engine.model.config._attn_implementation

    def hf_generate(attention: str) -> float:
        engine.model.config._attn_implementation = attention
        t = time.perf_counter()
        with torch.no_grad():
            out = engine.model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                                        max_new_tokens=args.max_new_tokens, num_return_sequences=args.completions,
                                        pad_token_id=tokenizer.pad_token_id)
        dt = time.perf_counter() - t
        engine.model.config._attn_implementation = default_attention
        return sum(_completion_lengths(out, enc.input_ids.shape[1], eos)) / dt

    hf, hf_eager, ours = [], [], []
    for rep in range(args.gen_reps + 1):  # first round is warm-up
        torch.manual_seed(rep)
        hf_tps = hf_generate(default_attention)
        # generate with the attention kernel posttrain picks on CPU, to separate the two effects
        hf_eager_tps = hf_generate("eager")
        t = time.perf_counter()
        r = engine.generate(problems, args.completions, SamplingParams(max_new_tokens=args.max_new_tokens),
                            torch.Generator().manual_seed(rep))
        dt2 = time.perf_counter() - t
        if rep:
            hf.append(hf_tps)
            hf_eager.append(hf_eager_tps)
            ours.append(float(r.completion_mask.sum()) / dt2)
    return {"hf_generate_tok_per_s": statistics.median(hf), "hf_generate_eager_tok_per_s": statistics.median(hf_eager),
            "hf_default_attention": default_attention, "posttrain_tok_per_s": statistics.median(ours),
            "reps": args.gen_reps, "dtype": str(engine.dtype).removeprefix("torch.")}


WORKERS = {"posttrain": worker_posttrain, "trl": worker_trl, "trl_tuned": worker_trl_tuned,
           "trl_tuned_fp32": worker_trl_tuned_fp32, "generate": worker_generate}


def environment() -> dict:
    """What produced the figures: commit, package versions, CPU and threads."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    def ver(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"posttrain_commit": (commit.stdout.strip() or "unknown") + (" (modified)" if dirty else ""),
            "torch": torch.__version__, "transformers": ver("transformers"), "trl": ver("trl"),
            "python": platform.python_version(), "cpu": cpu, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M %Z")} | (
        {"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda} if torch.cuda.is_available() else {})


# ---------------------------------------------------------------------------------- driver
def run_worker(name: str, argv: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, __file__, "--worker", name, "--worker-out", out, *argv]
    print(f"[vs_trl] running {name} ...", flush=True)
    t = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if ALLOCATOR["library"]:  # every worker, TRL included, runs under the same allocator
        env = preload_env(env, ALLOCATOR["library"])
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"[vs_trl] worker {name} failed with exit code {proc.returncode}")
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    print(f"[vs_trl] {name} done in {time.perf_counter() - t:.0f} s", flush=True)
    return result


def table(results: dict) -> str:
    p, g = results["posttrain"], results.get("generate")  # generate: absent from an --only run without it
    peers = [(name, results[key]) for name, key in (("TRL tuned", "trl_tuned"), ("TRL tuned, fp32 weights", "trl_tuned_fp32"),
                                                                ("TRL as shipped", "trl"))
             if key in results]
    # The matmul peak is measured by the driver and after each step of every worker, and varies by ~10% on a
    # shared VM; MFU uses the highest, so no system is flattered by a slow measurement.
    fast = results.get("fast_dtype", "bfloat16")
    driver_peak = results["peak_bf16_gflops"] if fast == "bfloat16" else results["peak_fp32_gflops"]
    peak = max([driver_peak, p["matmul_peak_gflops"]] + [t["matmul_peak_gflops"] for _, t in peers])

    def row(label: str, key: str, fmt: str, ratio=None) -> tuple:
        cells = [format(p[key], fmt)] + [format(t[key], fmt) for _, t in peers]
        ratios = [ratio(p[key], t[key]) for _, t in peers] if ratio else ["" for _ in peers]
        return (label, *cells, *ratios)

    faster = lambda ours, theirs: f"{theirs / ours:.2f}x faster"  # noqa: E731
    times = lambda ours, theirs: f"{theirs / ours:.2f}x"  # noqa: E731
    rate = lambda ours, theirs: f"{ours / theirs:.2f}x"  # noqa: E731
    rows = [
        row("median step time (s)", "step_s", ".2f", faster),
        row("  generation (s)", "gen_s", ".2f", times),
        row("  learner (s)", "learn_s", ".2f", times),
        row("completion tokens / step", "completion_tokens_per_step", ".0f"),
        row("completion tok/s (sampling)", "gen_tok_per_s", ".0f", rate),
        row("learner tok/s", "learner_tok_per_s", ".0f", rate),
        row("learner model GFLOP/s", "learner_gflops", ".0f"),
        (f"learner MFU (highest peak of the run, {peak:.0f} GFLOP/s {fast})", f"{p['learner_gflops'] / peak:.1%}",
         *[f"{t['learner_gflops'] / peak:.1%}" for _, t in peers], *["" for _ in peers]),
        row("learner MFU (peak measured after each step, median)", "learner_mfu_step_peak", ".1%"),
        row("peak RSS (MB)", "peak_rss_mb", ".0f", lambda ours, theirs: f"{ours / theirs:.2f} of TRL's"),
        row("median batch reward", "reward_mean", ".3f"),
    ]
    cuda = results.get("device") == "cuda"
    if cuda:
        rows.insert(-1, row("peak GPU memory allocated (MB)", "peak_gpu_mb", ".0f",
                            lambda ours, theirs: f"{ours / theirs:.2f} of TRL's"))
    names = [n for n, _ in peers]
    lines = ["| figure | posttrain | " + " | ".join(names) + " | " + " | ".join(f"vs {n}" for n in names) + " |",
             "|---|---:|" + "---:|" * len(names) + "---|" * len(names)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    for name, t in peers:
        lines.append(f"{name}: gradient checkpointing {t['gradient_checkpointing']}, {t['learner_dtype']}, "
                     f"{t['attention']} attention.")
    if p.get("skipped_rows_frac"):  # absent from results recorded before the learner skipped rows
        lines.append(f"posttrain's learner skipped {p['skipped_rows_frac']:.0%} of the rows (mean over the measured "
                     f"steps): advantage 0 on every token, a group whose rewards were all equal, whose gradient is "
                     f"exactly 0 (trainer.skip_zero_advantage_rows); TRL runs them. Its MFU counts the rows it ran.")
    lines.append("")
    batch = results.get("prompts", PROMPTS) * results.get("completions", COMPLETIONS)
    if g is None:
        lines.append("Sampling alone (transformers generate vs posttrain's engine): not run in this invocation.")
    else:
        lines.append(f"Sampling alone, same {g.get('dtype', 'bfloat16')} weights, batch {batch}, up to "
                     f"{results['max_new_tokens']} new tokens: transformers generate {g['hf_generate_tok_per_s']:.0f} "
                     f"tok/s ({g['hf_default_attention']} attention, its default), posttrain engine "
                     f"{g['posttrain_tok_per_s']:.0f} tok/s ({g['posttrain_tok_per_s'] / g['hf_generate_tok_per_s']:.2f}x). "
                     f"transformers generate with eager attention (what TRL tuned samples with): "
                     f"{g['hf_generate_eager_tok_per_s']:.0f} tok/s "
                     f"({g['posttrain_tok_per_s'] / g['hf_generate_eager_tok_per_s']:.2f}x).")
    lines.append(f"Allocator for every process (posttrain, TRL, generate): {results['allocator']}; oneDNN primitive "
                 f"cache capacity: {results.get('onednn_cache', 'default')} (importing posttrain sets it, so TRL's "
                 f"worker runs with it too).")
    def span(r: dict) -> str:
        return f"{min(r['step_peaks_gflops']):.0f}-{max(r['step_peaks_gflops']):.0f}"

    spans = "".join(f", of {n}: {span(t)}" for n, t in peers)
    if fast != "bfloat16" and not cuda:
        lines.append("This CPU has no bf16 instructions (bf16 is emulated, slower than fp32): posttrain's auto precision "
                     "and tuned TRL compute in fp32; the MFU rows divide by the fp32 peak.")
    n = results.get("peak_matrix_size", 2048)
    lines.append(f"Matmul peak ({n}x{n}, {'on the GPU' if cuda else 'all threads'}, best of 6), measured by the driver: "
                 f"{results['peak_bf16_gflops']:.0f} GFLOP/s bf16 ({results['peak_fp32_gflops']:.0f} fp32); after each "
                 f"measured step of posttrain: {span(p)}{spans}. The first MFU row divides by the highest "
                 f"of all these; the second divides each step by the peak measured right after it (this VM's speed "
                 f"drifts within minutes) and takes the median.")
    env = results.get("environment")
    if env:
        lines.append("Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + ".")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=5, help="measured steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=PROMPTS, help="prompts per step")
    parser.add_argument("--completions", type=int, default=COMPLETIONS, help="completions per prompt (group size)")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gen-reps", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where both systems train (cuda: benchmarks/gpu_vs_trl.sh; sampling-alone is CPU-only)")
    parser.add_argument("--set", action="append", default=[], help="extra posttrain override (repeatable)")
    parser.add_argument("--only", choices=sorted(WORKERS), action="append", help="run only these parts")
    parser.add_argument("--allocator", choices=["tcmalloc", "system"], default="tcmalloc",
                        help="malloc for all workers (tcmalloc when installed, as the posttrain command uses)")
    parser.add_argument("--json", help="write all figures here")
    parser.add_argument("--table-from", help="print the table of a --json file written earlier, run nothing")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.table_from:
        print(table(json.loads(Path(args.table_from).read_text())))
        return 0
    if args.worker:
        result = WORKERS[args.worker](args)
        Path(args.worker_out).write_text(json.dumps(result))
        return 0

    import torch

    from posttrain.allocator import find_tcmalloc
    from posttrain.bench import matmul_peak_gflops, peak_matrix_size

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("[vs_trl] --device cuda needs a CUDA GPU and torch.cuda.is_available() is False here; "
                         "run it on a GPU machine (benchmarks/gpu_vs_trl.sh) or drop --device")
    if args.device == "cuda" and "generate" in (args.only or []):
        raise SystemExit("[vs_trl] the generate part (sampling alone) is CPU-only; drop --only generate with --device cuda")

    ALLOCATOR["library"] = find_tcmalloc() if args.allocator == "tcmalloc" else None
    argv = ["--model", args.model, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--max-new-tokens", str(args.max_new_tokens), "--lr", str(args.lr), "--seed", str(args.seed),
            "--gen-reps", str(args.gen_reps), "--prompts", str(args.prompts), "--completions", str(args.completions),
            "--device", args.device]
    for s in args.set:
        argv += ["--set", s]
    fast = fast_dtype(args.device)
    results = {
        "device": args.device,
        "peak_matrix_size": peak_matrix_size(args.device),
        "peak_bf16_gflops": matmul_peak_gflops(torch.bfloat16, device=args.device),
        "peak_fp32_gflops": matmul_peak_gflops(torch.float32, device=args.device),
        "max_new_tokens": args.max_new_tokens,
        "prompts": args.prompts, "completions": args.completions, "steps": args.steps, "warmup": args.warmup,
        "allocator": "tcmalloc" if ALLOCATOR["library"] else "system (glibc)",
        "onednn_cache": os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"],
        "fast_dtype": str(fast).removeprefix("torch."),
        "environment": environment(),
    }
    # Without bf16 instructions, "tuned, fp32 weights" is the tuned row itself (see the module docstring).
    # On CUDA, tuned TRL already keeps fp32 weights (see worker_trl), so there is no separate fp32 row.
    default = (["generate", "posttrain", "trl_tuned"] + (["trl_tuned_fp32"] if fast == torch.bfloat16 else []) + ["trl"]
               if args.device == "cpu" else ["posttrain", "trl_tuned", "trl"])
    for name in args.only or default:
        results[name] = run_worker(name, argv)
    if "posttrain" in results and any(k in results for k in ("trl", "trl_tuned", "trl_tuned_fp32")):
        results["table"] = table(results)
        print(results["table"])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
