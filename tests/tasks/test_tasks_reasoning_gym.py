"""reasoning_gym adapter: disjoint seeded splits and the dataset's own score function."""

from __future__ import annotations

import pytest

pytest.importorskip("reasoning_gym")

from posttrain.rewards.base import Reward, RewardOutput  # noqa: E402
from posttrain.tasks.base import Problem  # noqa: E402
from posttrain.tasks.reasoning_gym import ReasoningGymReward, ReasoningGymTask, extract_tagged_answer  # noqa: E402
from posttrain.tasks.registry import build_task  # noqa: E402

KW = {"dataset": "basic_arithmetic", "test_size": 20, "train_size": 100}


@pytest.fixture(scope="module")
def task():
    return ReasoningGymTask(**KW)


def test_sizes_and_disjoint_splits(task):
    train, test = task.problems("train"), task.problems("test")
    assert len(train) == 100 and len(test) == 20
    assert not {p.id for p in train} & {p.id for p in test}
    questions = lambda ps: {p.metadata["question"] for p in ps}  # noqa: E731
    assert not questions(train) & questions(test)
    assert len(questions(train)) == 100  # deduplicated by question text
    for p in train + test:
        assert p.metadata["rg_dataset"] == "basic_arithmetic"
        assert p.category == "dataset=basic_arithmetic"
        assert p.answer == p.metadata["rg_entry"]["answer"]
        assert p.metadata["question"] in p.prompt and "<answer>" in p.prompt


def test_deterministic_and_seeded(task):
    again = ReasoningGymTask(**KW)
    assert again.problems("test") == task.problems("test")
    other = ReasoningGymTask(**{**KW, "seed": 5})
    assert [p.id for p in other.problems("train")] != [p.id for p in task.problems("train")]
    # split membership is by question text: seeds never swap train and test questions
    assert not {p.id for p in other.problems("train")} & {p.id for p in task.problems("test")}


def test_answers_verified_by_the_dataset(task):
    ds = task.dataset
    for p in task.problems("test"):
        entry = p.metadata["rg_entry"]
        assert ds.score_answer(p.answer, entry) == 1.0
        # independent recomputation: basic_arithmetic's expression is plain integer arithmetic
        expr = entry["metadata"]["expression"]
        assert int(p.answer) == int(eval(expr, {"__builtins__": {}}))


def test_reward_uses_score_answer(task):
    reward = ReasoningGymReward()
    assert isinstance(reward, Reward) and reward.name == "reasoning_gym"
    p = task.problems("test")[0]
    wrong = str(int(p.answer) + 1)
    out = reward(
        p,
        [
            f"thinking...\n<answer>{p.answer}</answer>",
            f"<answer>{wrong}</answer>",
            f"so the result is\n{p.answer}",
            f"<answer>{wrong}</answer> oops <answer> {p.answer} </answer>",
            "",
        ],
    )
    assert isinstance(out, RewardOutput)
    assert out.rewards == [1.0, 0.0, 1.0, 1.0, 0.0]
    assert out.components["answer_tag"] == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert out.info[0]["extracted"] == p.answer and out.info[4]["extracted"] is None


def test_reward_with_explicit_dataset_for_foreign_problems():
    reward = ReasoningGymReward(dataset="basic_arithmetic")
    p = Problem(id="x", prompt="Calculate 2 + 3.", answer="5")
    assert reward(p, ["<answer>5</answer>", "<answer>6</answer>"]).rewards == [1.0, 0.0]
    with pytest.raises(ValueError, match="rg_dataset"):
        ReasoningGymReward()(p, ["5"])


def test_extract_tagged_answer():
    assert extract_tagged_answer("a\n<answer>\n 42 \n</answer>\n") == ("42", True)
    assert extract_tagged_answer("line one\n  last  \n\n") == ("last", False)
    assert extract_tagged_answer("   ") == (None, False)


def test_dataset_options_change_the_problems():
    easy = ReasoningGymTask(dataset="basic_arithmetic", options={"min_terms": 2, "max_terms": 2}, test_size=5, train_size=20)
    hard = ReasoningGymTask(dataset="basic_arithmetic", options={"min_terms": 5, "max_terms": 5}, test_size=5, train_size=20)
    terms = lambda t: {p.metadata["rg_entry"]["metadata"]["num_terms"] for p in t.problems("train")}  # noqa: E731
    assert terms(easy) == {2} and terms(hard) == {5}


def test_registry_and_errors():
    task = build_task({"name": "reasoning_gym", "dataset": "leg_counting", "test_size": 5, "train_size": 10})
    assert len(task.problems("test")) == 5
    with pytest.raises(ValueError, match="not a reasoning_gym dataset"):
        build_task({"name": "reasoning_gym", "dataset": "no_such_dataset"})
    with pytest.raises(ValueError, match="task.options"):
        build_task({"name": "reasoning_gym", "options": {"seed": 3}})
    with pytest.raises(ValueError, match="task.options"):
        build_task({"name": "reasoning_gym", "options": {"bogus_knob": 3}})
