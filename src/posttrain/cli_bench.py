"""``posttrain bench CONFIG [overrides]``: throughput, MFU and memory of a configured run."""

from __future__ import annotations

import json
from pathlib import Path


def _bench(args) -> int:
    from posttrain.bench import bench_config, print_bench
    from posttrain.config import load_config

    if args.steps < 1 or args.warmup < 0:
        raise ValueError("--steps must be >= 1 and --warmup >= 0")
    cfg = load_config(args.config, args.overrides)
    result = bench_config(cfg, steps=args.steps, warmup=args.warmup)
    print_bench(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("bench", help="generation / learner throughput, MFU and peak memory of a configured run")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=3, help="measured steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", help="also write the figures to this file")
    p.set_defaults(func=_bench)
