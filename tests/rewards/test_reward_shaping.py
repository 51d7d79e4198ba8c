"""Format, length, DAPO overlong and composite rewards."""

import pytest

from posttrain.rewards.math import NumericReward
from posttrain.rewards.shaping import (
    CompositeReward,
    FormatReward,
    LengthReward,
    OverlongReward,
    ThinkFormatReward,
    measure_length,
    overlong_penalty,
)
from posttrain.tasks.base import Problem

P = Problem(id="p", prompt="q", answer="4")


def test_format_reward():
    r = FormatReward(r"^\d+$", match="fullmatch", value=0.5)
    out = r(P, ["42", " 42 \n", "42 apples", ""])
    assert out.rewards == [0.5, 0.5, 0.0, 0.0]
    assert out.components["format"] == [1.0, 1.0, 0.0, 0.0]
    assert FormatReward(r"\d")(P, ["a1", "b"]).rewards == [1.0, 0.0]
    with pytest.raises(ValueError):
        FormatReward("x", match="prefix")


@pytest.mark.parametrize(
    "text, ok",
    [
        ("<think>2+2=4</think><answer>4</answer>", True),
        ("  <think>\nlong\nthought\n</think>\n\n<answer> 4 </answer>\n", True),
        ("<think></think><answer>4</answer>", True),
        ("<answer>4</answer>", False),
        ("<think>x</think>", False),
        ("<think>x</think><answer></answer>", False),
        ("<think>x</think><answer>4</answer> trailing text", False),
        ("preamble <think>x</think><answer>4</answer>", False),
        ("<think>x</think><answer>4</answer><answer>5</answer>", False),
        ("<think>a<think>b</think><answer>4</answer>", False),
        ("<answer>4</answer><think>x</think>", False),
    ],
)
def test_think_format(text, ok):
    assert ThinkFormatReward()(P, [text]).rewards == [1.0 if ok else 0.0]


def test_length_reward_target_and_budget():
    tgt = LengthReward(target=10)
    assert tgt(P, ["x" * 10, "x" * 5, "x" * 15, "x" * 40]).rewards == [0.0, -0.5, -0.5, -1.0]
    bud = LengthReward(budget=10, scale=2.0)
    out = bud(P, ["x" * 3, "x" * 10, "x" * 15, "x" * 100])
    assert out.rewards == [0.0, 0.0, -1.0, -2.0]
    assert out.components["length"] == [3.0, 10.0, 15.0, 100.0]
    with pytest.raises(ValueError):
        LengthReward()
    with pytest.raises(ValueError):
        LengthReward(target=5, budget=5)


def test_overlong_penalty_by_hand():
    # Lmax = 20, Lcache = 8 -> buffer starts after 12
    f = lambda n: overlong_penalty(n, 20, 8, factor=1.0)  # noqa: E731
    assert f(0) == 0.0 and f(12) == 0.0
    assert f(13) == pytest.approx(-1 / 8)
    assert f(16) == pytest.approx(-0.5)
    assert f(20) == pytest.approx(-1.0)
    assert f(21) == -1.0 and f(10_000) == -1.0
    assert overlong_penalty(16, 20, 8, factor=0.5) == pytest.approx(-0.25)
    # the DAPO setting: 16384 + 4096 buffer
    assert overlong_penalty(16384, 20480, 4096) == 0.0
    assert overlong_penalty(18432, 20480, 4096) == pytest.approx(-0.5)
    with pytest.raises(ValueError):
        overlong_penalty(1, 10, 11)


def test_overlong_reward_counts_tokens_with_a_tokenizer():
    words = lambda s: s.split()  # noqa: E731  a "tokenizer": one token per word
    r = OverlongReward(max_length=4, cache_length=2, tokenizer=words)
    out = r(P, ["a b", "a b c", "a b c d", "a b c d e f"])
    assert out.rewards == [0.0, -0.5, -1.0, -1.0]
    assert out.components["length"] == [2.0, 3.0, 4.0, 6.0]

    class HFLike:
        def encode(self, text, add_special_tokens=True):
            return [0] * len(text) + ([1] if add_special_tokens else [])

    assert measure_length("abc", HFLike()) == 3
    assert measure_length("abc", lambda s: 7) == 7
    assert measure_length("abc", lambda s: {"input_ids": [1, 2]}) == 2
    assert measure_length("abc") == 3


def test_composite_weights_and_logs_every_component():
    r = CompositeReward(
        [(NumericReward(), 1.0), (FormatReward(r"^\d+$", match="fullmatch"), 0.1), (LengthReward(budget=3), 0.5)]
    )
    out = r(P, ["4", "the answer is 4", "5"])
    assert out.components["numeric"] == [1.0, 1.0, 0.0]
    assert out.components["format"] == [1.0, 0.0, 1.0]
    assert out.components["length"] == [0.0, -1.0, 0.0]
    assert out.components["numeric/correct"] == [1.0, 1.0, 0.0]
    assert out.components["length/length"] == [1.0, 15.0, 1.0]
    assert out.rewards == pytest.approx([1.1, 0.5, 0.1])
    assert out.components["total"] == out.rewards
    assert out.info[0]["answer"] == "4" and out.info[0]["numeric"] == {"answer": "4"}


def test_composite_duplicate_names_and_validation():
    r = CompositeReward([(FormatReward("a"), 1.0), (FormatReward("b"), 2.0)])
    out = r(P, ["ab", "b"])
    assert out.components["format"] == [1.0, 0.0] and out.components["format_2"] == [1.0, 1.0]
    assert out.rewards == [3.0, 2.0]
    with pytest.raises(ValueError):
        CompositeReward([])
    with pytest.raises(ValueError):
        CompositeReward([(FormatReward("a"), float("nan"))])
