"""benchmarks/ttrl.py: helpers, and one end-to-end smoke run with the tiny model."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("ttrl_bench", ROOT / "benchmarks" / "ttrl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_bootstrap(bench):
    res = bench.paired_bootstrap([0, 0, 1, 1], [1, 0, 1, 1])
    assert res["delta"] == 0.25
    assert res["ci95"][0] <= 0.25 <= res["ci95"][1]


def test_training_diagnostics_nan_aware(bench, tmp_path):
    rows = [{"step": 1, "reward_component/label_correct": 0.0, "reward_component/majority_ratio": 0.5},
            {"step": 2, "reward_component/label_correct": float("nan"), "reward_component/majority_ratio": 0.7},
            {"step": 3, "reward_component/label_correct": 1.0, "reward_component/majority_ratio": 0.9,
             "time/train_wall_s": 12.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    d = bench.training_diagnostics(tmp_path)
    assert d["label_accuracy"]["mean"] == 0.5 and d["label_accuracy"]["last"] == 1.0
    assert d["majority_ratio"]["mean"] == pytest.approx(0.7)
    assert math.isnan(d["reward_accuracy"]["mean"])
    assert d["train_wall_s"] == 12.0


def test_ttrl_smoke(bench, tmp_path, capsys):
    assert bench.main(["--model", "tiny-random", "--steps", "2", "--eval-problems", "8", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["steps"] == 2 and res["eval_problems"] == 8 and res["reward"]["type"] == "majority_vote"
    assert 0 <= res["gt_before"]["accuracy"] <= 1 and 0 <= res["gt_after"]["accuracy"] <= 1
    assert res["training"]["steps_logged"] == 2
    for key in ("label_accuracy", "reward_accuracy", "majority_ratio"):
        assert 0 <= res["training"][key]["mean"] <= 1
    md = (tmp_path / "results.md").read_text().splitlines()
    assert md[0].startswith("| model |") and md[2].startswith("| tiny-random | 2 | 8 |")
    assert "| tiny-random | 2 | 8 |" in capsys.readouterr().out
