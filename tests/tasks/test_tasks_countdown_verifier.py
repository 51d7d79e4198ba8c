"""``check_countdown`` by hand, plus a fuzz: it never raises and never evaluates code."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.tasks.countdown import check_countdown

NUMS = [3, 7, 25, 50]


@pytest.mark.parametrize(
    "expr, target",
    [
        ("50 + 25 + 7", 82),
        ("(50 - 25) * 3", 75),
        ("50 * 3 - 25 + 7", 132),
        ("50 / 25 + 7", 9),  # division
        ("(25 - 7) / 3", 6),
        ("(50 + 25) / 3", 25),
        ("  7 + 3  ", 10),
        ("7 + 3 = 10", 10),  # a trailing "= target" is allowed
        ("50 × 3 − 7", 143),  # unicode operators
        ("50 ÷ 25 + 7", 9),
        ("(((7)))", 7),
        ("50 + 25 + 7", "82"),  # target given as text
    ],
)
def test_valid(expr, target):
    assert check_countdown(expr, NUMS, target)


@pytest.mark.parametrize(
    "expr, target, why",
    [
        ("50 + 25 + 8", 83, "8 is not given"),
        ("50 + 50 - 25", 75, "uses 50 twice"),
        ("7 * 7 + 3", 52, "uses 7 twice"),
        ("50 + 25", 76, "wrong target"),
        ("7 + 3 = 11", 10, "claims the wrong target"),
        ("7 + 3 = 10 = 10", 10, "two equals signs"),
        ("7 / 2", 3, "division is exact, not floor"),
        ("7 // 3 + 50", 52, "floor division not allowed"),
        ("3 ** 2", 9, "power not allowed"),
        ("50 % 7", 1, "modulo not allowed"),
        ("-3 + 10", 7, "unary minus not allowed"),
        ("7.0 + 3", 10, "floats not allowed"),
        ("True + 6", 7, "booleans are not numbers"),
        ("50 / (7 - 7)", 0, "division by zero"),
        ("__import__('os').system('echo hi')", 0, "call"),
        ("__import__('os')", 0, "call"),
        ("x + 3", 3, "names"),
        ("(lambda: 7)()", 7, "lambda"),
        ("[7][0]", 7, "subscript"),
        ("7 if 1 else 3", 7, "conditional"),
        ("3 + 7; 1", 10, "statement"),
        ("", 0, "empty"),
        ("(" * 300 + "7" + ")" * 300, 7, "too deep / too long"),
        ("+".join(["7"] * 400), 2800, "too long"),
    ],
)
def test_invalid(expr, target, why):
    assert not check_countdown(expr, NUMS, target), why


def test_require_all():
    assert check_countdown("50 + 25 + 7 + 3", NUMS, 85, require_all=True)
    assert not check_countdown("50 + 25 + 7", NUMS, 82, require_all=True)
    assert check_countdown("50 + 25 + 7", NUMS, 82)


def test_repeated_given_number_may_be_used_as_often_as_given():
    assert check_countdown("5 * 5 + 1", [5, 5, 1], 26)
    assert not check_countdown("5 * 5 * 5", [5, 5, 1], 125)


def test_bad_target_or_numbers_is_false_not_an_error():
    assert not check_countdown("7 + 3", NUMS, "ten")
    assert not check_countdown(None, NUMS, 10)  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_never_raises_on_arbitrary_text(text):
    assert check_countdown(text, NUMS, 10) in (True, False)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(NUMS), min_size=1, max_size=4, unique=True), st.lists(st.sampled_from("+-*"), min_size=3, max_size=3))
def test_agrees_with_python_on_valid_expressions(nums, ops):
    expr = str(nums[0])
    for op, n in zip(ops, nums[1:]):
        expr += f" {op} {n}"
    assert check_countdown(expr, NUMS, eval(expr))
    assert not check_countdown(expr, NUMS, eval(expr) + 1)
