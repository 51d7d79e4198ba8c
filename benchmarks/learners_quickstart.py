"""The quickstart with data-parallel learners (``distributed.learners=M``), 3 seeds, summarised.

    python benchmarks/learners_quickstart.py --learners 2 --runs /tmp/lq      # runs and summarises
    python benchmarks/learners_quickstart.py --learners 2 --runs /tmp/lq --summarise-only

Runs ``posttrain rl examples/arithmetic.yaml trainer.seed=S distributed.learners=M`` one after
another (CPU measurements must not overlap) and prints a markdown table: held-out accuracy
before / at steps 10, 20 / after, median seconds per step, sampling, learning and the part of
learning spent in collectives. Needs the ``ray`` extra.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
from pathlib import Path


def run(learners: int, seed: int, out: Path) -> None:
    subprocess.run(["posttrain", "rl", "examples/arithmetic.yaml", f"trainer.seed={seed}",
                    f"distributed.learners={learners}", "--output-dir", str(out)], check=True)


def summarise(learners: int, runs: list[Path]) -> str:
    lines = ["| run | before | step 10 | step 20 | after | median step (s) | sampling | learning | in collectives |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    after = []
    for path in runs:
        evals = {r["step"]: r["accuracy"] for r in map(json.loads, (path / "eval.jsonl").read_text().splitlines())}
        rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
        med = {k: statistics.median(r.get(k, 0.0) for r in rows)
               for k in ("time/step_s", "time/gen_s", "time/learn_s", "time/collective_s")}
        last = max(evals)
        after.append(evals[last])
        lines.append(f"| {path.name} | {evals[0]:.3f} | {evals.get(10, float('nan')):.3f} | "
                     f"{evals.get(20, float('nan')):.3f} | {evals[last]:.3f} | {med['time/step_s']:.2f} | "
                     f"{med['time/gen_s']:.2f} | {med['time/learn_s']:.2f} | {med['time/collective_s']:.2f} |")
    sd = statistics.stdev(after) if len(after) > 1 else 0.0
    lines.append(f"\n{learners} learners, accuracy after: mean {statistics.mean(after):.3f}, sd {sd:.3f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--learners", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", type=Path, required=True)
    ap.add_argument("--summarise-only", action="store_true")
    args = ap.parse_args()
    paths = [args.runs / f"learners{args.learners}-seed{s}" for s in args.seeds]
    if not args.summarise_only:
        for seed, path in zip(args.seeds, paths):
            run(args.learners, seed, path)
    print(summarise(args.learners, paths))


if __name__ == "__main__":
    main()
