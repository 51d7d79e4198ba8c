"""Math equivalence (fast numeric path + math_verify), canonical keys, Math/Numeric rewards."""

import threading
from fractions import Fraction

import pytest

from posttrain.rewards import math as rmath
from posttrain.rewards.math import (
    MathReward,
    NumericReward,
    answers_equivalent,
    canonical_answer,
    compare_answers,
    parse_number,
)
from posttrain.tasks.base import Problem


@pytest.mark.parametrize(
    "pred, gold",
    [
        (r"\frac{1}{2}", "0.5"),
        ("1/2", r"\frac{1}{2}"),
        (r"\frac12", "0.5"),
        (r"\dfrac{1}{2}", "1/2"),
        ("0.50", "1/2"),
        ("-3", "-3.0"),
        (r"-\frac{3}{4}", "-0.75"),
        ("1,000", "1000"),
        ("1{,}000", "1000"),
        ("1e-3", "0.001"),
        (r"\{1,2\}", r"\{2,1\}"),
        ("[1,2)", "[1,2)"),
        (r"\sqrt{2}/2", r"\frac{\sqrt2}{2}"),
        ("x^2+1", "1+x^2"),
        ("x = 3", "3"),
        (r"5 \text{ cm}", "5"),
        ("30^\\circ", "30"),
        ("(B)", "B"),
        (r"\text{(C)}", "C"),
        ("0.3333333", r"\frac{1}{3}"),  # within tol=1e-6
    ],
)
def test_equivalent_forms(pred, gold):
    info = {}
    assert answers_equivalent(pred, gold, info=info), info
    assert "error" not in info


@pytest.mark.parametrize(
    "pred, gold",
    [
        ("0.5001", "1/2"),
        ("1000000", "1000001"),  # integers compare exactly: no relative tolerance
        ("-3", "3"),
        ("[1,2)", "(1,2]"),  # intervals: open/closed ends matter
        (r"\{1,2\}", r"\{1,3\}"),
        ("A", "B"),
        ("x^2", "x^3"),
        ("0.333", r"\frac13"),
    ],
)
def test_not_equivalent(pred, gold):
    assert not answers_equivalent(pred, gold)


def test_malformed_and_missing_never_raise():
    info = {}
    assert answers_equivalent(r"\frac{1}{", "0.5", info=info) is False
    assert info.get("parse_failed") == "pred"
    assert answers_equivalent(None, "1") is False
    assert answers_equivalent("", "1") is False
    assert answers_equivalent("   ", "1") is False
    info = {}
    assert answers_equivalent("1", "", info=info) is False and info["error"] == "empty gold answer"
    info = {}
    assert answers_equivalent("9" * 5000, "1", info=info) is False
    assert "longer than" in info["error"]
    for junk in [r"\left(", "}{", r"\frac{}{}", "$$$", r"\sqrt", "((((", "1/0", r"\frac{1}{0}"]:
        answers_equivalent(junk, "1")  # must not raise


def test_math_verify_exception_is_recorded_not_raised(monkeypatch):
    import math_verify

    rmath._mv_parse.cache_clear()

    def boom(*a, **k):
        raise RuntimeError("parser exploded")

    monkeypatch.setattr(math_verify, "parse", boom)
    info = {}
    assert answers_equivalent(r"\sqrt{2}", r"\sqrt{3}", info=info) is False
    assert "RuntimeError" in info["error"] and "parser exploded" in info["error"]
    rmath._mv_parse.cache_clear()


def test_math_verify_timeout_is_recorded():
    # a tower of exponents sends sympy off for a long time: the guard stops it
    cmp = compare_answers("10^{10^{10}}", "7", timeout_s=1)
    assert cmp.equivalent is False
    assert cmp.error is not None and "Timeout" in cmp.error


def test_off_main_thread_runs_without_signal_timeout():
    out = {}

    def work():
        info = {}
        out["eq"] = answers_equivalent(r"\sqrt{8}", r"2\sqrt{2}", info=info)
        out["info"] = info

    t = threading.Thread(target=work)
    t.start()
    t.join(60)
    assert out["eq"] is True
    assert out["info"].get("timeout_guard") is False


def test_parse_number():
    assert parse_number(r"\frac12") == Fraction(1, 2)
    assert parse_number(r"\frac{-1}{2}") == Fraction(-1, 2)
    assert parse_number("-1,234") == -1234
    assert parse_number("1,234,567.5") == Fraction(2469135, 2)
    assert parse_number("1/0") is None
    assert parse_number("1e999999") is None  # refuses to expand huge exponents
    assert parse_number("x+1") is None
    assert parse_number("1,2") is None  # not a thousands separator
    assert parse_number(None) is None


def test_canonical_answer_keys():
    assert canonical_answer(r"\frac12") == canonical_answer("1/2") == canonical_answer("0.5") == "1/2"
    assert canonical_answer(r"\dfrac{1}{2}") == canonical_answer("$0.50$") == "1/2"
    assert canonical_answer("1,000") == canonical_answer("1000.0") == "1000"
    assert canonical_answer("-3") == "-3"
    assert canonical_answer("(B)") == canonical_answer(r"\text{B}") == "B"
    assert canonical_answer(r"x + 1") == canonical_answer("x+1")
    assert canonical_answer("") is None and canonical_answer(None) is None and canonical_answer("  $ $ ") is None


def _p(answer):
    return Problem(id="p", prompt="q", answer=answer)


def test_math_reward():
    r = MathReward()
    out = r(_p("1/2"), [r"so \boxed{\frac{1}{2}}", "it is 0.5", r"\boxed{0.6}", "no idea", r"\boxed{\frac{1}{"])
    assert out.rewards == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert out.components["correct"] == out.rewards
    assert [i["answer"] for i in out.info] == [r"\frac{1}{2}", "0.5", "0.6", None, "1"]
    with pytest.raises(ValueError, match="no option|allowed"):
        MathReward(extractor="nope")
    with pytest.raises(ValueError, match="answer"):
        r(_p(None), ["1"])


def test_math_reward_extractor_modes():
    text = r"<answer>3</answer> so \boxed{4}"
    assert MathReward(extractor="answer_tag")(_p("3"), [text]).rewards == [1.0]
    assert MathReward(extractor="boxed")(_p("3"), [text]).rewards == [0.0]
    assert MathReward(extractor="last_number")(_p("4"), [text]).rewards == [1.0]


def test_numeric_reward():
    r = NumericReward()
    out = r(_p("12"), ["12", "the answer is 12.", "1,2", "12.0", "-12", "13", "", "x"])
    assert out.rewards == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert NumericReward()(_p("-1234"), ["so -1,234"]).rewards == [1.0]
    with pytest.raises(ValueError, match="numeric"):
        r(_p("x+1"), ["1"])
