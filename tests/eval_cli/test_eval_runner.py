"""``evaluate`` on the tiny random model: consistent figures, recomputable from ``problems``."""

from __future__ import annotations

import json
import re

import pytest
import torch

from posttrain.evaluation import metrics as M
from posttrain.evaluation.runner import correct_flags, evaluate, k_grid, powers_of_two, sample_answer, summarize
from posttrain.rewards.base import RewardOutput
from posttrain.rewards.math import NumericReward
from posttrain.tasks.registry import build_task

N, P = 4, 6


class FirstDigitOdd:
    """A reward the random model passes often: answer = first digit of the completion,
    correct iff it is odd. Correctness is a function of the answer, so maj@1 = pass@1."""

    name = "first_digit_odd"

    def __call__(self, problem, completions):
        answers = [(re.search(r"\d", c) or [None])[0] for c in completions]
        correct = [1.0 if a is not None and int(a) % 2 else 0.0 for a in answers]
        return RewardOutput(rewards=list(correct), components={"correct": correct},
                            info=[{"answer": a} for a in answers])


@pytest.fixture(scope="module")
def tiny():
    from posttrain.models.loading import load_model_and_tokenizer

    torch.set_num_threads(1)
    model, tokenizer = load_model_and_tokenizer("tiny-random")
    return model, tokenizer, build_task({"name": "arithmetic"})


@pytest.fixture(scope="module")
def result(tiny):
    model, tokenizer, task = tiny
    return evaluate(model, tokenizer, task, FirstDigitOdd(), n=N, problems=P, seed=3, max_new_tokens=12,
                    batch_prompts=4, progress=False)


def test_result_is_consistent(result):
    r = json.loads(json.dumps(result))  # JSON-ready as is
    assert r["n"] == N and r["n_problems"] == P == len(r["problems"]) and r["seed"] == 3
    assert r["model"] == "tiny-random" and r["task"] == "arithmetic" and r["correct_from"] == ["correct"]
    assert set(r["pass_at_k"]) == {str(k) for k in range(1, N + 1)}
    assert 0 < r["mean_accuracy"] < 1, "the test reward should give a mix of correct and wrong samples"
    assert r["pass_at_k"]["1"] == pytest.approx(r["mean_accuracy"])
    assert r["mean_at_k"][str(N)] == pytest.approx(r["mean_accuracy"])
    pk = [r["pass_at_k"][str(k)] for k in range(1, N + 1)]
    assert all(0 <= a <= b <= 1 for a, b in zip(pk, pk[1:]))
    for p in r["problems"]:
        assert p["n"] == N == len(p["flags"]) == len(p["answers"]) == len(p["lengths"])
        assert 0 <= p["correct"] == sum(p["flags"]) <= N
        assert p["difficulty"] is not None
    # recompute pass@k from the per-problem counts
    for k in range(1, N + 1):
        again = sum(M.pass_at_k(p["n"], p["correct"], k) for p in r["problems"]) / P
        assert r["pass_at_k"][str(k)] == pytest.approx(again, abs=1e-12)
    # k = 1 selection rules are a random sample: all equal pass@1 (correctness follows the answer)
    assert r["maj_at_k"]["1"] == pytest.approx(r["pass_at_k"]["1"])
    for s in ("mean_logprob", "self_certainty"):
        assert r["best_of_n"][s]["1"] == pytest.approx(r["pass_at_k"]["1"])
        assert r["weighted_majority"][s]["1"] == pytest.approx(r["pass_at_k"]["1"])
        for k in k_grid(N):
            assert r["best_of_n"][s][str(k)] <= r["pass_at_k"][str(k)] + 1e-12
            assert r["maj_at_k"][str(k)] <= r["pass_at_k"][str(k)] + 1e-12
    # scaling curves over powers of two agree with the k-keyed figures
    assert set(r["scaling"]) >= {"majority", "best_of_n", "best_of_n/self_certainty", "pass_at_k",
                                 "weighted_majority/mean_logprob", "weighted_majority/self_certainty"}
    assert r["best_of_n_scorer"] == "mean_logprob"
    for N_ in powers_of_two(N):
        assert r["scaling"]["majority"][str(N_)] == r["maj_at_k"][str(N_)]
        assert r["scaling"]["best_of_n"][str(N_)] == r["best_of_n"]["mean_logprob"][str(N_)]
    # tokens, lengths, cost
    total = sum(sum(p["lengths"]) for p in r["problems"])
    assert r["tokens"]["total"] == total and r["tokens"]["mean"] == pytest.approx(total / (N * P))
    assert r["response_length"]["mean"] == pytest.approx(r["tokens"]["mean"])
    assert r["cost_of_pass"] == pytest.approx(r["tokens"]["mean"] / r["mean_accuracy"])
    assert r["tokens"]["prompt"] > 0
    acc_diff = r["accuracy_by_difficulty"]
    assert sum(v["n"] for v in acc_diff.values()) == P
    assert r["answer_diversity"]["distinct_answers"] >= 1
    assert r["reward_errors"] == 0


def test_figures_recompute_from_problems(result):
    r = json.loads(json.dumps(result))
    again = summarize(r["problems"], n=N, grid=k_grid(N), pow2=powers_of_two(N), scorers=r["scorers"], seed=r["seed"])
    for key in ("mean_accuracy", "pass_at_k", "mean_at_k", "maj_at_k", "best_of_n", "weighted_majority", "scaling",
                "answer_diversity", "accuracy_by_difficulty", "tokens", "cost_of_pass"):
        expected = {k: v for k, v in r[key].items() if k != "prompt"} if key == "tokens" else r[key]
        assert json.loads(json.dumps(again[key])) == expected, key


def test_same_seed_same_samples_other_seed_differs(tiny, result):
    model, tokenizer, task = tiny
    again = evaluate(model, tokenizer, task, FirstDigitOdd(), n=N, problems=P, seed=3, max_new_tokens=12,
                     batch_prompts=4, scorers=("mean_logprob",), progress=False)
    assert [p["flags"] for p in again["problems"]] == [p["flags"] for p in result["problems"]]
    assert [p["lengths"] for p in again["problems"]] == [p["lengths"] for p in result["problems"]]
    other = evaluate(model, tokenizer, task, FirstDigitOdd(), n=N, problems=P, seed=4, max_new_tokens=12,
                     batch_prompts=4, scorers=("mean_logprob",), progress=False)
    assert [p["lengths"] for p in other["problems"]] != [p["lengths"] for p in result["problems"]]


def test_numeric_reward_reward_model_scorer_and_extra_k(tiny):
    model, tokenizer, task = tiny
    problems = task.problems("test")[:3]
    r = evaluate(model, tokenizer, task, NumericReward(), n=3, problems=problems, max_new_tokens=8, ks=[3],
                 scorers=("reward_model",), reward_model=lambda p, text: float(len(text)), progress=True)
    assert [p["id"] for p in r["problems"]] == [p.id for p in problems]
    assert set(r["best_of_n"]) == {"reward_model"} and set(r["best_of_n"]["reward_model"]) == {"1", "2", "3"}
    assert all(s >= 0 and s == int(s) for p in r["problems"] for s in p["scores"]["reward_model"])  # lengths
    assert all(0 <= v <= 1 for v in r["best_of_n"]["reward_model"].values())
    assert r["correct_from"] == ["correct"]


def test_reward_failures_are_counted(tiny):
    model, tokenizer, task = tiny

    class Flaky(FirstDigitOdd):
        def __call__(self, problem, completions):
            if problem.id == task.problems("test")[1].id:
                raise RuntimeError("boom")
            return super().__call__(problem, completions)

    r = evaluate(model, tokenizer, task, Flaky(), n=2, problems=3, max_new_tokens=6, scorers=("mean_logprob",),
                 progress=False)
    assert r["reward_errors"] >= 1 and "boom" in r["reward_error_examples"][0]["error"]
    assert r["problems"][1]["correct"] == 0


def test_correctness_rules_and_answers():
    assert correct_flags({"correct": [1.0, 0.0]}, [0.0, 5.0]) == ([True, False], "correct")
    comps = {"numeric": [1.0, 0.0], "numeric/correct": [0.0, 1.0], "total": [1.2, 0.2]}
    assert correct_flags(comps, [1.2, 0.2]) == ([False, True], "numeric/correct")
    assert correct_flags({"reward_error": [0.0, 0.0]}, [0.5, -1.0]) == ([True, False], "reward > 0")
    # TTRL majority vote: the reward is a pseudo-label; its logged ground truth decides
    ttrl = {"majority_ratio": [0.5, 0.5], "gt_reward": [0.0, 1.0]}
    assert correct_flags(ttrl, [1.0, 0.0]) == ([False, True], "gt_reward")
    nan = float("nan")
    assert correct_flags({"gt_reward": [nan, nan]}, [1.0, 0.0]) == ([True, False], "reward > 0")
    assert sample_answer({"answer": "0.50"}) == "1/2"
    assert sample_answer({"answer": "0.5", "canonical": "half"}) == "half"
    assert sample_answer({"answer": None}) is None and sample_answer({}) is None and sample_answer(None) is None
    assert sample_answer({"answer": "  "}) is None


def test_invalid_arguments(tiny):
    model, tokenizer, task = tiny
    reward = FirstDigitOdd()
    for kwargs, match in [
        ({"n": 0}, "n .* >= 1"),
        ({"n": 2, "problems": 0}, "problems must be >= 1"),
        ({"n": 2, "problems": 10_000}, "only 200"),
        ({"n": 2, "scorers": ("vibes",)}, "unknown scorer"),
        ({"n": 2, "scorers": ("reward_model",)}, "reward_model="),
        ({"n": 2, "ks": [3]}, r"\[1, n=2\]"),
        ({"n": 2, "temperature": 0.0}, "temperature"),
    ]:
        with pytest.raises(ValueError, match=match):
            evaluate(model, tokenizer, task, reward, progress=False, **kwargs)
    assert k_grid(6) == [1, 2, 4, 6] and k_grid(8, [3]) == [1, 2, 3, 4, 8] and powers_of_two(6) == [1, 2, 4]


def test_single_sample(tiny):
    model, tokenizer, task = tiny
    r = evaluate(model, tokenizer, task, FirstDigitOdd(), n=1, problems=2, max_new_tokens=5, progress=False)
    assert set(r["pass_at_k"]) == set(r["maj_at_k"]) == set(r["best_of_n"]["self_certainty"]) == {"1"}
    assert r["pass_at_k"]["1"] == pytest.approx(r["mean_accuracy"])
    assert set(r["scaling"]["pass_at_k"]) == {"1"}
