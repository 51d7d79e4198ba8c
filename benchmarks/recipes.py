"""Compare the recipes in examples/recipes on the quickstart task, with the same steps and seed.

For each recipe: train with ``train_rl`` (held-out accuracy before/after comes from the run's
summary: one sample per problem at ``trainer.eval_temperature``), then evaluate the final
checkpoint with pass@k: ``--n`` samples per held-out problem at temperature 1, each judged by the
recipe's reward's correctness flag (the ``correct`` component, e.g. ``numeric/correct`` inside a
composite; never ``reward > 0``, which a format bonus alone can reach). The base model gets the same
pass@k evaluation as a reference row (skip it with ``--no-base``).

    python benchmarks/recipes.py                                   # 7 recipes, 20 steps, SmolLM2
    python benchmarks/recipes.py --recipes all --steps 60
    python benchmarks/recipes.py --model tiny-random --steps 2 --eval-problems 8 --n 4   # smoke test

Writes ``<out>/recipes.md`` (the table) and ``<out>/recipes.json`` (everything), and keeps each
run directory under ``<out>/runs/<recipe>`` (replaced when the benchmark is re-run).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
RECIPES_DIR = REPO / "examples" / "recipes"
DEFAULT_RECIPES = "grpo,dr_grpo,dapo,gspo,rloo,w_reinforce,minirl"
TINY_MODEL = "tiny-random"
PASS_KS = (1, 8)
SAMPLES_PER_CHUNK = 64  # completions generated per engine call during pass@k evaluation
EVAL_SEED_OFFSET = 104729  # pass@k sampling seed = --seed + this (fixed across recipes)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", default=DEFAULT_RECIPES,
                   help=f"comma-separated recipe names (files in --recipes-dir), or 'all' (default: {DEFAULT_RECIPES})")
    p.add_argument("--recipes-dir", default=str(RECIPES_DIR), help="folder holding the recipe YAML files")
    p.add_argument("--steps", type=int, default=20, help="training steps per recipe (default: 20)")
    p.add_argument("--seed", type=int, default=0, help="trainer.seed for every recipe (default: 0)")
    p.add_argument("--model", default=None, help="model.name override (default: each recipe's own, SmolLM2)")
    p.add_argument("--eval-problems", type=int, default=200, help="held-out problems (default: 200)")
    p.add_argument("--n", type=int, default=8, help="samples per problem for pass@k (default: 8)")
    p.add_argument("--out", default="bench_out/recipes", help="output folder (default: bench_out/recipes)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: torch's default, or 1 with --model tiny-random, whose tiny tensors "
                        "only lose time to thread synchronisation)")
    p.add_argument("--no-base", action="store_true", help="skip the pass@k evaluation of the untrained model")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every recipe (repeatable), e.g. --set trainer.lr=1e-5")
    args = p.parse_args(argv)
    if args.steps < 1 or args.eval_problems < 1 or args.n < 1:
        p.error("--steps, --eval-problems and --n must be >= 1")
    if args.threads < 0:
        p.error("--threads must be >= 0")
    if args.threads == 0 and args.model == TINY_MODEL:
        args.threads = 1
    return args


def recipe_paths(spec: str, folder: Path) -> list[Path]:
    available = {p.stem: p for p in sorted(folder.glob("*.yaml"))}
    if not available:
        raise SystemExit(f"no recipes (*.yaml) in {folder}")
    if spec.strip() == "all":
        return list(available.values())
    names = [n.strip() for n in spec.split(",") if n.strip()]
    missing = [n for n in names if n not in available]
    if missing:
        raise SystemExit(f"unknown recipe(s) {missing}; available: {', '.join(available)}")
    return [available[n] for n in names]


def overrides_for(args: argparse.Namespace) -> list[str]:
    out = [f"trainer.steps={args.steps}", f"trainer.seed={args.seed}", f"trainer.eval_problems={args.eval_problems}",
           "trainer.eval_every=0", "trainer.checkpoint_every=0"]
    if args.model:
        out.append(f"model.name={args.model}")
    if args.threads:
        out.append(f"trainer.threads={args.threads}")
    return out + list(args.overrides)


def ks_for(n: int) -> list[int]:
    """pass@k for k in PASS_KS, capped at n (pass@k needs n >= k samples)."""
    return sorted({min(k, n) for k in PASS_KS})


def correct_flags(components: dict[str, list[float]], n: int) -> list[float]:
    """The reward's correctness flag per completion: component ``correct`` or ``<part>/correct``.

    A group whose reward call failed (``reward_error`` = 1, scored under on_error="zero") has no
    flag and counts as wrong; a reward without any correctness flag is an error.
    """
    if "correct" in components:
        return [float(v) for v in components["correct"]]
    keys = sorted(k for k in components if k.endswith("/correct"))
    if keys:
        return [float(v) for v in components[keys[0]]]
    if components.get("reward_error") and all(v == 1.0 for v in components["reward_error"]):
        return [0.0] * n
    raise ValueError(f"the reward reports no correctness flag ('correct' or '<part>/correct'); "
                     f"components: {sorted(components)}")


def evaluate_pass_at_k(model_source: str, cfg, n: int, seed: int) -> dict:
    """pass@k of ``model_source`` (alias, directory or run directory) on the held-out problems."""
    import torch

    from posttrain.evaluation import pass_at_k_table
    from posttrain.models.loading import load_model_and_tokenizer
    from posttrain.rewards.errors import score_group
    from posttrain.rewards.registry import build_reward
    from posttrain.rollout.engine import HFRolloutEngine, SamplingParams, resolve_dtype
    from posttrain.tasks.registry import build_task

    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model_and_tokenizer(model_source)
    model.to(device)
    engine = HFRolloutEngine(model, tokenizer, dtype=resolve_dtype(cfg.rollout.dtype, device),
                             chat_template=cfg.rollout.chat_template)
    reward = build_reward(cfg.reward, tokenizer=tokenizer)
    problems = list(build_task(cfg.task).problems("test"))[: cfg.trainer.eval_problems]
    params = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=1.0, top_p=cfg.rollout.top_p,
                            top_k=cfg.rollout.top_k, stop=tuple(cfg.rollout.stop))
    generator = torch.Generator(device=device).manual_seed(seed + EVAL_SEED_OFFSET)
    per_chunk = max(1, SAMPLES_PER_CHUNK // n)
    counts: list[int] = []
    reward_errors = 0
    for s in range(0, len(problems), per_chunk):
        chunk = problems[s:s + per_chunk]
        rollouts = engine.generate(chunk, n, params, generator, share_prefill=cfg.rollout.share_prompt_prefill)
        for j, problem in enumerate(chunk):
            out, errors = score_group(reward, problem, rollouts.texts[j * n:(j + 1) * n], on_error="zero")
            reward_errors += len(errors)
            counts.append(int(round(sum(correct_flags(out.components, n)))))
    ks = ks_for(n)
    table = pass_at_k_table(n, counts, ks)
    return {
        "pass_at_k": {str(k): table[k] for k in ks},
        "n": n,
        "n_problems": len(problems),
        "correct_per_problem": counts,
        "reward_errors": reward_errors,
        "eval_wall_s": time.perf_counter() - t0,
    }


def fmt(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    ks = ks_for(args.n)
    head = ["recipe", "steps", "acc before", "acc after", *[f"pass@{k}" for k in ks], "train wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        cells = [r["recipe"], str(r["steps"]), fmt(r.get("acc_before")), fmt(r.get("acc_after")),
                 *[fmt(r["pass_at_k"].get(str(k))) for k in ks], fmt(r.get("train_wall_s"), 1)]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [f"- {r['recipe']} failed: {r['error']}" for r in rows if "error" in r]
    if failed:
        lines += ["", *failed]
    model = args.model or "each recipe's model"
    notes = [
        "",
        f"Model: {model}. Steps: {args.steps}, seed {args.seed}, {args.eval_problems} held-out problems.",
        "acc before / acc after: the trainer's held-out accuracy (summary.json of each run: one sample per problem "
        "at trainer.eval_temperature).",
        f"pass@k: {args.n} samples per held-out problem at temperature 1 from the final checkpoint, unbiased "
        "estimator; a sample is correct when the reward's `correct` flag is set (e.g. `numeric/correct`).",
    ]
    return "\n".join(lines + notes) + "\n"


def write_outputs(out: Path, rows: list[dict], args: argparse.Namespace) -> str:
    table = markdown(rows, args)
    (out / "recipes.md").write_text(table)
    meta = {k: v for k, v in vars(args).items()}
    (out / "recipes.json").write_text(json.dumps({"args": meta, "rows": rows}, indent=2) + "\n")
    return table


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    paths = recipe_paths(args.recipes, Path(args.recipes_dir))
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)

    import torch

    from posttrain.config import load_config
    from posttrain.trainers.rl_run import train_rl

    try:  # checkpoint writes and loads would print one progress bar each
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = overrides_for(args)
    configs = {p.stem: load_config(p, overrides) for p in paths}  # every config is valid before any work
    say = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    rows: list[dict] = []
    if not args.no_base:
        first = configs[paths[0].stem]
        say(f"[base] pass@k of {first.model.name} ...")
        base = evaluate_pass_at_k(first.model.name, first, args.n, args.seed)
        rows.append({"recipe": "(base model)", "steps": 0, "acc_before": None, "acc_after": None,
                     "train_wall_s": None, **base})
        write_outputs(out, rows, args)
    for path in paths:
        name, cfg = path.stem, configs[path.stem]
        run_dir = out / "runs" / name
        if run_dir.exists():
            shutil.rmtree(run_dir)
        alg = cfg.algorithm
        say(f"[{name}] training {args.steps} steps ({alg.advantage_estimator} / {alg.policy_loss} / "
            f"{alg.aggregation}, {cfg.trainer.mini_batches} mini-batch(es)) ...")
        row = {"recipe": name, "steps": args.steps, "advantage_estimator": alg.advantage_estimator,
               "policy_loss": alg.policy_loss, "aggregation": alg.aggregation,
               "mini_batches": cfg.trainer.mini_batches, "run_dir": str(run_dir), "pass_at_k": {}}
        try:
            summary = train_rl(cfg, output_dir=str(run_dir), quiet=True)
            row.update(steps=summary["steps"], acc_before=summary["eval_before"]["accuracy"],
                       acc_after=summary["eval_after"]["accuracy"], train_wall_s=summary["train_wall_s"],
                       summary=summary)
            say(f"[{name}] {summary['train_wall_s']:.1f}s; pass@k of the final checkpoint ...")
            row.update(evaluate_pass_at_k(str(run_dir), cfg, args.n, args.seed))
        except Exception as exc:  # noqa: BLE001 - one failing recipe (e.g. diverging) must not stop the others
            row["error"] = f"{type(exc).__name__}: {exc}"
            say(f"[{name}] FAILED: {row['error']}")
        rows.append(row)
        write_outputs(out, rows, args)  # partial results survive a later failure
    table = write_outputs(out, rows, args)
    print(table, end="")
    say(f"wrote {out / 'recipes.md'} and {out / 'recipes.json'}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
