"""Where this CPU's bf16 matmuls leave a thread idle: GFLOP/s of ``F.linear`` over the row count.

The learner's matmuls have a fixed weight shape and a row count that is the step's number of real
tokens, which changes every step. On the AMX host of issue 20 (oneDNN 3.12 in torch 2.13), products
with SmolLM2-135M's 576 output columns ran at one core's speed for 576-1300 rows and at twice that
from ~1350 rows up: 1 and 2 threads timed the same there. This script measures, for each weight shape
of a model (SmolLM2-135M's by default; ``--dims hidden intermediate kv``), ``F.linear(x [M, in], W
[out, in])`` at 1 and at ``--threads`` threads, best of ``--reps``, and marks the row counts where the
extra threads gain less than 20% ("one-thread band"). The weights and inputs are random (speed does not
depend on values).

    python benchmarks/matmul_threads.py --out benchmarks/results/matmul_threads
    python benchmarks/matmul_threads.py --dims 64 128 32 --rows 16 32 --reps 2 --out bench_out/mt  # seconds
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_trl import environment  # noqa: E402

BAND_GAIN = 1.2  # below this, the extra threads bought (almost) nothing


def weight_shapes(hidden: int, intermediate: int, kv: int) -> dict[str, tuple[int, int]]:
    """(out, in) of each decoder matmul the forward runs; the backward's dX has the same (rows, in, out)
    transposed, so the 576-column outputs here are also q/k/v/o/gate/up's input gradients."""
    return {"qkv": (hidden + 2 * kv, hidden), "o_proj": (hidden, hidden), "gate|up": (intermediate, hidden),
            "down": (hidden, intermediate), "k|v": (kv, hidden)}


def gflops(rows: int, out: int, inp: int, threads: int, reps: int) -> float:
    torch.set_num_threads(threads)
    x = torch.randn(rows, inp, dtype=torch.bfloat16)
    w = torch.randn(out, inp, dtype=torch.bfloat16)
    F.linear(x, w)  # oneDNN builds its kernel for the shape on the first call
    best = min(_timed(lambda: F.linear(x, w)) for _ in range(reps))
    return 2 * rows * out * inp / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs=3, default=[576, 1536, 192], metavar=("HIDDEN", "INTERMEDIATE", "KV"))
    ap.add_argument("--rows", type=int, nargs="+", default=list(range(64, 2049, 64)))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results/matmul_threads")
    args = ap.parse_args(argv)
    if args.threads < 2 or any(r < 1 for r in args.rows) or args.reps < 1:
        ap.error("--threads must be >= 2, --rows and --reps >= 1")
    result = {"environment": environment(), "dims": args.dims, "threads": args.threads, "shapes": {}}
    before = torch.get_num_threads()
    try:
        for name, (out, inp) in weight_shapes(*args.dims).items():
            cells = []
            for rows in args.rows:
                one, many = gflops(rows, out, inp, 1, args.reps), gflops(rows, out, inp, args.threads, args.reps)
                cells.append({"rows": rows, "gflops_1": one, "gflops_n": many, "gain": many / one})
            result["shapes"][name] = {"out": out, "in": inp, "cells": cells}
            print(f"[matmul_threads] {name} ({out} x {inp}): " + " ".join(
                f"{c['rows']}:{c['gain']:.2f}" for c in cells), flush=True)
    finally:
        torch.set_num_threads(before)
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(report(result))
    return result


def report(result: dict) -> str:
    env = result["environment"]
    n = result["threads"]
    lines = [f"# bf16 matmul GFLOP/s over rows, 1 vs {n} threads (benchmarks/matmul_threads.py)", "",
             f"F.linear(x [rows, in], W [out, in]), random bf16 values, best of the reps. Gain = {n}-thread / "
             f"1-thread GFLOP/s; **bold**: below {BAND_GAIN} (the extra threads bought almost nothing). "
             "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + ".", ""]
    for name, shape in result["shapes"].items():
        lines += [f"## {name}: out {shape['out']}, in {shape['in']}", "", "| rows | 1 thread | "
                  f"{n} threads | gain |", "|---:|---:|---:|---:|"]
        for c in shape["cells"]:
            gain = f"**{c['gain']:.2f}**" if c["gain"] < BAND_GAIN else f"{c['gain']:.2f}"
            lines.append(f"| {c['rows']} | {c['gflops_1']:.0f} | {c['gflops_n']:.0f} | {gain} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
