"""posttrain.api: TRL-convention reward functions, datasets as tasks, errors that name the function."""

import pytest

from posttrain.api import DatasetTask, FunctionReward
from posttrain.tasks.base import Problem
from posttrain.rewards.errors import RewardError, score_group


def test_reward_function_gets_trl_keyword_lists():
    seen = {}

    def check(prompts, completions, answer, level, **kwargs):
        seen.update(prompts=prompts, answer=answer, level=level, extra=sorted(kwargs))
        return [float(c == a) for c, a in zip(completions, answer)]

    problem = Problem("p", "What is 1+1?", answer="2", metadata={"row": {"answer": "2", "level": 3}})
    out = FunctionReward(check)(problem, ["2", "3", "2"])
    assert out.rewards == [1.0, 0.0, 1.0]
    assert seen == {"prompts": ["What is 1+1?"] * 3, "answer": ["2"] * 3, "level": [3] * 3, "extra": []}


def test_a_failing_or_malformed_reward_function_is_named():
    def broken(completions, **kwargs):
        raise KeyError("answer")

    def short(completions, **kwargs):
        return [1.0]

    problem = Problem("p", "q", answer="1")
    with pytest.raises(RewardError, match="reward 'broken' failed on problem 'p'"):
        score_group(FunctionReward(broken), problem, ["a", "b"], on_error="abort")
    with pytest.raises(ValueError, match="reward function 'short' returned list of length 1"):
        FunctionReward(short)(problem, ["a", "b"])
    def undecided(completions, **kwargs):
        return [None] * len(completions)

    with pytest.raises(ValueError, match="reward function 'undecided' returned None for completion 0"):
        FunctionReward(undecided)(problem, ["a"])


def test_dataset_rows_become_a_task_with_a_stable_held_out_split():
    rows = [{"prompt": f"q{i}", "answer": i} for i in range(200)]
    task = DatasetTask(rows)
    train, test = task.problems("train"), task.problems("test")
    assert len(train) + len(test) == 200 and 5 < len(test) < 40  # about 10% held out
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    assert DatasetTask(list(reversed(rows))).problems("test")[0].prompt in {p.prompt for p in test}  # order-free
    assert train[0].answer == str(rows[[r["prompt"] for r in rows].index(train[0].prompt)]["answer"])
    with pytest.raises(ValueError, match="dataset row 1 \\(train\\) needs a 'prompt' field"):
        DatasetTask([{"prompt": "a"}, {"question": "b"}])
    with pytest.raises(ValueError, match="test split is empty"):
        DatasetTask([{"prompt": "only one"}])
