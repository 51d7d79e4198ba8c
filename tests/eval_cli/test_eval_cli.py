"""``posttrain eval`` end to end on the tiny random model, and bad input rejected before any
weights load, with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from posttrain.cli import main

BASE = ["--model", "tiny-random", "--n", "4", "--problems", "6", "--max-new-tokens", "10", "--no-progress"]


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.fixture()
def no_weights(monkeypatch):
    """Fail the test if a command gets as far as loading weights."""
    import posttrain.models.loading as loading

    def refuse(*a, **k):
        raise AssertionError("weights were loaded before the input was validated")

    monkeypatch.setattr(loading, "load_model_and_tokenizer", refuse)


def test_eval_writes_json_and_prints_table(tmp_path, capsys):
    out = tmp_path / "results" / "eval_tiny.json"
    assert main(["eval", *BASE, "--task", "arithmetic", "--json", str(out), "--seed", "1"]) == 0
    d = json.loads(out.read_text())
    assert d["model"] == "tiny-random" and d["task"] == "arithmetic" and d["n"] == 4 and d["seed"] == 1
    assert d["task_spec"] == {"name": "arithmetic"} and d["reward_spec"] == {"type": "numeric"}
    assert d["sampling"]["max_new_tokens"] == 10 and d["checkpoint"] is None
    assert set(d["pass_at_k"]) == {"1", "2", "3", "4"} and len(d["problems"]) == 6
    assert d["pass_at_k"]["1"] == pytest.approx(d["mean_accuracy"])
    assert [p.name for p in out.parent.iterdir()] == ["eval_tiny.json"]  # no temporary file left behind
    text = capsys.readouterr().out
    for label in ("pass@1", "pass@4", "maj@4", "mean accuracy", "tokens generated"):
        assert label in text


def test_task_file_full_config_and_inline_reward(tmp_path):
    cfg = {
        "model": {"name": "smollm2-135m-instruct"},  # ignored: --model decides
        "task": {"name": "arithmetic", "max_operand": 5, "test_size": 8},
        "reward": {"type": "composite", "parts": [{"type": "numeric"}, {"type": "format", "pattern": r"^\d+$",
                                                                         "weight": 0.1}]},
        "rollout": {"max_new_tokens": 7, "temperature": 0.9},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "a.json"
    args = ["eval", "--model", "tiny-random", "--n", "2", "--problems", "3", "--no-progress"]
    assert main([*args, "--task", str(tmp_path / "cfg.yaml"), "--json", str(out), "--scorers", "mean_logprob"]) == 0
    d = json.loads(out.read_text())
    assert d["task_spec"] == cfg["task"] and d["reward_spec"] == cfg["reward"] and d["reward"] == "composite"
    assert d["sampling"]["max_new_tokens"] == 7 and d["sampling"]["temperature"] == 0.9
    assert d["correct_from"] == ["numeric/correct"] and d["scorers"] == ["mean_logprob"]
    # a bare task spec file, an inline reward as a type name
    (tmp_path / "task.yaml").write_text("name: arithmetic\nmax_operand: 4\ntest_size: 5\n")
    assert main([*args, "--task", str(tmp_path / "task.yaml"), "--reward", "numeric", "--json", str(out),
                 "--temperature", "0.5"]) == 0
    d = json.loads(out.read_text())
    assert d["task_spec"]["max_operand"] == 4 and d["reward_spec"] == {"type": "numeric"}
    assert d["sampling"]["temperature"] == 0.5 and d["sampling"]["max_new_tokens"] == 32
    # an inline task spec and an inline JSON reward
    assert main([*args, "--task", "{name: arithmetic, max_operand: 3, test_size: 4}", "--reward", '{"type": "math"}',
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["reward_spec"] == {"type": "math"}


def _fake_run_dir(root: Path) -> Path:
    from posttrain.models.loading import load_model_and_tokenizer

    run = root / "run"
    ckpt = run / "checkpoints" / "step_2"
    model, tokenizer = load_model_and_tokenizer("tiny-random")
    model.save_pretrained(ckpt, safe_serialization=True)
    tokenizer.save_pretrained(ckpt)
    (ckpt / "COMPLETE").write_text("{}\n")
    (run / "checkpoints" / "step_1").mkdir()  # incomplete: never loaded
    cfg = {"model": {"name": "tiny-random"}, "task": {"name": "arithmetic", "max_operand": 5, "test_size": 6},
           "reward": {"type": "composite", "parts": [{"type": "numeric", "weight": 1.0}]},
           "rollout": {"max_new_tokens": 6, "num_completions": 4}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


def test_run_directory_uses_its_task_reward_and_report(tmp_path, capsys):
    run = _fake_run_dir(tmp_path)
    out = run / "eval_n2.json"
    assert main(["eval", "--model", str(run), "--n", "2", "--json", str(out), "--no-progress", "--report",
                 "--scorers", "self_certainty"]) == 0
    d = json.loads(out.read_text())
    assert d["checkpoint"] == str(run / "checkpoints" / "step_2")
    assert d["task_spec"] == {"name": "arithmetic", "max_operand": 5, "test_size": 6}
    assert d["reward_spec"]["type"] == "composite" and d["n_problems"] == 6
    assert d["sampling"]["max_new_tokens"] == 6
    html = (run / "report.html").read_text()
    assert "eval_n2" in html
    from posttrain.evaluation.report import load_run

    assert "eval_n2" in load_run(run).eval_files
    assert "report written" in capsys.readouterr().out


BAD = [
    (["--model", "tiny-random", "--task", "no_such_task", "--n", "2"], "unknown task"),
    (["--model", "/no/such/model_dir", "--task", "arithmetic", "--n", "2"], "does not exist"),
    (["--model", "no-such-alias", "--task", "arithmetic", "--n", "2"], "unknown model"),
    (["--model", "tiny-random", "--task", "arithmetic", "--n", "0"], "--n must be >= 1"),
    (["--model", "tiny-random", "--task", "arithmetic", "--n", "4", "--k", "8"], "--k"),
    (["--model", "tiny-random", "--task", "arithmetic", "--n", "2", "--problems", "0"], "--problems"),
    (["--model", "tiny-random", "--task", "arithmetic", "--n", "2", "--problems", "999"], "only 200"),
    (["--model", "tiny-random", "--task", "arithmetic", "--n", "2", "--temperature", "0"], "--temperature"),
    (["--model", "tiny-random", "--task", "arithmetic", "--n", "2", "--reward", "{type: nope}"], "unknown reward"),
    (["--model", "tiny-random", "--task", "arithmetic", "--n", "2", "--reward", "{type: numeric, x: 1}"], "no option"),
    (["--model", "tiny-random", "--task", "arithmetic", "--n", "2", "--reward", "{type: [unclosed"], "not valid YAML"),
    (["--model", "tiny-random", "--task", "missing/task.yaml", "--n", "2"], "does not exist"),
    (["--model", "tiny-random", "--task", "{name: arithmetic, bogus: 1}", "--n", "2"], "no option"),
    (["--model", "tiny-random", "--task", "countdown", "--n", "2"], "no default reward"),
    (["--model", "tiny-random", "--n", "2"], "--task is required"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, no_weights, argv, message):
    before = files_under(tmp_path)
    assert main(["eval", *argv, "--json", str(tmp_path / "out" / "eval_x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("posttrain: error:") and message in err and "\n" not in err
    assert files_under(tmp_path) == before


@pytest.mark.parametrize("json_name,message", [
    ("blocker.txt/eval_x.json", "not a directory"),
    ("eval_x.txt", "must end in .json"),
    ("adir.json", "is a directory"),
])
def test_unwritable_json_path(tmp_path, capsys, no_weights, json_name, message):
    (tmp_path / "blocker.txt").write_text("a file, not a directory")
    (tmp_path / "adir.json").mkdir()
    before = files_under(tmp_path)
    assert main(["eval", *BASE, "--task", "arithmetic", "--json", str(tmp_path / json_name)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert files_under(tmp_path) == before


def test_json_layout_is_strict_and_one_line_per_problem():
    from posttrain.cli_eval import dumps_eval

    text = dumps_eval({"cost_of_pass": float("inf"), "x": {"1": float("nan")},
                       "problems": [{"id": "a", "flags": [1, 0]}, {"id": "b", "flags": [0, 0]}]})
    assert json.loads(text) == {"cost_of_pass": None, "x": {"1": None},
                                "problems": [{"id": "a", "flags": [1, 0]}, {"id": "b", "flags": [0, 0]}]}
    assert sum('"id"' in line for line in text.splitlines()) == 2 and "NaN" not in text and "Infinity" not in text
