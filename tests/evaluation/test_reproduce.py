"""posttrain reproduce: declarations, the verdict rule on hand-made numbers, and a 2-arm x 2-seed
experiment on the tiny model that resumes without rerunning finished runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.cli_reproduce import reproduce, resolve_config, validate
from posttrain.config import dump_config
from posttrain.evaluation.reproduce import MetricSpec, decide, list_experiments, load_experiment, read_metric
from posttrain.models.loading import ModelLoadError, describe_source

REPRODUCTIONS = Path(__file__).resolve().parents[2] / "reproductions"

TINY = """\
name: tiny
claim: arm b beats arm a
paper: {arxiv: "0000.00000"}
setting: tiny random model, 2 steps of 2x2
overrides:
  - model.name=tiny-random
  - trainer.steps=2
  - rollout.num_prompts=2
  - rollout.num_completions=2
  - rollout.max_new_tokens=4
  - trainer.eval_problems=4
  - trainer.micro_batch_size=4
  - trainer.checkpoint_every=1
  - trainer.threads=1
arms:
  a: {}
  b: {overrides: [trainer.lr=1.0e-3]}
seeds: [0, 1, 2]
evaluate:
  final: {model: run, n: 2, problems: 3, arms: [b]}
metrics:
  pass2: {file: eval_final.json, key: pass_at_k.2}
  reward_late: {file: metrics.jsonl, key: reward/mean, last: 1}
tests:
  - {name: "b after > a after", higher: b.accuracy_after, than: a.accuracy_after}
  - {name: "b pass@2 > b before", higher: b.pass2, than: b.accuracy_before}
"""


def _declare(tmp_path: Path, text: str = TINY, name: str = "tiny") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------ the decision rule


def test_verdict_on_hand_made_numbers():
    # differences 0.10, 0.15, 0.15: every bootstrap mean lies in [0.10, 0.15]; all-0.10 has
    # probability 1/27 and all-0.15 8/27, both above 2.5%, so the interval is exactly [0.10, 0.15]
    d = decide([0.50, 0.60, 0.55], [0.40, 0.45, 0.40])
    assert d.verdict == "reproduced" and d.n == 3
    assert d.diff.point == pytest.approx(0.4 / 3)
    assert (d.diff.low, d.diff.high) == (pytest.approx(0.10), pytest.approx(0.15))
    assert d.p_improvement.point == 1.0  # every higher value exceeds every than value

    assert decide([0.1, 0.2, 0.3], [0.3, 0.4, 0.6]).verdict == "not reproduced"

    # differences +0.3, -0.2, +0.1: all -0.2 and all +0.3 each have probability 1/27 > 2.5%
    d = decide([0.8, 0.3, 0.6], [0.5, 0.5, 0.5])
    assert d.verdict == "inconclusive"
    assert d.diff.point == pytest.approx(0.2 / 3)
    assert (d.diff.low, d.diff.high) == (pytest.approx(-0.2), pytest.approx(0.3))
    assert d.p_improvement.point == pytest.approx(6 / 9)  # 0.8 and 0.6 beat each 0.5, 0.3 beats none

    assert decide([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]).verdict == "inconclusive"  # [0, 0] lies on 0


def test_fewer_than_three_seeds_is_inconclusive_whatever_the_numbers():
    d = decide([0.9, 0.95], [0.1, 0.05])
    assert d.diff.low > 0.7  # the numbers alone would say "reproduced"
    assert d.verdict == "inconclusive (2 seeds)"
    assert decide([0.9], [0.1]).verdict == "inconclusive (1 seed)"
    assert decide([], []).verdict == "inconclusive (0 seeds)"


def test_metrics_read_from_run_files(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "entropy/mean": v}) + "\n"
                                                    for i, v in enumerate([1.0, 2.0, 4.0, 6.0], 1)))
    (tmp_path / "eval_final.json").write_text(json.dumps({"pass_at_k": {"1": 0.25, "2": 0.5}, "problems": [
        {"flags": [1, 0], "lengths": [3, 10]}, {"flags": [0, 0], "lengths": [20, 30]}]}))
    assert read_metric(tmp_path, MetricSpec("e", "metrics.jsonl", "entropy/mean", last=2)) == 5.0
    assert read_metric(tmp_path, MetricSpec("e", "metrics.jsonl", "entropy/mean")) == 3.25
    assert read_metric(tmp_path, MetricSpec("p", "eval_final.json", "pass_at_k.2")) == 0.5
    assert read_metric(tmp_path, MetricSpec("i", "eval_final.json", "incorrect_length")) == 20.0  # (10+20+30)/3
    assert read_metric(tmp_path, MetricSpec("c", "eval_final.json", "correct_length")) == 3.0
    assert read_metric(tmp_path, MetricSpec("s", "summary.json", "eval_after.accuracy")) is None  # not yet written
    with pytest.raises(ValueError, match="no 'pass_at_k.64'"):
        read_metric(tmp_path, MetricSpec("p", "eval_final.json", "pass_at_k.64"))


# ------------------------------------------------------------------------------ declarations


def test_every_declared_experiment_validates(tmp_path, capsys):
    paths = list_experiments([REPRODUCTIONS])
    assert {p.stem for p in paths} >= {"grpo_pass1", "rl_narrows_coverage", "nsr_coverage", "ttrl", "dr_grpo_length",
                                       "noisy_rewards", "dapo_clip_higher", "selection_pods"}
    try:
        describe_source("smollm2-135m-instruct")
        extra = []
    except ModelLoadError:  # the `models` extra is not installed: check everything else
        extra = ["model.name=tiny-random"]
    for path in paths:
        exp = load_experiment(path)
        assert exp.name == path.stem and len(exp.seeds) >= 3 and exp.tests
        cfgs = validate(exp, list(exp.seeds), extra)
        assert len(cfgs) == len(exp.arms) * len(exp.seeds)
        assert {c.trainer.seed for c in cfgs.values()} == set(exp.seeds)
    assert not load_experiment(REPRODUCTIONS / "noisy_rewards.yaml").missing  # the noisy reward landed
    # the CLI's dry run: plan printed, nothing written
    assert main(["reproduce", "grpo_pass1", *extra, "--dry-run", "--runs", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "1. grpo seed 0" in out and "3. grpo seed 2" in out and "est. ~15 min" in out
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("edit, message", [
    (("seeds: [0, 1, 2]", "seeds: [0, 1]"), "at least 3 distinct"),
    (("than: a.accuracy_after", "than: c.accuracy_after"), "no arm 'c'"),
    (("key: pass_at_k.2}", "key: pass_at_k.2}\n  bad: {file: eval_other.json, key: x}"), "eval_other.json"),
    (("setting:", "colour: red\nsetting:"), "unknown key"),
    (("arms: [b]", "arms: [a]"), "covers only a"),
    (("setting:", "command: ppo\nsetting:"), "command must be one of rl, dpo"),
])
def test_bad_declarations_are_named(tmp_path, edit, message):
    path = _declare(tmp_path, TINY.replace(*edit))
    with pytest.raises(ValueError, match=message):
        load_experiment(path)


def test_blocked_experiment_plans_but_does_not_run(tmp_path):
    path = _declare(tmp_path, TINY + "missing: [a reward-noise option]\n")
    assert reproduce(str(path), str(tmp_path / "runs"), dry_run=True)["plan"][0] == ("a", 0, "new")
    with pytest.raises(ValueError, match="cannot run yet: posttrain lacks a reward-noise option"):
        reproduce(str(path), str(tmp_path / "runs"), quiet=True)
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------ end to end


def test_two_by_two_runs_resumes_and_summarises(tmp_path):
    from posttrain.trainers.rl_run import train_rl

    path, runs = _declare(tmp_path), tmp_path / "runs"
    exp = load_experiment(path)
    # seed 0 of both arms, through the CLI
    assert main(["reproduce", str(path), "--runs", str(runs), "--seeds", "0", "--quiet"]) == 0
    finished = {p: p.stat().st_mtime_ns for p in (runs / "a_seed0/summary.json", runs / "b_seed0/summary.json",
                                                   runs / "b_seed0/eval_final.json")}
    # seed 1: arm a interrupted after its first step (a checkpoint), arm b killed before any checkpoint
    train_rl(resolve_config(exp, "a", 1, []), output_dir=str(runs / "a_seed1"), stop_after=1, quiet=True)
    assert not (runs / "a_seed1/summary.json").exists() and (runs / "a_seed1/checkpoints/step_1").is_dir()
    (runs / "b_seed1").mkdir()
    dump_config(resolve_config(exp, "b", 1, []), runs / "b_seed1" / "config.yaml")

    out = reproduce(str(path), str(runs), seeds=[0, 1], quiet=True)
    assert out["plan"] == [("a", 0, "skip"), ("b", 0, "skip"), ("a", 1, "resume"), ("b", 1, "restart")]
    assert out["done"] == {"skipped": ["a seed 0", "b seed 0"], "resumed": ["a seed 1"], "restarted": ["b seed 1"],
                           "ran": [], "evaluated": ["b seed 1 final"], "pruned": []}
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # finished runs untouched
    rows = [json.loads(line) for line in (runs / "a_seed1/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # resumed at step 2, step 1 not redone

    # the table and JSON hold the runs' own numbers, paired by seed; 2 seeds: no verdict
    s = json.loads((runs / "tiny.json").read_text())
    after = {(arm, seed): json.loads((runs / f"{arm}_seed{seed}/summary.json").read_text())["eval_after"]["accuracy"]
             for arm in "ab" for seed in (0, 1)}
    arm_b = next(a for a in s["arms"] if (a["arm"], a["metric"]) == ("b", "accuracy_after"))
    assert arm_b["seeds"] == {"0": after[("b", 0)], "1": after[("b", 1)]}
    diff = s["tests"][0]["difference"]["point"]
    assert diff == pytest.approx((after[("b", 0)] - after[("a", 0)] + after[("b", 1)] - after[("a", 1)]) / 2)
    assert [t["verdict"] for t in s["tests"]] == ["inconclusive (2 seeds)"] * 2
    assert s["verdict"] == s["tests"][0]["verdict"]
    pass2 = json.loads((runs / "b_seed1/eval_final.json").read_text())["pass_at_k"]["2"]
    assert next(a for a in s["arms"] if a["metric"] == "pass2")["seeds"]["1"] == pass2
    md = (runs / "tiny.md").read_text()
    assert "| **b after > a after**: b.accuracy_after > a.accuracy_after |" in md
    assert "inconclusive (2 seeds)" in md and "percentile bootstrap" in md and "[report.html](report.html)" in md
    html = (runs / "report.html").read_text()
    assert "Reproduction tiny: arm b beats arm a" in html and all(f"{a}_seed{s}" in html for a in "ab" for s in (0, 1))

    # again: nothing left to train or evaluate; --prune-checkpoints drops the finished runs' weights
    drawn = (runs / "report.html").stat().st_mtime_ns
    again = reproduce(str(path), str(runs), seeds=[0, 1], quiet=True, prune_checkpoints=True)["done"]
    assert (runs / "report.html").stat().st_mtime_ns == drawn  # same runs, nothing new: not redrawn
    assert again["skipped"] == ["a seed 0", "b seed 0", "a seed 1", "b seed 1"] and not again["evaluated"]
    assert again["pruned"] == again["skipped"] and not list(runs.glob("*/checkpoints"))
    assert json.loads((runs / "tiny.json").read_text())["arms"] == s["arms"]  # the figures need no weights
    # a changed declaration is refused before any work instead of mixing two settings
    with pytest.raises(ValueError, match="was run with another config.*trainer.lr"):
        reproduce(str(path), str(runs), seeds=[0, 1], extra=["trainer.lr=0.5"], quiet=True)


def test_dpo_command_runs_online_dpo_arms(tmp_path):
    """command: dpo runs every arm through posttrain dpo (DPOConfig, train_dpo): online DPO on the
    tiny model, its held-out pair accuracy read from eval.jsonl."""
    text = """\
name: tiny_dpo
claim: online DPO raises held-out accuracy
paper: {arxiv: "2402.04792"}
setting: tiny random model, online DPO, 2 steps
command: dpo
overrides:
  - model.name=tiny-random
  - data.path=online
  - data.held_out_prompts=4
  - trainer.steps=2
  - trainer.lr=1.0e-2
  - rollout.num_prompts=2
  - rollout.num_completions=4
  - rollout.max_new_tokens=4
  - "reward={type: format, pattern: '^[0-9]', match: search}"
  - trainer.eval_problems=4
  - trainer.threads=1
arms:
  online: {}
seeds: [0, 1, 2]
metrics:
  pref_accuracy: {file: eval.jsonl, key: held_out_pref_accuracy, last: 1}
tests:
  - {name: "accuracy rises", higher: online.accuracy_after, than: online.accuracy_before}
"""
    path, runs = _declare(tmp_path, text, "tiny_dpo"), tmp_path / "runs"
    exp = load_experiment(path)
    assert exp.command == "dpo"
    assert type(resolve_config(exp, "online", 0, [])).__name__ == "DPOConfig"
    out = reproduce(str(path), str(runs), seeds=[0, 1, 2], quiet=True)
    assert out["done"]["ran"] == ["online seed 0", "online seed 1", "online seed 2"]
    config = (runs / "online_seed1" / "config.yaml").read_text()
    assert "path: online" in config and "held_out_prompts: 4" in config
    s = json.loads((runs / "tiny_dpo.json").read_text())
    evals = [json.loads(line) for line in (runs / "online_seed2" / "eval.jsonl").read_text().splitlines()]
    pref = next(a for a in s["arms"] if a["metric"] == "pref_accuracy")
    assert pref["seeds"]["2"] == evals[-1]["held_out_pref_accuracy"]
    assert s["resolved_setting"].startswith("posttrain dpo, model tiny-random")
    assert s["tests"][0]["verdict"] in ("reproduced", "not reproduced", "inconclusive")
