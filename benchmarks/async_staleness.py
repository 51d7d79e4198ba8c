"""Synchronous vs one-step-stale training with Ray rollout workers, same invocation.

    python benchmarks/async_staleness.py [--steps 20] [--workers 1] [k=v overrides ...]

Runs the quickstart config (examples/arithmetic.yaml, SmolLM2-135M-Instruct) twice with
``distributed.rollout_workers`` workers: ``max_staleness=0`` (sample, then learn) and
``max_staleness=1`` (the workers sample batch t+1 while the learner trains on batch t). Both
runs see the same number of samples. Prints and appends to benchmarks/results/async_staleness.md:
seconds per step, the share of sampling hidden behind learning, staleness, the behaviour /
learner mismatch, and held-out accuracy before and after. Needs `pip install -e '.[ray]'`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def run(k: int, args, out_dir: Path) -> dict:
    from posttrain.config import load_config
    from posttrain.trainers.rl_run import train_rl

    overrides = [f"trainer.steps={args.steps}", "trainer.eval_every=0", "trainer.checkpoint_every=0",
                 f"distributed.rollout_workers={args.workers}", f"distributed.max_staleness={k}", *args.overrides]
    cfg = load_config(Path(__file__).resolve().parents[1] / "examples" / "arithmetic.yaml", overrides)
    t0 = time.perf_counter()
    summary = train_rl(cfg, output_dir=str(out_dir), quiet=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    med = statistics.median
    later = rows[1:]  # the first step of k >= 1 has nothing in flight yet
    return {
        "max_staleness": k, "steps": len(rows), "wall_s": wall,
        "step_s": med(r["time/step_s"] for r in later),
        "wait_for_samples_s": med(r["time/gen_s"] for r in later),
        "learn_s": med(r["time/learn_s"] for r in later),
        "sync_s": med(r["time/sync_s"] for r in later),
        "sampling_hidden_frac": med(r["perf/sampling_hidden_frac"] for r in later),
        "staleness_mean": statistics.mean(r["staleness/mean"] for r in rows),
        "mismatch_kl_k3": med(r["mismatch/kl_k3"] for r in later),
        "accuracy_before": summary["eval_before"]["accuracy"], "accuracy_after": summary["eval_after"]["accuracy"],
        "samples": sum(r["tokens/completion"] > 0 for r in rows) * cfg.rollout.num_prompts * cfg.rollout.num_completions,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in (0, 1):
            results.append(run(k, args, Path(tmp) / f"k{k}"))
            print(json.dumps(results[-1]), flush=True)
    header = ("| max_staleness | s/step (median) | waited for samples (s) | learner (s) | weight push (s) "
              "| sampling hidden | mean staleness | mismatch KL k3 | accuracy before -> after | wall (s) |")
    lines = [header, "|" + "---|" * 10]
    for r in results:
        lines.append(f"| {r['max_staleness']} | {r['step_s']:.2f} | {r['wait_for_samples_s']:.2f} | {r['learn_s']:.2f} "
                     f"| {r['sync_s']:.2f} | {r['sampling_hidden_frac']:.0%} | {r['staleness_mean']:.2f} "
                     f"| {r['mismatch_kl_k3']:.4f} | {r['accuracy_before']:.3f} -> {r['accuracy_after']:.3f} "
                     f"| {r['wall_s']:.0f} |")
    ratio = results[0]["step_s"] / results[1]["step_s"]
    text = (f"\n## {time.strftime('%Y-%m-%d %H:%M')}\n\nSmolLM2-135M-Instruct, examples/arithmetic.yaml, {args.steps} "
            f"steps, {args.workers} Ray rollout worker(s), same samples per run; overrides {args.overrides or 'none'}.\n\n"
            + "\n".join(lines) + f"\n\nOne-step-stale vs synchronous step time: {ratio:.2f}x.\n")
    print(text)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "async_staleness.md"
    if not path.exists():
        path.write_text("# Synchronous vs one-step-stale training (benchmarks/async_staleness.py)\n")
    with open(path, "a") as f:
        f.write(text)
    (RESULTS / "async_staleness.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
