"""GSM8K ``####`` and MATH ``\\boxed{}`` reference-answer extraction."""

from __future__ import annotations

import pytest

from posttrain.tasks.answers import boxed_answer, gsm8k_answer


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
        ("so it costs 1,234 dollars\n#### 1,234", "1234"),
        ("#### -5", "-5"),
        ("#### $18.50.", "18.50"),
        ("#### 7 apples", "7"),
        ("first #### 3\nthen #### 4", "4"),
        ("#### 1,000,000", "1000000"),
    ],
)
def test_gsm8k(text, expected):
    assert gsm8k_answer(text) == expected


def test_gsm8k_without_marker():
    assert gsm8k_answer("the answer is 42") is None
    assert gsm8k_answer("####   ") is None


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so $x = \boxed{5}$.", "5"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"first \boxed{1} then \boxed{2}", "2"),
        (r"\boxed{\left\{ 1, 2 \right\}}", r"\left\{ 1, 2 \right\}"),
        (r"$\boxed{x^{2}+\sqrt{3}}$", r"x^{2}+\sqrt{3}"),
        (r"\fbox{7}", "7"),
        (r"\boxed 5$", "5"),
        (r"done: \boxed{3} and a truncated \boxed{4", "3"),
        (r"\boxed{ 12 }", "12"),
    ],
)
def test_boxed(text, expected):
    assert boxed_answer(text) == expected


def test_boxed_missing():
    assert boxed_answer("no box here") is None
    assert boxed_answer(r"\boxed{") is None
    assert boxed_answer(r"\boxed{}") is None
