"""One learner vs 2 data-parallel learners (ddp) vs 2 sharded learners (fsdp2): seconds per step
and per-rank optimizer-state bytes, one run each, in this process (rank 0) and one Ray actor.

    python benchmarks/fsdp2_compare.py                                   # tiny-random, 6 steps
    python benchmarks/fsdp2_compare.py --config examples/arithmetic.yaml --steps 3 model.name=...

Per-rank bytes, measured before the last checkpoint on rank 0 and rank 1 (through the Ray
actor): the optimizer state (AdamW moments and step; the split-master low bits under ddp's bf16
default; local shards under fsdp2) and the policy weights (the fp32 master shard under fsdp2;
the whole reference and rank 0's sampling copy are not counted). The median step time skips
step 1 (warm-up, and the sharding itself under fsdp2). FSDP's own collectives run inside the
forward and backward, so they count as learning, not as ``in collectives``. Needs ``ray``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

TINY = ["model.name=tiny-random", "task.max_operand=20", "rollout.num_prompts=8", "rollout.num_completions=4",
        "rollout.max_new_tokens=16", "trainer.eval_problems=8", "trainer.micro_batch_size=4",
        "trainer.mini_batches=2", "distributed.cpus_per_learner=1"]


def optimizer_bytes(learner) -> int:
    opt = learner.optimizer
    states = opt.state.values() if isinstance(opt.state, dict) else opt.state
    total = 0
    for s in states:
        for v in s.values():
            if isinstance(v, torch.Tensor):
                local = v.to_local() if hasattr(v, "to_local") else v
                total += local.numel() * local.element_size()
    return total + sum(lo.numel() * lo.element_size() for lo in getattr(opt, "lo", []))


def param_bytes(learner) -> int:
    """This rank's policy weights (the fp32 master shard under fsdp2; bf16 under ddp's split masters)."""
    total = 0
    for p in learner.policy.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


def _bytes(learner) -> tuple[int, int]:
    return optimizer_bytes(learner), param_bytes(learner)


def measure(config, overrides: list[str], out: Path) -> dict:
    import ray

    from posttrain.config import load_config
    from posttrain.trainers import rl
    from posttrain.trainers.rl_run import train_rl

    seen: list[tuple[int, int]] = []
    original = rl.RLTrainer.save_checkpoint

    def recording_save(self):
        seen[:] = [_bytes(self.learner)]
        if self.learner_group is not None:
            seen.extend(ray.get([a.__ray_call__.remote(lambda actor: _bytes(actor.learner))
                                 for a in self.learner_group.actors]))
        return original(self)

    rl.RLTrainer.save_checkpoint = recording_save
    try:
        train_rl(load_config(config, overrides), output_dir=str(out), quiet=True)
    finally:
        rl.RLTrainer.save_checkpoint = original
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    later = rows[1:] or rows
    med = {k: statistics.median(r.get(k, 0.0) for r in later)
           for k in ("time/step_s", "time/gen_s", "time/learn_s", "time/sync_s", "time/collective_s")}
    return {**med, "optimizer_bytes": seen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    base = (TINY if args.config is None else []) + args.overrides + [f"trainer.steps={args.steps}"]
    setups = {"1 learner": ["distributed.learners=1"], "2 learners, ddp": ["distributed.learners=2"],
              "2 learners, fsdp2": ["distributed.learners=2", "distributed.strategy=fsdp2"]}
    lines = ["| setup | median step (s) | sampling | learning | weight sync | in collectives | "
             "optimizer state per rank (MB) | weights per rank (MB) |", "|---|---:|---:|---:|---:|---:|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in setups.items():
            m = measure(args.config, base + extra, Path(tmp) / name.replace(" ", "_").replace(",", ""))
            mb = " / ".join(f"{o / 2**20:.2f}" for o, _ in m["optimizer_bytes"])
            wb = " / ".join(f"{w / 2**20:.2f}" for _, w in m["optimizer_bytes"])
            lines.append(f"| {name} | {m['time/step_s']:.2f} | {m['time/gen_s']:.2f} | {m['time/learn_s']:.2f} | "
                         f"{m['time/sync_s']:.3f} | {m['time/collective_s']:.2f} | {mb} | {wb} |")
            print(lines[-1], flush=True)
    ray.shutdown()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
