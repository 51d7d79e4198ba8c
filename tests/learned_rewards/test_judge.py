"""LLM-as-judge: probability-weighted rating over the rating tokens (G-Eval style)."""

import math

import pytest
import torch

from posttrain.models.tiny import tiny_model_and_tokenizer
from posttrain.rewards.learned import JudgeReward
from posttrain.rewards.registry import build_reward
from posttrain.tasks.base import Problem

PROBLEM = Problem(id="p", prompt="What is 3 + 4?", answer="7")


def biased_model(bias: dict[str, float]):
    """A tiny model whose next-token logits are a fixed bias: lm_head = 0·h + b."""
    model, tok = tiny_model_and_tokenizer()
    V, H = model.config.vocab_size, model.config.hidden_size
    head = torch.nn.Linear(H, V, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        for text, value in bias.items():
            (tid,) = tok(text, add_special_tokens=False).input_ids
            head.bias[tid] = value
    model.lm_head = head
    return model.eval(), tok


@pytest.mark.parametrize("scale", [5, 10])
def test_random_judge_probabilities_sum_to_one(scale):
    judge = build_reward({"type": "judge", "model": "tiny-random", "scale": scale})
    out = judge(PROBLEM, ["7", "The answer is 8.", ""])
    for score, info in zip(out.rewards, out.info):
        assert sum(info["judge_probs"]) == pytest.approx(1.0, abs=1e-5)
        assert len(info["judge_probs"]) == scale
        assert 1 / scale <= score <= 1
        assert 0 < info["judge_mass"] <= 1
        assert score == pytest.approx(info["judge_rating"] / scale)
    assert out.components["judge_score"] == out.rewards


def test_rating_seven_dominates():
    model, tok = biased_model({"7": 20.0})
    judge = JudgeReward.from_model(model, tok, scale=10)
    out = judge(PROBLEM, ["7", "eight"])
    assert out.rewards == pytest.approx([0.7, 0.7], abs=1e-3)
    assert out.info[0]["judge_probs"][6] > 0.99


def test_multi_token_rating_ten_is_exact():
    # Character tokenizer: "10" is "1","0". With logits fixed by a bias, p(next) is the same
    # softmax everywhere, so P(10) = p1*p0, P(1) = p1*(1 - p0), P(2..9) = p_other each.
    model, tok = biased_model({"1": 6.0, "0": 5.0})
    judge = JudgeReward.from_model(model, tok, scale=10)
    V = model.config.vocab_size
    Z = math.exp(6) + math.exp(5) + (V - 2)
    p1, p0, po = math.exp(6) / Z, math.exp(5) / Z, 1 / Z
    P = {1: p1 * (1 - p0), 10: p1 * p0, **{r: po for r in range(2, 10)}}
    total = sum(P.values())
    expected = sum(r * p for r, p in P.items()) / total / 10
    out = judge(PROBLEM, ["7"])
    assert out.rewards[0] == pytest.approx(expected, rel=1e-6)
    assert out.info[0]["judge_mass"] == pytest.approx(total, rel=1e-6)
    assert out.info[0]["judge_probs"][9] == pytest.approx(P[10] / total, abs=1e-6)


def test_score_does_not_depend_on_batching():
    judge = build_reward({"type": "judge", "model": "tiny-random", "scale": 10, "batch_size": 1})
    judge8 = build_reward({"type": "judge", "model": "tiny-random", "scale": 10, "batch_size": 8})
    texts = ["7", "a much longer answer that says the result is 7", "x"]
    assert judge(PROBLEM, texts).rewards == pytest.approx(judge8(PROBLEM, texts).rewards, abs=1e-6)


def test_template_fields_and_errors():
    judge = JudgeReward("tiny-random", template="Q: {prompt} A: {completion} gold={reference} /{scale} {other}",
                        scale=5)
    # fields are filled once: a completion containing "{prompt}" is left as written
    assert judge.render(PROBLEM, "I say {prompt}") == "Q: What is 3 + 4? A: I say {prompt} gold=7 /5 {other}"
    with pytest.raises(ValueError, match="must contain"):
        JudgeReward("tiny-random", template="no slot")
    with pytest.raises(ValueError, match="scale"):
        JudgeReward("tiny-random", scale=1)
    with pytest.raises(ValueError, match="unknown model"):
        build_reward({"type": "judge", "model": "no-such-model"})
