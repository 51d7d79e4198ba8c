"""Short RL runs on the tiny Mixture-of-Experts model (issue 19 item 4): with and without routing
replay (R3, arXiv:2510.11370, ``algorithm.moe.routing_replay``) on a bf16 sampler and an fp32
learner, the router load-balancing loss and the router-aware IS factor through the CLI, and the
configuration errors. The runs print the per-step routing mismatch and PPO clip fraction.
"""

from __future__ import annotations

import json
import math

import pytest

from posttrain.cli import main
from posttrain.config import ConfigError, load_config
from posttrain.trainers.rl_run import train_rl

# bf16 sampler vs fp32 learner (as MISMATCH in test_registry_through_trainer.py); two mini-batches so
# that ratios move and PPO clips; lr high enough to move a tiny model in 3 steps
BASE = ("model.name=tiny-random-moe", "task.test_size=4", "rollout.num_prompts=4", "rollout.num_completions=8",
        "rollout.max_new_tokens=24", "trainer.steps=3", "trainer.lr=1e-2", "trainer.warmup_steps=0",
        "trainer.eval_problems=1", "trainer.threads=1", "trainer.seed=0", "rollout.dtype=bfloat16",
        "trainer.autocast=none", "trainer.mini_batches=2",
        "reward={type: format, pattern: '[0-9]', match: search}")


def _rows(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_rl_with_and_without_routing_replay(tmp_path):
    runs = {}
    for replay in (False, True):
        cfg = load_config(None, [*BASE, f"algorithm.moe.routing_replay={str(replay).lower()}"])
        train_rl(cfg, output_dir=str(tmp_path / f"r3_{replay}"), quiet=True)
        runs[replay] = _rows(tmp_path / f"r3_{replay}")
    print()
    for replay, rows in runs.items():
        for r in rows:
            print(f"R3 {'on ' if replay else 'off'} step {r['step']}: routing mismatch {r['moe/routing_mismatch']:.4f} "
                  f"(any layer {r['moe/routing_mismatch_any_layer']:.4f}, router's own "
                  f"{r['moe/routing_mismatch_unreplayed']:.4f}), clip fraction {r['loss/clip_frac']:.4f}, "
                  f"mismatch/kl_k3 {r['mismatch/kl_k3']:.2e}")
    for rows in runs.values():
        assert [r["step"] for r in rows] == [1, 2, 3]
        assert all(math.isfinite(r["loss/total"]) and math.isfinite(r["loss/clip_frac"]) for r in rows)
    assert all(r["moe/routing_mismatch"] == 0.0 for r in runs[True])
    assert any(r["moe/routing_mismatch"] > 0 for r in runs[False])
    assert any(r["loss/clip_frac"] > 0 for r in runs[False] + runs[True])  # PPO acted


def test_cli_moe_aux_loss_and_router_is(tmp_path, capsys):
    run, config = tmp_path / "cli", tmp_path / "moe.yaml"
    config.write_text("model: {name: tiny-random-moe}\nalgorithm: {moe: {routing_replay: true}}\n")
    overrides = [o for o in BASE if not o.startswith(("model.name", "trainer.steps", "rollout.num"))]
    code = main(["rl", str(config), *overrides, "trainer.steps=2", "rollout.num_prompts=2", "rollout.num_completions=4",
                 "algorithm.moe.aux_loss_coef=0.01", "algorithm.moe.router_is_beta=1.0", "--output-dir", str(run)])
    assert code in (0, None)
    rows = _rows(run)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 1.0 <= r["moe/aux_loss"] <= 4.0  # k = 2 at balance, at most E = 4
        assert 0.0 < r["moe/router_is_factor"] <= 1.0 and r["moe/router_distance"] >= 0.0
        assert r["moe/routing_mismatch"] == 0.0


@pytest.mark.parametrize("overrides, key", [
    (("algorithm.moe.routing_replay=true", "rollout.engine=vllm"), "algorithm.moe.routing_replay"),
    (("algorithm.moe.router_is_beta=1", "rollout.engine=vllm"), "algorithm.moe.router_is_beta"),
    (("algorithm.moe.routing_replay=true", "environment={type: guess_the_number}"), "algorithm.moe"),
    (("algorithm.moe.aux_loss_coef=-1",), "algorithm.moe.aux_loss_coef"),
])
def test_moe_config_errors(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, ["model.name=tiny-random-moe", *overrides])


def test_moe_options_on_a_dense_model_fail_before_training(tmp_path):
    cfg = load_config(None, ["model.name=tiny-random", "algorithm.moe.routing_replay=true", "trainer.steps=1",
                             "trainer.threads=1", "task.test_size=2"])
    with pytest.raises(ValueError, match="no MoE layers"):
        train_rl(cfg, output_dir=str(tmp_path / "dense"), quiet=True)
    assert not (tmp_path / "dense" / "metrics.jsonl").exists()
