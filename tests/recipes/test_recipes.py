"""Every recipe in examples/recipes trains end to end on the tiny random model, and the algorithm
catalog (`posttrain list algorithms --json`) covers everything that is registered.

Recipes are globbed, so a new YAML file is covered without touching this file. Each run is
shrunk to seconds by overrides; the recipe's own `algorithm` section is kept as written.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from posttrain.config import load_config
from posttrain.trainers.rl_run import train_rl

RECIPES_DIR = Path(__file__).resolve().parents[2] / "examples" / "recipes"
RECIPES = sorted(RECIPES_DIR.glob("*.yaml"))
STEPS = 3
TINY = [
    "model.name=tiny-random",
    f"trainer.steps={STEPS}",
    "rollout.num_prompts=2",
    "rollout.num_completions=4",
    "rollout.max_new_tokens=6",
    "trainer.eval_problems=4",
    "trainer.eval_every=0",
    "trainer.micro_batch_size=8",
    "trainer.checkpoint_every=0",
]
# The tiny random model almost never writes a correct (or number-only) answer, so every group would
# get equal rewards and a zero advantage. A dense bonus for containing a digit gives the groups
# reward variance, so every recipe's loss produces a gradient.
DENSE_PART = {"type": "format", "pattern": "[0-9]", "match": "search", "weight": 0.5}
# With 6 new tokens nearly every completion is truncated; recipes that mask truncated samples
# (DAPO) would train on nothing. Stopping at a few common characters ends some completions early.
EARLY_STOPS = ["a", "e", "i", "o", "u", "A", "E", "I", "O", "U", " "]


def tiny_config(path: Path):
    recipe = load_config(path)
    overrides = list(TINY)
    batch = 2 * 4
    if recipe.trainer.mini_batches > 1:
        # Keep the off-policy path (old log-probs recomputed, several optimizer steps per batch)
        # while dividing the tiny batch.
        overrides.append(f"trainer.mini_batches={math.gcd(recipe.trainer.mini_batches, 2)}")
    if recipe.algorithm.overlong_buffer > 6:
        overrides.append("algorithm.overlong_buffer=3")
    if recipe.algorithm.mask_truncated:
        overrides.append(f"rollout.stop={json.dumps(EARLY_STOPS)}")
    cfg = load_config(path, overrides)
    assert (batch % cfg.trainer.mini_batches) == 0
    reward = cfg.reward
    if reward.get("type") == "composite":
        reward["parts"] = [*reward["parts"], dict(DENSE_PART)]
    else:
        cfg.reward = {"type": "composite", "parts": [{**reward, "weight": 1.0}, dict(DENSE_PART)]}
    return cfg


@pytest.fixture(scope="module")
def initial_state() -> dict[str, torch.Tensor]:
    from posttrain.models.tiny import tiny_model_and_tokenizer

    return {k: v.detach().clone() for k, v in tiny_model_and_tokenizer()[0].state_dict().items()}


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors: extra threads only add contention on a shared machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_every_named_recipe_is_present():
    names = {p.stem for p in RECIPES}
    assert len(RECIPES) >= 17, names
    assert {"grpo", "dr_grpo", "dapo", "gspo", "luspo", "cispo", "sapo", "gmpo", "rloo", "reinforce_plus_plus",
            "reinforce_plus_plus_baseline", "remax", "gpg", "opo", "lite_ppo", "w_reinforce", "minirl"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_header_names_its_paper(path: Path):
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header)
    assert re.search(r"arXiv:\d{4}\.\d{4,5}", text), f"{path.name}: header must name the paper's arXiv id"
    assert '"' in text, f"{path.name}: header must quote the paper's title"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_trains_tiny(path: Path, tmp_path: Path, initial_state):
    from safetensors.torch import load_file

    raw = yaml.safe_load(path.read_text())
    cfg = tiny_config(path)
    run = tmp_path / "run"
    summary = train_rl(cfg, output_dir=str(run), quiet=True)
    assert summary["steps"] == STEPS and not summary.get("stopped_early")

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert math.isfinite(r["loss/total"]), r
        assert r.get("nonfinite_skipped", 0.0) == 0.0, r

    trained = load_file(str(run / "checkpoints" / f"step_{STEPS}" / "model.safetensors"))
    common = sorted(set(trained) & set(initial_state))
    assert common, "checkpoint shares no tensor names with the tiny model"
    changed = [k for k in common if not torch.equal(trained[k].to(initial_state[k].dtype), initial_state[k])]
    assert changed, f"{path.stem}: no parameter changed in {STEPS} steps"

    resolved = yaml.safe_load((run / "config.yaml").read_text())["algorithm"]
    for key in ("advantage_estimator", "policy_loss", "aggregation"):
        assert resolved[key] == raw["algorithm"][key], key
    assert resolved["correction"]["name"] == raw["algorithm"].get("correction", {}).get("name")


@pytest.mark.parametrize("path", [p for p in RECIPES
                                  if yaml.safe_load(p.read_text())["algorithm"]["advantage_estimator"] == "w_reinforce"],
                         ids=lambda p: p.stem)
def test_w_reinforce_reward_sign_is_correctness(path: Path):
    """w_reinforce reads "correct" as reward > 0; the recipe's reward must make that exact (+1 / -1)."""
    from posttrain.rewards.registry import build_reward
    from posttrain.tasks.base import Problem

    reward = build_reward(load_config(path).reward)
    problem = Problem(id="p", prompt="What is 3 + 4?", answer="7")
    completions = ["7", "The answer is 7", "8", "The answer is 8", "", "seven"]
    out = reward(problem, completions)
    assert out.rewards == [1.0, 1.0, -1.0, -1.0, -1.0, -1.0]


def test_list_algorithms_json_covers_every_registry(capsys):
    from posttrain.algorithms import ADVANTAGES, AGGREGATIONS, CORRECTIONS, POLICY_LOSSES
    from posttrain.cli import main

    assert main(["list", "algorithms", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert isinstance(rows, list) and rows
    for r in rows:
        assert isinstance(r, dict) and {"kind", "name", "paper"} <= set(r), r
        assert isinstance(r["paper"], str)
    have = {(r["kind"], r["name"]) for r in rows}
    want = ({("advantage", n) for n in ADVANTAGES.names()} | {("policy_loss", n) for n in POLICY_LOSSES.names()}
            | {("correction", n) for n in CORRECTIONS.names()} | {("aggregation", n) for n in AGGREGATIONS})
    assert want <= have, sorted(want - have)
    # Every estimator and loss a recipe names is in the catalog.
    for path in RECIPES:
        alg = yaml.safe_load(path.read_text())["algorithm"]
        assert ("advantage", alg["advantage_estimator"]) in have
        assert ("policy_loss", alg["policy_loss"]) in have


def _bench_module():
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "recipes.py"
    spec = importlib.util.spec_from_file_location("bench_recipes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_correctness_flag_is_never_reward_sign():
    bench = _bench_module()
    assert bench.correct_flags({"correct": [1.0, 0.0]}, 2) == [1.0, 0.0]
    composite = {"numeric": [0.0, 1.0], "numeric/correct": [0.0, 1.0], "format/format": [1.0, 1.0],
                 "total": [0.2, 1.2]}
    assert bench.correct_flags(composite, 2) == [0.0, 1.0]
    assert bench.correct_flags({"reward_error": [1.0, 1.0]}, 2) == [0.0, 0.0]
    with pytest.raises(ValueError, match="correctness flag"):
        bench.correct_flags({"format": [1.0, 1.0], "reward_error": [0.0, 0.0]}, 2)
    assert bench.ks_for(8) == [1, 8] and bench.ks_for(4) == [1, 4] and bench.ks_for(1) == [1]


def test_bench_runs_end_to_end(tmp_path: Path, capsys):
    bench = _bench_module()
    out = tmp_path / "bench"
    assert bench.main(["--recipes", "w_reinforce", "--model", "tiny-random", "--steps", "1", "--eval-problems", "3",
                       "--n", "2", "--no-base", "--out", str(out)]) == 0
    table = (out / "recipes.md").read_text()
    assert "| w_reinforce | 1 |" in table and "pass@2" in table
    assert table.splitlines()[0] in capsys.readouterr().out
    (row,) = json.loads((out / "recipes.json").read_text())["rows"]
    assert row["n_problems"] == 3 and len(row["correct_per_problem"]) == 3
    assert set(row["pass_at_k"]) == {"1", "2"} and all(0.0 <= v <= 1.0 for v in row["pass_at_k"].values())
    assert (out / "runs" / "w_reinforce" / "summary.json").exists()
