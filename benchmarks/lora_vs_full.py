"""LoRA vs full fine-tuning RL on the quickstart, in one invocation: peak RSS, step time and held-out
accuracy after the same steps, over several seeds.

Every run is the user's command, ``posttrain rl examples/arithmetic.yaml`` (GRPO on single-digit
arithmetic, SmolLM2-135M-Instruct, 8 prompts x 8 completions, 30 steps), in its own subprocess, so
its peak RSS is its own. The two arms differ only in ``model.lora`` and the learning rate:

* full: the quickstart as shipped (lr 2e-5, fp32 master weights, every weight in AdamW);
* lora: ``model.lora={rank: 16, alpha: 32, dropout: 0}`` on every linear projection (q, k, v, o,
  gate, up, down; posttrain's default targets) and lr 2e-4.

Why these LoRA settings. LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv:2106.09685) adds W x -> W x + (alpha / r) B A x with B = 0 at the start. Adapting every linear
layer, MLP included, is what lets LoRA match full fine-tuning (QLoRA, arXiv:2305.14314; "LoRA Without
Regret", Schulman and Thinking Machines Lab, 2025, a blog post, not on arXiv). Rank 16 is ample for
RL, which carries about one bit per episode (the same post finds even rank 1 matches full
fine-tuning in RL); alpha 32 (scale 2) is the post's fixed alpha. The learning rate: the post
finds LoRA's best learning rate about 10x full fine-tuning's, for supervised and RL alike and
nearly independent of the rank under the alpha / r scaling (up to ~15x for runs under 100 steps),
so 10 x the quickstart's 2e-5 = 2e-4 (``--lora-lr`` to try 3e-4). Tina (catalog 002-70, "Tina:
Tiny Reasoning Models via LoRA", arXiv:2504.15777) is the RL-with-LoRA-on-a-small-model setting
this compares against full fine-tuning.

What is held equal: config, steps, seed (so the same prompts in the same order and the same
initial weights), evaluation (the quickstart's 200 test problems, one sample each at temperature
1, before training and after the last step). ``trainer.checkpoint_every=0`` in both arms (the
quickstart saves every 10 steps; saving is outside the step time and the accuracy, and 6 runs x 3
full checkpoints would take gigabytes); the final checkpoint is deleted once the run's figures are
read unless ``--keep-checkpoints``. Per seed the arms run in alternating order (seed 0: full then
lora, seed 1: lora then full, ...) to spread a shared machine's drift over both.

Per run: median ``time/step_s`` from metrics.jsonl over the steps after ``--warmup`` (and its
generation, learner and weight-sync parts), peak RSS of the whole process (``os.wait4``'s
ru_maxrss, evaluation and loading included; summary.json's figure is kept beside it), held-out
accuracy before and after from eval.jsonl. Per arm: the mean over seeds with a 95% percentile
bootstrap interval over seeds (posttrain.evaluation.stats.stratified_bootstrap_ci); per seed the
paired difference LoRA - full and the ratios LoRA / full (step time, RSS), with the same interval.
With 3 seeds the bootstrap has only 10 distinct resamples: the intervals say how far apart the
seeds were, not a calibrated 95%.

    python benchmarks/lora_vs_full.py                   # 2 arms x 3 seeds x 30 steps, SmolLM2-135M
    python benchmarks/lora_vs_full.py --resume          # after an interruption: skip finished runs
    python benchmarks/lora_vs_full.py --smoke           # tiny random model, 2 steps, 1 seed, seconds

Writes OUT/lora_vs_full.json, .md and .png (``--out-dir``, default benchmarks/results); run
directories and logs under ``--work-dir`` (default bench_out/lora_vs_full).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
CONFIG = ROOT / "examples" / "arithmetic.yaml"
ARMS = ("full", "lora")
# The smoke mode's shape: a tiny random model and a batch small enough for seconds per run.
SMOKE = ["rollout.num_prompts=2", "rollout.num_completions=4", "rollout.max_new_tokens=8",
         "trainer.eval_problems=8", "trainer.eval_every=0"]


def arm_overrides(arm: str, seed: int, args) -> list[str]:
    """The dotted overrides of one run: the arm's LoRA section and lr, the shared seed and steps."""
    common = [f"model.name={args.model}", f"trainer.steps={args.steps}", f"trainer.seed={seed}",
              "trainer.checkpoint_every=0", *args.set]
    if arm == "full":
        return common
    lora = (f"model.lora={{rank: {args.lora_rank}, alpha: {args.lora_alpha}, dropout: 0.0}}")
    return common + [lora, f"trainer.lr={args.lora_lr}"]


def order(seed_index: int) -> tuple[str, ...]:
    """Arm order for the i-th seed: alternating, so drift in the machine's speed hits both arms."""
    return ARMS if seed_index % 2 == 0 else ARMS[::-1]


# ---------------------------------------------------------------------------------- one run
def run_one(arm: str, seed: int, args, run_dir: Path) -> dict:
    """``posttrain rl`` in a subprocess; returns what only the parent can measure (peak RSS, wall)."""
    if run_dir.exists():  # an unfinished run of an earlier invocation: start it over (a resumed
        shutil.rmtree(run_dir)  # process would report only its own peak RSS and step times)
    cmd = [sys.executable, "-m", "posttrain.cli", "rl", str(CONFIG), *arm_overrides(arm, seed, args),
           "--output-dir", str(run_dir)]
    log = run_dir.with_suffix(".log")
    print(f"[lora_vs_full] {arm} seed {seed}: {' '.join(cmd[3:])}", flush=True)
    t = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (ru_maxrss in KiB on Linux)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"[lora_vs_full] {arm} seed {seed} failed (exit {proc.returncode}); log {log}:\n{tail}")
    bench = {"process_peak_rss_mb": usage.ru_maxrss / 1024.0, "process_wall_s": wall, "command": cmd[1:]}
    (run_dir / "bench.json").write_text(json.dumps(bench, indent=2) + "\n")
    print(f"[lora_vs_full] {arm} seed {seed} done in {wall:.0f} s", flush=True)
    return bench


def finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").exists() and (run_dir / "bench.json").exists()


def read_run(run_dir: Path, warmup: int) -> dict:
    """One run's figures from its summary.json, metrics.jsonl, eval.jsonl and bench.json."""
    summary = json.loads((run_dir / "summary.json").read_text())
    bench = json.loads((run_dir / "bench.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines() if line.strip()]
    measured = rows[warmup:] or rows  # a run shorter than the warm-up: every step

    def med(key):
        return statistics.median(r[key] for r in measured) if all(key in r for r in measured) else None

    first, last = min(evals, key=lambda e: e["step"]), max(evals, key=lambda e: e["step"])
    if first["step"] != 0 or last["step"] != summary["steps"]:
        raise ValueError(f"{run_dir}/eval.jsonl lacks the evaluation before (step 0) or after (step "
                         f"{summary['steps']}) training: got steps {[e['step'] for e in evals]}")
    lora = summary.get("lora") or {}
    return {
        "steps": summary["steps"], "steps_measured": len(measured),
        "step_s": med("time/step_s"), "gen_s": med("time/gen_s"), "learn_s": med("time/learn_s"),
        "sync_s": med("time/sync_s"),
        "peak_rss_mb": bench["process_peak_rss_mb"], "summary_peak_rss_mb": summary["peak_rss_mb"],
        "train_wall_s": summary["train_wall_s"], "process_wall_s": bench["process_wall_s"],
        "accuracy_before": first["accuracy"], "accuracy_after": last["accuracy"],
        "accuracy_change": last["accuracy"] - first["accuracy"], "eval_problems": last["n_problems"],
        "reward_mean_last": rows[-1].get("reward/mean"),
        "trainable_params": lora.get("trainable_params"), "sampler": lora.get("sampler"),
    }


# ---------------------------------------------------------------------------------- statistics
def mean_ci(values, reps: int = 2000) -> dict:
    """Mean over seeds with a 95% percentile bootstrap interval over seeds."""
    from posttrain.evaluation.stats import aggregate_mean, stratified_bootstrap_ci

    ci = stratified_bootstrap_ci(np.asarray(values, dtype=np.float64), aggregate_mean, reps=reps, seed=0)
    return {"mean": float(ci.point), "low": float(ci.low), "high": float(ci.high), "n": len(values)}


FIGURES = ("step_s", "gen_s", "learn_s", "sync_s", "peak_rss_mb", "accuracy_before", "accuracy_after",
           "accuracy_change", "train_wall_s")


def aggregate(runs: dict, seeds: list[int]) -> dict:
    """Per arm mean and interval of every figure; paired LoRA - full differences and LoRA / full ratios."""
    out = {"arms": {}, "paired_difference": {}, "ratio": {}}
    for arm in ARMS:
        out["arms"][arm] = {k: mean_ci([runs[arm][s][k] for s in seeds]) for k in FIGURES
                            if all(runs[arm][s][k] is not None for s in seeds)}
    for k in FIGURES:
        if all(runs[a][s][k] is not None for a in ARMS for s in seeds):
            out["paired_difference"][k] = mean_ci([runs["lora"][s][k] - runs["full"][s][k] for s in seeds])
    for k in ("step_s", "gen_s", "learn_s", "peak_rss_mb", "train_wall_s"):
        if all(runs[a][s][k] for a in ARMS for s in seeds):
            out["ratio"][k] = mean_ci([runs["lora"][s][k] / runs["full"][s][k] for s in seeds])
    return out


# ---------------------------------------------------------------------------------- report
def _ci(d: dict, fmt: str) -> str:
    return f"{format(d['mean'], fmt)} [{format(d['low'], fmt)}, {format(d['high'], fmt)}]"


ROWS = (("median step time (s)", "step_s", ".2f"), ("  generation (s)", "gen_s", ".2f"),
        ("  learner (s)", "learn_s", ".2f"), ("  weight sync to the sampler (s)", "sync_s", ".3f"),
        ("peak RSS (MB)", "peak_rss_mb", ".0f"), ("held-out accuracy before", "accuracy_before", ".3f"),
        ("held-out accuracy after", "accuracy_after", ".3f"), ("accuracy change", "accuracy_change", "+.3f"),
        ("training wall-clock (s)", "train_wall_s", ".0f"))


def markdown(results: dict) -> str:
    agg, s = results["aggregate"], results["settings"]
    lines = [f"# LoRA vs full fine-tuning RL on the quickstart ({s['model']}, {s['steps']} steps, "
             f"seeds {', '.join(map(str, s['seeds']))})", "",
             f"`posttrain rl examples/arithmetic.yaml`, each run its own process. full: lr {s['full_lr']:g}. "
             f"lora: rank {s['lora_rank']}, alpha {s['lora_alpha']:g}, every linear projection, lr {s['lora_lr']:g}. "
             f"Extra overrides: {' '.join(s['extra_overrides']) or 'none'}. Mean over seeds [95% bootstrap interval "
             f"over seeds]; step times are medians over steps {s['warmup'] + 1}..{s['steps']} of each run.", "",
             "| figure | full | LoRA | LoRA - full (paired) | LoRA / full |", "|---|---:|---:|---:|---:|"]
    for label, key, fmt in ROWS:
        if key not in agg["arms"]["full"] or key not in agg["arms"]["lora"]:
            continue
        diff = _ci(agg["paired_difference"][key], fmt if fmt.startswith("+") else "+" + fmt)
        ratio = _ci(agg["ratio"][key], ".2f") if key in agg["ratio"] else ""
        lines.append(f"| {label} | {_ci(agg['arms']['full'][key], fmt)} | {_ci(agg['arms']['lora'][key], fmt)} | "
                     f"{diff} | {ratio} |")
    lines += ["", "Per run:", "", "| arm | seed | step (s) | peak RSS (MB) | accuracy before -> after | trainable "
              "params |", "|---|---:|---:|---:|---|---:|"]
    for arm in ARMS:
        for seed in s["seeds"]:
            r = results["runs"][arm][str(seed)]
            lines.append(f"| {arm} | {seed} | {r['step_s']:.2f} | {r['peak_rss_mb']:.0f} | {r['accuracy_before']:.3f} "
                         f"-> {r['accuracy_after']:.3f} | {r['trainable_params'] or 'all'} |")
    n = len(s["seeds"])
    lines += ["", f"Held-out accuracy: {s['eval_problems']} test problems, one sample each at temperature 1. "
              f"With {n} seed{'s' * (n > 1)} the percentile bootstrap has few distinct resamples; the interval shows "
              "the spread of the seeds, not a calibrated 95%. Peak RSS is the whole process's (os.wait4), loading "
              "and evaluation included.",
              "Environment: " + ", ".join(f"{k} {v}" for k, v in results["environment"].items()) + "."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Three panels (step time, peak RSS, accuracy after): per-arm mean with its interval, seeds as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = results["settings"]["seeds"]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3))
    for ax, (label, key) in zip(axes, (("median step time (s)", "step_s"), ("peak RSS (MB)", "peak_rss_mb"),
                                       ("held-out accuracy after", "accuracy_after"))):
        for i, arm in enumerate(ARMS):
            d = results["aggregate"]["arms"][arm][key]
            ax.bar(i, d["mean"], color=("tab:blue", "tab:orange")[i], alpha=0.6)
            ax.errorbar(i, d["mean"], yerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]], color="k", capsize=4)
            ax.scatter([i] * len(seeds), [results["runs"][arm][str(s)][key] for s in seeds], color="k", s=10, zorder=3)
        ax.set_xticks(range(len(ARMS)), ARMS)
        ax.set_title(label, fontsize=9)
    fig.suptitle(f"LoRA vs full RL, {results['settings']['model']}, {results['settings']['steps']} steps", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------- driver
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=30, help="training steps of every run (the quickstart's 30)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the median step time")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-alpha", type=float, default=32.0)
    parser.add_argument("--lora-lr", type=float, default=2e-4, help="10x the quickstart's 2e-5 (see the docstring)")
    parser.add_argument("--set", action="append", default=[], help="extra override for both arms (repeatable)")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, 2 steps, seed 0, small batch")
    parser.add_argument("--resume", action="store_true", help="skip runs whose directory holds finished figures")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each run's final checkpoint")
    parser.add_argument("--work-dir", default=str(ROOT / "bench_out" / "lora_vs_full"))
    parser.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.steps, args.seeds = "tiny-random", 2, [0]
        args.set = SMOKE + args.set
    if args.steps < 1 or not args.seeds or len(set(args.seeds)) != len(args.seeds):
        parser.error("--steps must be >= 1 and --seeds distinct (at least one)")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from posttrain.config import load_config

    from vs_trl import environment

    # Both arms' configs are checked before any run starts (a bad override fails here, not after an hour).
    for arm in ARMS:
        load_config(CONFIG, arm_overrides(arm, args.seeds[0], args))
    full_lr = load_config(CONFIG, arm_overrides("full", args.seeds[0], args)).trainer.lr
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    runs = {arm: {} for arm in ARMS}
    for i, seed in enumerate(args.seeds):
        for arm in order(i):
            run_dir = work / f"{arm}_seed{seed}"
            if args.resume and finished(run_dir):
                print(f"[lora_vs_full] {arm} seed {seed}: finished earlier, read from {run_dir}", flush=True)
            else:
                run_one(arm, seed, args, run_dir)
            runs[arm][seed] = read_run(run_dir, args.warmup)
            if not args.keep_checkpoints and (run_dir / "checkpoints").exists():
                shutil.rmtree(run_dir / "checkpoints")
    results = {
        "settings": {"model": args.model, "steps": args.steps, "seeds": args.seeds, "warmup": args.warmup,
                     "full_lr": full_lr, "lora_lr": args.lora_lr, "lora_rank": args.lora_rank,
                     "lora_alpha": args.lora_alpha, "extra_overrides": args.set,
                     "eval_problems": runs["full"][args.seeds[0]]["eval_problems"],
                     "order": {seed: list(order(i)) for i, seed in enumerate(args.seeds)}},
        "runs": {arm: {str(s): r for s, r in by_seed.items()} for arm, by_seed in runs.items()},
        "aggregate": aggregate(runs, args.seeds),
        "environment": environment(),
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lora_vs_full.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (out / "lora_vs_full.md").write_text(text)
    plot(results, out / "lora_vs_full.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
