"""Data selection on a mixture of easy and hard arithmetic: GRPO with no selection vs selectors.

    python benchmarks/selection.py --runs /tmp/selection                 # 5 methods x 3 seeds, then summarise
    python benchmarks/selection.py --runs /tmp/selection --summarise-only
    python benchmarks/selection.py --runs /tmp/selection --methods none sec --seeds 0

Each run is ``posttrain rl examples/selection.yaml trainer.seed=S selection.name=M`` (SmolLM2-135M-
Instruct; one-, two- and three-digit arithmetic in equal shares; 150 held-out problems, 50 per
part; 20 steps of 8 prompts x 8 completions), one after another in seed-major order, so that
anything else slowing the machine spreads over the methods rather than landing on one. A run
whose ``summary.json`` exists is not run again.

Writes benchmarks/results/selection.{md,json,png}: held-out accuracy after training per method
(mean over seeds, with a 95% stratified bootstrap interval over seeds within each part), per
part, and against rollouts generated and training wall-clock (the plot). Refilling selectors
generate more rollouts per step, so "after 20 steps" and "after N samples" differ; both are shown.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIG = ROOT / "examples" / "selection.yaml"
METHODS = ["none", "dynamic_sampling", "online_difficulty", "pods", "sec"]
PARTS = ["one_digit", "two_digit", "three_digit"]


def run(method: str, seed: int, out: Path, overrides: list[str]) -> None:
    if (out / "summary.json").exists():
        return
    if out.exists():  # an interrupted run of this benchmark: start it again
        print(f"removing the unfinished run {out}")
        shutil.rmtree(out)
    sel = [] if method == "none" else [f"selection.name={method}"]
    subprocess.run(["posttrain", "rl", str(CONFIG), f"trainer.seed={seed}", *sel, *overrides,
                    "--output-dir", str(out)], check=True)


def load(out: Path, n: int, prompts: int) -> dict:
    """One run's evaluations with the rollouts generated and training seconds before each."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    samples = np.cumsum([0] + [n * r.get("selection/groups_sampled", prompts) for r in rows])
    seconds = np.cumsum([0.0] + [r["time/step_s"] for r in rows])
    return {
        "steps": [e["step"] for e in evals],
        "accuracy": [e["accuracy"] for e in evals],
        "parts": {p: [e.get(f"accuracy/{p}") for e in evals] for p in PARTS},
        "samples": [int(samples[e["step"]]) for e in evals],
        "train_s": [float(seconds[e["step"]]) for e in evals],
        "zero_std_frac": statistics.mean(r.get("selection/zero_std_frac_sampled", r["groups/zero_std_frac"])
                                         for r in rows),
        "extra_rounds": statistics.mean(r.get("selection/extra_rounds", 0.0) for r in rows),
    }


def interval(matrix: np.ndarray) -> tuple[float, float, float]:
    from posttrain.evaluation.stats import aggregate_mean, stratified_bootstrap_ci

    ci = stratified_bootstrap_ci(matrix, aggregate_mean, reps=5000, seed=0)
    return float(ci.point), float(ci.low), float(ci.high)


def summarise(runs: dict[str, list[dict]], seeds: list[int]) -> tuple[str, dict]:
    base = runs.get("none")
    lines = ["| selection | accuracy after [95% CI] | vs none (paired, mean of seeds) | one digit | two digit | "
             "three digit | rollouts generated | training s | zero-variance groups | extra rounds/step |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    table = {}
    for method, rs in runs.items():
        after = np.array([[r["parts"][p][-1] for p in PARTS] for r in rs])  # [seeds, parts]
        point, low, high = interval(after)
        diff = "" if method == "none" or base is None else \
            f"{statistics.mean(r['accuracy'][-1] - b['accuracy'][-1] for r, b in zip(rs, base)):+.3f}"
        table[method] = {"after": point, "ci": [low, high], "per_seed": [r["accuracy"][-1] for r in rs],
                         "parts": {p: float(after[:, i].mean()) for i, p in enumerate(PARTS)},
                         "samples": statistics.mean(r["samples"][-1] for r in rs),
                         "train_s": statistics.mean(r["train_s"][-1] for r in rs),
                         "zero_std_frac": statistics.mean(r["zero_std_frac"] for r in rs),
                         "extra_rounds": statistics.mean(r["extra_rounds"] for r in rs)}
        t = table[method]
        lines.append(f"| {method} | {point:.3f} [{low:.3f}, {high:.3f}] | {diff} | {t['parts']['one_digit']:.3f} | "
                     f"{t['parts']['two_digit']:.3f} | {t['parts']['three_digit']:.3f} | {t['samples']:.0f} | "
                     f"{t['train_s']:.0f} | {t['zero_std_frac']:.2f} | {t['extra_rounds']:.2f} |")
    before = statistics.mean(r["accuracy"][0] for rs in runs.values() for r in rs)
    lines.append(f"\nBefore training: {before:.3f} (all runs start from the same weights; sampling differs by seed). "
                 f"Seeds {seeds}; per-seed accuracies after training are in selection.json.")
    return "\n".join(lines), table


def plot(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for method, rs in runs.items():
        # the evaluation steps every seed has (runs may differ in eval_every)
        steps = sorted(set.intersection(*(set(r["steps"]) for r in rs)))
        pick = [[r["steps"].index(s) for s in steps] for r in rs]
        acc = np.array([[r["accuracy"][i] for i in idx] for r, idx in zip(rs, pick)])
        for ax, key, label in ((axes[0], "samples", "rollouts generated"), (axes[1], "train_s", "training seconds")):
            x = np.array([[r[key][i] for i in idx] for r, idx in zip(rs, pick)]).mean(0)
            line, = ax.plot(x, acc.mean(0), marker="o", ms=3, label=method)
            ax.fill_between(x, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.12)
            ax.set_xlabel(label)
    axes[0].set_ylabel("held-out accuracy (150 problems)")
    axes[0].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M, 1/2/3-digit arithmetic mixture: mean of seeds, band = min..max", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, required=True)
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--summarise-only", action="store_true")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = ap.parse_args()
    from posttrain.config import load_config

    cfg = load_config(CONFIG, args.overrides)
    if not args.summarise_only:
        for seed in args.seeds:
            for method in args.methods:
                run(method, seed, args.runs / f"{method}-seed{seed}", args.overrides)
    runs = {m: [load(args.runs / f"{m}-seed{s}", cfg.rollout.num_completions, cfg.rollout.num_prompts)
                for s in args.seeds] for m in args.methods}
    text, table = summarise(runs, args.seeds)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "selection.json").write_text(json.dumps({"table": table, "runs": runs}, indent=1))
    plot(runs, RESULTS / "selection.png")
    header = ("# Data selection: GRPO with and without selectors (`python benchmarks/selection.py`)\n\n"
              f"`examples/selection.yaml` {' '.join(args.overrides)}: SmolLM2-135M-Instruct, a mixture of "
              "one-digit (+ - *), two- and three-digit (+ -) arithmetic in equal shares, 8 prompts x 8 completions, "
              f"{cfg.trainer.steps} steps, 150 held-out problems (50 per part) at temperature 1. CI: 95% stratified "
              "bootstrap over seeds within each part (3 seeds make it coarse). Plot: selection.png.\n\n")
    (RESULTS / "selection.md").write_text(header + text + "\n")


if __name__ == "__main__":
    main()
