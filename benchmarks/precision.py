"""bf16 or fp32 on this CPU: matmul speed and a quickstart step in each, one invocation.

posttrain's ``auto`` precision (``rollout.dtype``, ``trainer.autocast``) computes in bf16 only
where the CPU has bf16 instructions (AVX512_BF16 or AMX, ``rollout.engine.cpu_has_native_bf16``).
A CPU with AVX-512 but neither (Ice Lake, Cascade Lake) still runs bf16 matmuls through oneDNN,
by conversion to fp32, and this script measures what that costs:

    matmuls   GFLOP/s of F.linear in fp32 and bf16 at the decode (64 rows), learner (4096 rows)
              and square (2048^3) shapes of SmolLM2-135M's MLP; best of ``--reps``
    steps     ``posttrain bench`` on ``--config`` (default the quickstart) with the precision
              ``auto`` picks and with the other one (``trainer.autocast`` and ``rollout.dtype``
              named), each in its own process under the same allocator; ``--steps`` measured
              steps after ``--warmup``; the order alternates over ``--rounds``

    python benchmarks/precision.py        # writes benchmarks/results/precision.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from posttrain.allocator import find_tcmalloc, preload_env

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
SHAPES = {"decode (64 x 576 -> 1536)": (64, 576, 1536), "learner (4096 x 576 -> 1536)": (4096, 576, 1536),
          "square (2048^3)": (2048, 2048, 2048)}
OVERRIDES = {"bfloat16": ["trainer.autocast=bfloat16", "rollout.dtype=bfloat16"],
             "float32": ["trainer.autocast=none", "rollout.dtype=float32"]}


def matmul_gflops(rows: int, inner: int, out: int, dtype, reps: int) -> float:
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, inner, generator=g).to(dtype)
    w = torch.randn(out, inner, generator=g).to(dtype)
    F.linear(x, w)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        F.linear(x, w)
        best = min(best, time.perf_counter() - t)
    return 2 * rows * inner * out / best / 1e9


def bench_step(config: str, overrides: list[str], steps: int, warmup: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    cmd = [sys.executable, "-m", "posttrain.cli", "bench", config, *overrides, "--steps", str(steps),
           "--warmup", str(warmup), "--json", out]
    print("[precision] " + " ".join(cmd[3:]), flush=True)
    library = find_tcmalloc()  # the allocator the posttrain command itself would run under
    env = preload_env(dict(os.environ), library) if library else dict(os.environ)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    result = json.loads(Path(out).read_text())
    os.unlink(out)
    return result


def markdown(res: dict) -> str:
    env = res["environment"]
    lines = ["# bf16 or fp32 on this CPU (benchmarks/precision.py)", "",
             f"{env['cpu']}, {env['cpus']} CPUs, {env['torch_threads']} torch threads; bf16 instructions: "
             f"AVX512_BF16 {res['avx512_bf16']}, AMX {res['amx']}. posttrain's auto precision here: "
             f"**{res['auto']}**.", "", "## Matmuls (F.linear, best of %d)" % res["reps"], "",
             "| shape | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 |", "|---|---:|---:|---:|"]
    for name, m in res["matmuls"].items():
        lines.append(f"| {name} | {m['float32']:.0f} | {m['bfloat16']:.0f} | {m['bfloat16'] / m['float32']:.2f} |")
    lines += ["", f"## `posttrain bench {res['config']}` ({res['steps']} measured steps after {res['warmup']} "
              f"warm-up, median; rounds alternate the order)", "",
              "| precision | round | step s | generation s | learner s | gen tok/s | learner tok/s | peak RSS MB |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for run in res["runs"]:
        b = run["bench"]
        lines.append(f"| {run['precision']}{' (auto)' if run['precision'] == res['auto'] else ''} | {run['round']} | "
                     f"{b['step_s']:.2f} | {b['gen_s']:.2f} | {b['learn_s']:.2f} | {b['gen_tok_per_s']:.0f} | "
                     f"{b['learner_tok_per_s']:.0f} | {b['peak_rss_mb']:.0f} |")
    by = {p: [r["bench"]["step_s"] for r in res["runs"] if r["precision"] == p] for p in OVERRIDES}
    best = {p: min(v) for p, v in by.items() if v}
    if len(best) == 2:
        lines += ["", f"Step time, bf16 / fp32 (best round of each): {best['bfloat16'] / best['float32']:.2f}."]
    lines += ["", "Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "examples" / "quickstart.yaml"))
    parser.add_argument("--set", action="append", default=[], help="extra override for both runs (repeatable)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "precision"))
    opts = parser.parse_args(argv)

    import torch

    import vs_trl
    from posttrain.rollout.engine import cpu_computes_bf16

    if not cpu_computes_bf16():
        raise SystemExit("precision.py: this CPU runs no bf16 matmul (oneDNN has no bf16 path here); nothing to compare")
    auto = str(vs_trl.fast_dtype()).removeprefix("torch.")
    res = {"config": os.path.relpath(opts.config, ROOT), "steps": opts.steps, "warmup": opts.warmup, "reps": opts.reps,
           "auto": auto, "avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
           "amx": bool(torch.cpu._is_amx_tile_supported()), "environment": vs_trl.environment(),
           "matmuls": {name: {dt: matmul_gflops(*shape, getattr(torch, dt), opts.reps) for dt in OVERRIDES}
                       for name, shape in SHAPES.items()}, "runs": []}
    order = [auto] + [p for p in OVERRIDES if p != auto]
    for r in range(opts.rounds):
        for precision in (order if r % 2 == 0 else order[::-1]):
            bench = bench_step(opts.config, OVERRIDES[precision] + opts.set, opts.steps, opts.warmup)
            res["runs"].append({"precision": precision, "round": r, "bench": bench})
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out + ".json").write_text(json.dumps(res, indent=2) + "\n")
    Path(opts.out + ".md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
