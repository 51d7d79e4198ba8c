"""Test-time RL (TTRL) on arithmetic without labels: does majority-vote RL improve accuracy?

    python benchmarks/ttrl.py [--config examples/ttrl.yaml] [--model NAME] [--steps 30]
                              [--eval-problems 200] [--out DIR] [key=value ...]
    smoke run (seconds): python benchmarks/ttrl.py --model tiny-random --steps 2 --eval-problems 8

1. Ground-truth accuracy of the initial model on the task's test split: one completion per
   problem at ``trainer.eval_temperature`` (1.0), seeded, scored by the numeric verifier.
2. ``train_rl`` with the majority-vote reward of the config (no labels in the reward).
3. The same ground-truth evaluation of the final checkpoint (same problems, same seed).
4. Training diagnostics from the run's metrics.jsonl, averaged over steps: label accuracy
   (the voted pseudo-label equals the gold answer), reward accuracy (the pseudo-reward equals
   the true 0/1 reward), majority ratio (votes for the label / group size), the true reward of
   the training samples, and the share of samples that stated an answer at all.

The trainer's own "held-out accuracy" is NOT accuracy here: it scores with the training reward,
and with one sample per problem every completion that states a number wins its own vote, so
it measures the answer rate. It is reported as ``trainer_eval_answer_rate`` for reference.

Writes ``OUT/results.json`` and ``OUT/results.md`` (a markdown table row, also printed); the
RL run directory is ``OUT/run``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from posttrain.config import load_config
from posttrain.models.loading import load_model_and_tokenizer
from posttrain.rewards.registry import build_reward
from posttrain.rollout.engine import HFRolloutEngine, SamplingParams, resolve_dtype
from posttrain.runs import RunDir
from posttrain.tasks.registry import build_task
from posttrain.trainers.rl_run import train_rl

ROOT = Path(__file__).resolve().parent.parent
EVAL_SEED_OFFSET = 7919  # the trainer's own evaluate() uses seed + 7919 too


def ground_truth_eval(model_name: str, cfg, problems, seed: int, chunk: int = 64) -> dict:
    """Accuracy of ``model_name`` on ``problems`` with the numeric verifier: one sample per
    problem at ``cfg.trainer.eval_temperature``, generator seeded with ``seed``."""
    model, tokenizer = load_model_and_tokenizer(model_name)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    engine = HFRolloutEngine(model, tokenizer, dtype=resolve_dtype(cfg.rollout.dtype, device),
                             chat_template=cfg.rollout.chat_template)
    params = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.trainer.eval_temperature,
                            top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k, stop=tuple(cfg.rollout.stop))
    gen = torch.Generator(device=device).manual_seed(seed)
    verifier = build_reward({"type": "numeric"})
    correct, answered, lengths, t0 = [], [], [], time.perf_counter()
    for s in range(0, len(problems), chunk):
        batch = problems[s:s + chunk]
        rollouts = engine.generate(batch, 1, params, gen)
        for problem, text in zip(batch, rollouts.texts):
            out = verifier(problem, [text])
            correct.append(float(out.rewards[0]))
            answered.append(0.0 if out.info[0].get("answer") is None else 1.0)
        lengths += rollouts.completion_lengths.tolist()
    del engine, model
    return {"model": model_name, "accuracy": float(np.mean(correct)), "answer_rate": float(np.mean(answered)),
            "mean_length": float(np.mean(lengths)), "n_problems": len(problems), "per_problem": correct,
            "wall_s": time.perf_counter() - t0}


def paired_bootstrap(before: list[float], after: list[float], n: int = 2000, seed: int = 0) -> dict:
    """95% percentile interval of mean(after - before), resampling problems."""
    d = np.asarray(after) - np.asarray(before)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n, len(d)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"delta": float(d.mean()), "ci95": [float(lo), float(hi)]}


def _nanmean(values) -> float:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(vals)) if vals else float("nan")


TRAINING_KEYS = {
    "label_accuracy": "reward_component/label_correct",
    "reward_accuracy": "reward_component/reward_correct",
    "majority_ratio": "reward_component/majority_ratio",
    "true_reward": "reward_component/gt_reward",
    "answer_rate": "reward_component/voted",
    "pseudo_reward": "reward/mean",
}


def training_diagnostics(run_dir: Path) -> dict:
    rows = RunDir(run_dir).read_jsonl("metrics.jsonl")
    out: dict = {"steps_logged": len(rows)}
    half = max(1, len(rows) // 2)
    for name, key in TRAINING_KEYS.items():
        series = [r.get(key) for r in rows]
        out[name] = {
            "mean": _nanmean(series),
            "first_half": _nanmean(series[:half]),
            "second_half": _nanmean(series[half:]) if len(rows) > 1 else float("nan"),
            "first": _nanmean(series[:1]),
            "last": _nanmean(series[-1:]),
        }
    out["train_wall_s"] = float(rows[-1].get("time/train_wall_s", float("nan"))) if rows else float("nan")
    return out


MD_HEADER = ("| model | steps | eval problems | GT acc before | GT acc after | Δ (95% CI) | label acc | reward acc "
             "| majority ratio | train wall (s) |\n|---|---|---|---|---|---|---|---|---|---|")


def markdown_row(r: dict) -> str:
    t = r["training"]
    d = r["delta"]
    return (f"| {r['model']} | {r['steps']} | {r['eval_problems']} | {r['gt_before']['accuracy']:.3f} "
            f"| {r['gt_after']['accuracy']:.3f} | {100 * d['delta']:+.1f} pts [{100 * d['ci95'][0]:+.1f}, "
            f"{100 * d['ci95'][1]:+.1f}] | {t['label_accuracy']['mean']:.3f} | {t['reward_accuracy']['mean']:.3f} "
            f"| {t['majority_ratio']['mean']:.3f} | {t['train_wall_s']:.0f} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "examples" / "ttrl.yaml"))
    ap.add_argument("--model", help="override model.name (e.g. tiny-random for a smoke run)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--eval-problems", type=int, default=200, help="test problems for the ground-truth evaluation")
    ap.add_argument("--out", help="output directory (default: runs/ttrl-bench-TIMESTAMP)")
    ap.add_argument("--verbose", action="store_true", help="show the trainer's own progress output")
    ap.add_argument("overrides", nargs="*", help="extra config overrides, e.g. trainer.lr=1e-5")
    args = ap.parse_args(argv)

    overrides = [f"trainer.steps={args.steps}", f"trainer.eval_problems={args.eval_problems}", *args.overrides]
    if args.model:
        overrides.insert(0, f"model.name={args.model}")
    cfg = load_config(args.config, overrides)
    if cfg.reward.get("type") != "majority_vote":
        print(f"warning: reward type is {cfg.reward.get('type')!r}, not majority_vote", file=sys.stderr)
    out = Path(args.out or f"runs/ttrl-bench-{time.strftime('%Y%m%d-%H%M%S')}")
    run_dir = out / "run"
    if run_dir.exists() and any(run_dir.iterdir()):
        print(f"error: {run_dir} already exists; choose another --out", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)

    problems = list(build_task(cfg.task).problems("test"))[: args.eval_problems]
    seed = cfg.trainer.seed + EVAL_SEED_OFFSET
    print(f"TTRL benchmark: model {cfg.model.name}, {args.steps} steps, reward {cfg.reward}, "
          f"{len(problems)} ground-truth eval problems")
    t0 = time.perf_counter()
    before = ground_truth_eval(cfg.model.name, cfg, problems, seed)
    print(f"  ground-truth accuracy before: {before['accuracy']:.3f} (answer rate {before['answer_rate']:.3f})")
    print(f"  training (run directory {run_dir}) ...", flush=True)
    summary = train_rl(cfg, output_dir=str(run_dir), quiet=not args.verbose)
    after = ground_truth_eval(str(run_dir), cfg, problems, seed)  # latest checkpoint of the run
    print(f"  ground-truth accuracy after:  {after['accuracy']:.3f} (answer rate {after['answer_rate']:.3f})")

    training = training_diagnostics(run_dir)
    result = {
        "benchmark": "ttrl",
        "model": cfg.model.name,
        "config": str(args.config),
        "overrides": overrides,
        "reward": cfg.reward,
        "steps": summary["steps"],
        "eval_problems": len(problems),
        "eval_seed": seed,
        "eval_temperature": cfg.trainer.eval_temperature,
        "gt_before": before,
        "gt_after": after,
        "delta": paired_bootstrap(before["per_problem"], after["per_problem"]),
        "training": training,
        "trainer_eval_answer_rate": {"before": summary["eval_before"]["accuracy"],
                                     "after": summary["eval_after"]["accuracy"],
                                     "note": "the trainer's evaluate() with the majority-vote reward and n=1: "
                                             "the share of completions stating a number, not accuracy"},
        "run_dir": str(run_dir),
        "total_wall_s": time.perf_counter() - t0,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
    }
    (out / "results.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    row = markdown_row(result)
    (out / "results.md").write_text(MD_HEADER + "\n" + row + "\n")
    t = training
    print(f"  training means over {t['steps_logged']} steps: label accuracy {t['label_accuracy']['mean']:.3f}, "
          f"reward accuracy {t['reward_accuracy']['mean']:.3f}, majority ratio {t['majority_ratio']['mean']:.3f}, "
          f"true reward {t['true_reward']['mean']:.3f}, answer rate {t['answer_rate']['mean']:.3f}")
    print(MD_HEADER)
    print(row)
    print(f"results: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
