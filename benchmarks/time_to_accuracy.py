"""Time to accuracy: posttrain vs TRL's GRPOTrainer (tuned) on the quickstart, over several seeds.

Step time (benchmarks/vs_trl.py) says how fast each system turns the crank; this says how soon each
one gets a model that is good at the task. The quickstart task (examples/arithmetic.yaml: GRPO on
single-digit + - * with SmolLM2-135M-Instruct) is trained by each system, for each seed, in its own
subprocess, saving the policy every ``--eval-every`` steps. Afterwards every saved policy (and the
initial model, shared by both at time 0) is scored by ONE evaluator: posttrain's held-out
evaluation (``trainers.held_out.held_out_accuracy``, what ``posttrain rl`` reports), on the same
``--eval-problems`` problems of the task's test split (never trained on), one sample per problem at
temperature 1, the same sampling seed (training seed + 7919, as the trainer uses) and the same
numeric verifier. Each point is (training time so far, held-out accuracy); the report gives the
curves, the time at which each system first reaches each ``--targets`` accuracy, and 95% percentile
bootstrap intervals across seeds (posttrain.evaluation.stats).

    python benchmarks/time_to_accuracy.py                    # 3 seeds x 30 steps x 2 systems (about an hour)
    python benchmarks/time_to_accuracy.py --resume           # continue an interrupted invocation
    python benchmarks/time_to_accuracy.py --smoke --out-dir /tmp/tta   # tiny random model, seconds

Held equal (both systems, per seed): the model and its initial weights; the prompts and their order
(TRL's dataset is posttrain's sampler order for the seed, as in vs_trl.py); 8 prompts x 8 completions
per step, up to 32 new tokens (the quickstart's), temperature 1, top-p 1, no top-k; the reward (the
quickstart's composite: numeric + 0.2 x format); the loss (token-mean GRPO with group-std advantages,
PPO clip 0.2, one epoch, one optimizer step per batch, no KL); AdamW at lr 2e-5, constant, betas
(0.9, 0.99) (posttrain's default; TRL's own beta2 is 0.999, so TRL is given 0.99), gradient clipping
at 1.0; the number of steps; the machine, threads and allocator (tcmalloc for every process when
installed, as vs_trl.py); and the evaluation, which is why it runs on saved checkpoints rather than
inside either trainer.

Differs, on purpose:
* TRL runs as vs_trl.py's "TRL tuned" (its worker is reused): gradient checkpointing off, weights in
  bf16, eager attention. Its update is therefore pure bf16 AdamW, where posttrain keeps fp32 master
  weights: cheaper per step and less precise, a choice that favours TRL's speed and may cost it
  accuracy per step, which is exactly what time-to-accuracy weighs. Measured, it costs all of it: at
  lr 2e-5 most bf16 updates round away (results/time_to_accuracy.md), so the fair learning peer is
  ``--trl tuned_fp32``, the same tuning with the weights left in fp32 under TRL's bf16 autocast (an
  fp32 AdamW update, like posttrain's); ``--trl shipped`` runs TRL with its defaults (fp32 weights, bf16 autocast, gradient
  checkpointing, sdpa); ``--trl both`` runs tuned and shipped, ``--trl all`` the three.
* No learning-rate warm-up, where the quickstart has 2 steps: HF's warm-up gives the first step a
  learning rate of 0 and posttrain's gives it half, so the only schedule both run alike is none.
* Training time is the sum of each system's own step times (sampling, scoring, update and weight
  sync; for TRL from ``on_step_begin`` to ``on_step_end``, as vs_trl.py measures it). Model loading,
  checkpoint writing (posttrain writes full resumable checkpoints, TRL only the weights), logging and
  the evaluations are counted for neither. Each worker's whole wall time is recorded next to it.
* posttrain's saved fp32 masters are rounded to bf16 for the evaluation by the evaluator's engine,
  which may differ at exact ties from the split master weights its trainer samples with (see
  results/quickstart.md); TRL's bf16 weights load unchanged. The same evaluator treats both alike.

Time to a target is the training time of the first evaluated checkpoint whose accuracy reaches it:
it is resolved only to ``--eval-every`` steps (an upper bound on the exact crossing), and a seed
that never reaches it within ``--steps`` has none (the mean and its interval are then left out and
the count of seeds that got there is shown). One 200-problem evaluation has a standard error of
about 0.03, so one lucky evaluation can cross a target early; the seeds' spread shows how much.

Writes OUT/time_to_accuracy.json, .md and .png (accuracy vs training time, one line per system per
seed), rewritten after every run; checkpoints go to --work-dir and are deleted once evaluated.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))  # vs_trl.py is a script next to this one, not a package
import vs_trl  # noqa: E402

STEM = "time_to_accuracy"
LABELS = {"posttrain": "posttrain", "trl_tuned": "TRL tuned", "trl_tuned_fp32": "TRL tuned, fp32 weights",
          "trl": "TRL as shipped"}
COLORS = {"posttrain": "tab:blue", "trl_tuned": "tab:red", "trl_tuned_fp32": "tab:purple", "trl": "tab:orange"}
TRL_ROWS = {"tuned": ["trl_tuned"], "tuned_fp32": ["trl_tuned_fp32"], "shipped": ["trl"],
            "both": ["trl_tuned", "trl"], "all": ["trl_tuned", "trl_tuned_fp32", "trl"]}
# What each result depends on: a --resume with other values would mix incomparable runs.
SETTING_KEYS = ("model", "steps", "eval_every", "eval_problems", "prompts", "completions", "max_new_tokens", "lr")
SMOKE = dict(model="tiny-random", steps=2, eval_every=1, eval_problems=8, prompts=2, completions=2,
             max_new_tokens=8, seeds=[0, 1], targets=[0.0, 0.5])


def settings(opts) -> dict:
    return {k: getattr(opts, k) for k in SETTING_KEYS}


def posttrain_config(s: dict, seed: int, extra: list[str] = ()):
    """The quickstart config with vs_trl.py's matched settings (its ``base_overrides``) for ``s``."""
    from posttrain.config import load_config

    args = Namespace(model=s["model"], prompts=s["prompts"], completions=s["completions"],
                     max_new_tokens=s["max_new_tokens"], lr=s["lr"], seed=seed, device="cpu")
    return load_config(ROOT / "examples" / "arithmetic.yaml",
                       vs_trl.base_overrides(args) + [f"trainer.steps={s['steps']}", *extra])


def checkpoint_steps(s: dict) -> list[int]:
    """Steps evaluated after 0: every eval_every, and the last."""
    return sorted({*range(s["eval_every"], s["steps"] + 1, s["eval_every"]), s["steps"]})


# ---------------------------------------------------------------------------------- workers
def worker_posttrain(s: dict, seed: int, work: Path) -> dict:
    """``posttrain rl`` (train_rl) with a checkpoint at every evaluated step. Its own held-out
    evaluation is cut to one problem: the benchmark evaluates the checkpoints itself."""
    from posttrain.trainers.rl_run import train_rl

    cfg = posttrain_config(s, seed, ["trainer.eval_every=0", f"trainer.checkpoint_every={s['eval_every']}",
                                     f"trainer.keep_checkpoints={len(checkpoint_steps(s)) + 1}",
                                     "trainer.eval_problems=1"])
    summary = train_rl(cfg, output_dir=str(work / "run"), quiet=True)
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [{"step": r["step"], "step_s": r["time/step_s"], "gen_s": r["time/gen_s"],
              "learn_s": r["time/learn_s"] + r["time/sync_s"], "completion_tokens": r["tokens/completion"]}
             for r in rows]
    ckpts = {int(p.name.split("_")[1]): str(p) for p in (work / "run" / "checkpoints").glob("step_*")
             if p.name.split("_")[1].isdigit()}
    return {"steps": steps, "checkpoints": ckpts, "peak_rss_mb": summary["peak_rss_mb"],
            "train_wall_s_with_checkpoints": summary["train_wall_s"],
            "reward_mean": sum(r["reward/mean"] for r in rows) / len(rows)}


def worker_trl(s: dict, seed: int, work: Path, system: str) -> dict:
    """vs_trl.py's TRL worker for ``system`` (a TRL key of LABELS), saving the weights every eval_every steps."""
    args = Namespace(model=s["model"], prompts=s["prompts"], completions=s["completions"],
                     max_new_tokens=s["max_new_tokens"], lr=s["lr"], seed=seed, set=[], steps=s["steps"], warmup=0,
                     device="cpu")
    rows: list[dict] = []
    out = work / "trl"
    figures = vs_trl.worker_trl(args, tuned=system != "trl", bf16_weights=system == "trl_tuned",
                                on_step=rows.append, config_overrides={
        "output_dir": str(out), "save_strategy": "steps", "save_steps": s["eval_every"], "save_only_model": True,
        "adam_beta2": 0.99})  # posttrain's AdamW betas are (0.9, 0.99): the same optimizer for both
    steps = [{"step": i + 1, "step_s": r["step_s"], "gen_s": r["gen_s"], "learn_s": r["learn_s"],
              "completion_tokens": r["completion_tokens"]} for i, r in enumerate(rows)]
    ckpts = {int(p.name.split("-")[1]): str(p) for p in out.glob("checkpoint-*") if p.name.split("-")[1].isdigit()}
    return {"steps": steps, "checkpoints": ckpts, "peak_rss_mb": figures["peak_rss_mb"],
            "reward_mean": figures["reward_mean"], "attention": figures["attention"],
            "learner_dtype": figures["learner_dtype"], "gradient_checkpointing": figures["gradient_checkpointing"]}


def run_worker(spec: dict) -> dict:
    """Train one (system, seed) in a subprocess of its own, under the allocator every process uses."""
    from posttrain.allocator import find_tcmalloc, preload_env

    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        library = find_tcmalloc() if spec["allocator"] == "tcmalloc" else None  # the driver's choice
        if library:
            env = preload_env(env, library)
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--worker-spec", str(spec_path), "--worker-out", str(out)],
                              env=env)
        if proc.returncode != 0:
            raise SystemExit(f"[{STEM}] {spec['system']} seed {spec['seed']} failed with exit code {proc.returncode}")
        result = json.loads(out.read_text())
        result["worker_wall_s"] = time.perf_counter() - t  # whole process: imports, loading, saving included
        return result


# ---------------------------------------------------------------------------------- evaluation
def evaluate(model: str, s: dict, seed: int) -> dict:
    """posttrain's held-out evaluation of ``model`` (a name or a checkpoint directory): the test
    split's first eval_problems, one sample each at the quickstart's eval temperature, seed + 7919."""
    import torch

    from posttrain.models.loading import load_model_and_tokenizer
    from posttrain.rewards.registry import build_reward
    from posttrain.rollout.engine import HFRolloutEngine, SamplingParams, resolve_dtype
    from posttrain.tasks.registry import build_task
    from posttrain.trainers.held_out import held_out_accuracy

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per checkpoint says nothing
    cfg = posttrain_config(s, seed)
    device = torch.device("cpu")
    policy, tokenizer = load_model_and_tokenizer(model)
    engine = HFRolloutEngine(policy, tokenizer, dtype=resolve_dtype(cfg.rollout.dtype, device),
                             chat_template=cfg.rollout.chat_template)
    params = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.trainer.eval_temperature,
                            top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, stop=tuple(cfg.rollout.stop))
    problems = list(build_task(cfg.task).problems("test"))[:s["eval_problems"]]
    result = held_out_accuracy(engine, problems, build_reward(cfg.reward, tokenizer=tokenizer), params,
                               seed + 7919, device, cfg.trainer.on_reward_error)
    return {"accuracy": result.accuracy, "mean_length": result.mean_length, "n_problems": result.n_problems}


def curve(s: dict, base: dict, trained: dict, evals: dict[int, dict]) -> list[dict]:
    """(step, samples, completion tokens, training time, accuracy) at 0 and every evaluated step."""
    points = [{"step": 0, "samples": 0, "completion_tokens": 0, "time_s": 0.0, "accuracy": base["accuracy"]}]
    elapsed, tokens = 0.0, 0.0
    by_step = {r["step"]: r for r in trained["steps"]}
    for step in range(1, s["steps"] + 1):
        elapsed += by_step[step]["step_s"]
        tokens += by_step[step]["completion_tokens"]
        if step in evals:
            points.append({"step": step, "samples": step * s["prompts"] * s["completions"],
                           "completion_tokens": int(tokens), "time_s": elapsed, "accuracy": evals[step]["accuracy"]})
    return points


# ---------------------------------------------------------------------------------- summary
def first_reach(points: list[dict], target: float) -> dict | None:
    """The first point whose accuracy reaches ``target`` (None if none does)."""
    return next((p for p in points if p["accuracy"] >= target), None)


def mean_ci(values: list[float], reps: int = 2000) -> dict:
    """Mean over seeds with a 95% percentile bootstrap interval (seeds resampled)."""
    from posttrain.evaluation.stats import aggregate_mean, stratified_bootstrap_ci

    ci = stratified_bootstrap_ci(values, aggregate_mean, reps=reps, seed=0)
    return {"mean": ci.point, "low": ci.low, "high": ci.high}


def summarize(results: dict, targets: list[float]) -> dict:
    """Per system: the curve (mean time and accuracy per evaluated step, with intervals) and the time
    to each target; per target, the ratio of each TRL row's mean time to posttrain's."""
    from posttrain.evaluation.stats import stratified_bootstrap_ci

    runs: dict[str, dict[int, list[dict]]] = {}
    for run in results["runs"].values():
        if run.get("status") == "done":
            runs.setdefault(run["system"], {})[run["seed"]] = run["points"]
    out: dict = {"systems": {}, "ratios": {}}
    for system, by_seed in runs.items():
        seeds = sorted(by_seed)
        steps = [p["step"] for p in by_seed[seeds[0]]]
        points = []
        for i, step in enumerate(steps):
            times = [by_seed[k][i]["time_s"] for k in seeds]
            accs = [by_seed[k][i]["accuracy"] for k in seeds]
            points.append({"step": step, "samples": by_seed[seeds[0]][i]["samples"], "time_s": mean_ci(times),
                           "accuracy": mean_ci(accs), "accuracy_per_seed": accs})
        reach = {}
        for target in targets:
            hits = [first_reach(by_seed[k], target) for k in seeds]
            row = {"seeds": seeds, "time_s_per_seed": [h and h["time_s"] for h in hits],
                   "step_per_seed": [h and h["step"] for h in hits],
                   "samples_per_seed": [h and h["samples"] for h in hits], "reached": sum(h is not None for h in hits)}
            if row["reached"] == len(seeds):
                row["time_s"] = mean_ci(row["time_s_per_seed"])
            reach[str(target)] = row
        out["systems"][system] = {"seeds": seeds, "points": points, "time_to_target": reach}
    base = out["systems"].get("posttrain")
    for system, data in out["systems"].items():
        if system == "posttrain" or base is None:
            continue
        for target in map(str, targets):
            ours, theirs = base["time_to_target"][target], data["time_to_target"][target]
            if "time_s" not in ours or "time_s" not in theirs or ours["time_s"]["mean"] <= 0 \
                    or len(ours["seeds"]) != len(theirs["seeds"]):
                continue
            # each system's seeds resampled on their own (the columns of the matrix)
            m = [[a, b] for a, b in zip(ours["time_s_per_seed"], theirs["time_s_per_seed"])]
            ci = stratified_bootstrap_ci(m, lambda x: x[:, 1].mean() / max(x[:, 0].mean(), 1e-12), seed=0)
            out["ratios"].setdefault(system, {})[target] = {"mean": ci.point, "low": ci.low, "high": ci.high}
    return out


def fmt(ci: dict, spec: str) -> str:
    return f"{ci['mean']:{spec}} [{ci['low']:{spec}}, {ci['high']:{spec}}]"


def markdown(results: dict) -> str:
    s, summ, env = results["settings"], results["summary"], results["environment"]
    lines = [f"# Time to accuracy: posttrain vs TRL GRPOTrainer (benchmarks/{STEM}.py)", "",
             f"{s['model']}, quickstart task, {s['prompts']} prompts x {s['completions']} completions per step, up to "
             f"{s['max_new_tokens']} new tokens, lr {s['lr']}, {s['steps']} steps, seeds "
             f"{', '.join(map(str, results['seeds']))}. Held-out accuracy: posttrain's evaluator on the same "
             f"{s['eval_problems']} test problems for both, one sample each at temperature 1, every "
             f"{s['eval_every']} steps. Training time = the sum of the system's step times (no loading, "
             "checkpointing or evaluation). Means over seeds, 95% bootstrap intervals in brackets; the script's "
             "docstring says what is held equal and what differs.", ""]
    for system, data in summ["systems"].items():
        lines += [f"## {LABELS[system]} (seeds {', '.join(map(str, data['seeds']))})", "",
                  "| step | samples | training time (s) | held-out accuracy | per seed |", "|---:|---:|---:|---:|---|"]
        for p in data["points"]:
            lines.append(f"| {p['step']} | {p['samples']} | {fmt(p['time_s'], '.1f')} | {fmt(p['accuracy'], '.3f')} | "
                         + ", ".join(f"{a:.3f}" for a in p["accuracy_per_seed"]) + " |")
        lines.append("")
    systems = list(summ["systems"])
    if systems:
        lines += ["## Time to first reach a target accuracy (s of training)", "",
                  "| target | " + " | ".join(LABELS[k] for k in systems) + " | "
                  + " | ".join(f"{LABELS[k]} / posttrain" for k in systems if k != "posttrain") + " |",
                  "|---:|" + "---|" * (len(systems) + len([k for k in systems if k != "posttrain"]))]
        for target in map(str, results["targets"]):
            cells = []
            for k in systems:
                r = summ["systems"][k]["time_to_target"][target]
                steps = ", ".join("-" if x is None else str(x) for x in r["step_per_seed"])
                head = fmt(r["time_s"], ".1f") if "time_s" in r else \
                    f"reached by {r['reached']}/{len(r['seeds'])} seeds"
                cells.append(f"{head} (steps {steps})")
            ratios = [fmt(summ["ratios"][k][target], ".2f") + "x" if target in summ["ratios"].get(k, {}) else "n/a"
                      for k in systems if k != "posttrain"]
            lines.append(f"| {target} | " + " | ".join(cells + ratios) + " |")
        lines += ["", "Time to a target is the training time at the first evaluated checkpoint at or above it, so it "
                  f"is resolved to {s['eval_every']} steps; a ratio needs every seed of both systems to get there."]
    lines += ["", "Runs:"]
    for key, run in sorted(results["runs"].items()):
        if run.get("status") == "done":
            how = f"; gradient checkpointing {run['gradient_checkpointing']}, {run['learner_dtype']}, " \
                  f"{run['attention']} attention" if "attention" in run else ""
            lines.append(f"- {key}: median step {statistics.median(x['step_s'] for x in run['steps']):.2f} s, "
                         f"worker wall {run['worker_wall_s']:.0f} s in all, peak RSS {run['peak_rss_mb']:.0f} MB, "
                         f"mean batch reward {run['reward_mean']:.3f}{how}")
    lines += ["", f"Allocator: {results['allocator']}.",
              "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + "."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    markers = "osD^v<>"
    for key, run in sorted(results["runs"].items()):
        if run.get("status") != "done":
            continue
        pts = run["points"]
        ax.plot([p["time_s"] for p in pts], [p["accuracy"] for p in pts], color=COLORS[run["system"]],
                marker=markers[results["seeds"].index(run["seed"]) % len(markers)], alpha=0.8,
                linestyle=("-", "--", ":", "-.")[results["seeds"].index(run["seed"]) % 4],
                label=f"{LABELS[run['system']]}, seed {run['seed']}")
    for target in results["targets"]:
        ax.axhline(target, color="grey", linestyle=":", linewidth=1)
    s = results["settings"]
    ax.set(xlabel="training time (s, sum of step times)", ylabel=f"held-out accuracy ({s['eval_problems']} problems)",
           title=f"Time to accuracy, {s['model']}, quickstart ({results['environment']['cpus']} CPUs)",
           ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(results: dict, out_dir: Path) -> None:
    results["summary"] = summarize(results, results["targets"])
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f"{STEM}.json.tmp"
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, out_dir / f"{STEM}.json")  # a kill mid-write leaves the previous file for --resume
    (out_dir / f"{STEM}.md").write_text(markdown(results))
    plot(results, out_dir / f"{STEM}.png")


# ---------------------------------------------------------------------------------- driver
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--steps", type=int, default=30, help="training steps per run (the quickstart's 30)")
    p.add_argument("--eval-every", type=int, default=5, help="save and evaluate every this many steps")
    p.add_argument("--eval-problems", type=int, default=200, help="held-out problems (the quickstart's 200)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--completions", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.7], help="accuracies to time")
    p.add_argument("--trl", choices=sorted(TRL_ROWS), default="tuned", help="which TRL rows to run")
    p.add_argument("--allocator", choices=["tcmalloc", "system"], default="tcmalloc")
    p.add_argument("--out-dir", default=str(BENCH / "results"))
    p.add_argument("--work-dir", default=str(ROOT / "bench_out" / STEM), help="checkpoints (deleted once evaluated)")
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument("--resume", action="store_true", help="keep the finished runs of OUT/time_to_accuracy.json")
    p.add_argument("--smoke", action="store_true", help="tiny random model, 2 steps, 2 seeds (a test)")
    p.add_argument("--worker-spec", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    if opts.smoke:
        for k, v in SMOKE.items():
            setattr(opts, k, v)
    for name in ("steps", "eval_every", "eval_problems", "prompts", "completions", "max_new_tokens"):
        if getattr(opts, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if opts.completions < 2:
        p.error("--completions must be >= 2: GRPO's group-std advantages need a group")
    if not all(0.0 <= t <= 1.0 for t in opts.targets):
        p.error("--targets are accuracies: each must lie in [0, 1]")
    if opts.steps % opts.eval_every:
        p.error(f"--steps ({opts.steps}) must be a multiple of --eval-every ({opts.eval_every}), so that both "
                "systems save their last step on the same schedule")
    if len(set(opts.seeds)) != len(opts.seeds):
        p.error("--seeds must be distinct")
    return opts


def main(argv=None) -> int:
    opts = parse_args(argv)
    if opts.worker_spec:
        spec = json.loads(Path(opts.worker_spec).read_text())
        s, seed, work = spec["settings"], spec["seed"], Path(spec["work"])
        result = worker_posttrain(s, seed, work) if spec["system"] == "posttrain" else \
            worker_trl(s, seed, work, spec["system"])
        Path(opts.worker_out).write_text(json.dumps(result))
        return 0

    from posttrain.allocator import find_tcmalloc

    out_dir, s = Path(opts.out_dir), settings(opts)
    systems = ["posttrain"] + TRL_ROWS[opts.trl]
    previous = out_dir / f"{STEM}.json"
    results = {"settings": s, "runs": {}, "base": {}, "invocations": []}
    if opts.resume and previous.exists():
        results = json.loads(previous.read_text())
        differ = {k: (results["settings"].get(k), v) for k, v in s.items() if results["settings"].get(k) != v}
        if differ:
            raise SystemExit(f"[{STEM}] --resume: {previous} was run with other settings "
                             f"({', '.join(f'{k}: {a} there, {b} now' for k, (a, b) in differ.items())}); "
                             "rerun with those settings, or without --resume to start over")
    allocator = "tcmalloc" if opts.allocator == "tcmalloc" and find_tcmalloc() else "system (glibc)"
    results.update(seeds=sorted(set(results.get("seeds", [])) | set(opts.seeds)), targets=opts.targets,
                   allocator=allocator, environment=vs_trl.environment())
    results["invocations"].append({"date": time.strftime("%Y-%m-%d %H:%M %Z"), "argv": sys.argv[1:]})
    todo = [(system, seed) for seed in opts.seeds for system in systems
            if results["runs"].get(f"{system}/seed{seed}", {}).get("status") != "done"]
    print(f"[{STEM}] {len(todo)} runs to do, {len(systems) * len(opts.seeds) - len(todo)} already finished", flush=True)
    write(results, out_dir)
    for system, seed in todo:
        key, work = f"{system}/seed{seed}", Path(opts.work_dir) / f"{system}_seed{seed}"
        if str(seed) not in results["base"]:  # the initial model: time 0 of every system with this seed
            results["base"][str(seed)] = evaluate(s["model"], s, seed)
        if work.exists():
            shutil.rmtree(work)  # left by an interrupted run, which starts over
        work.mkdir(parents=True)
        print(f"[{STEM}] training {key} ...", flush=True)
        trained = run_worker({"system": system, "seed": seed, "work": str(work), "settings": s,
                              "allocator": allocator})
        missing = [k for k in checkpoint_steps(s) if k not in {int(x) for x in trained["checkpoints"]}]
        if missing:
            raise SystemExit(f"[{STEM}] {key} saved no checkpoint at steps {missing}")
        evals = {}
        for step in checkpoint_steps(s):
            evals[step] = evaluate(trained["checkpoints"][str(step)], s, seed)
            print(f"[{STEM}] {key} step {step}: held-out accuracy {evals[step]['accuracy']:.3f}", flush=True)
        results["runs"][key] = {"system": system, "seed": seed, "status": "done",
                                "points": curve(s, results["base"][str(seed)], trained, evals),
                                **{k: v for k, v in trained.items() if k != "checkpoints"}}
        if not opts.keep_checkpoints:
            shutil.rmtree(work)
        write(results, out_dir)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
