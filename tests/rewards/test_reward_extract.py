"""Answer extraction edge cases."""

import pytest

from posttrain.rewards.extract import (
    answer_phrase,
    answer_tag,
    choice_letter,
    clean_answer,
    extract_answer,
    last_boxed,
    last_number,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"first \boxed{1} then \boxed{2}", "2"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),
        (r"\boxed{a^{b^{c}}}", "a^{b^{c}}"),
        (r"\boxed 5 apples", "5"),
        (r"\fbox{7}", "7"),
        (r"$\boxed{ -3 }$", "-3"),
        (r"\boxed{}", None),
        ("no box here", None),
        (r"\boxed{3} and a truncated \boxed{\frac{1}{", "3"),
        (r"\boxed{\frac{1}{", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("the total is 42", "42"),
        ("it is -3 degrees", "-3"),
        ("\u22125 below zero", "-5"),
        ("x-3 = 5 so 7", "7"),
        ("5-3", "3"),
        ("we get 1,234,567 apples", "1234567"),
        ("costs $1,000.50 total", "1000.50"),
        ("about 3.75 m", "3.75"),
        ("that is .5 of it", "0.5"),
        ("so 3/4 of the cake", "3/4"),
        ("tiny: 1e-3", "1e-3"),
        ("lists 1,2", "2"),
        ("sentence ends with 12.", "12"),
        ("no digits", None),
        ("", None),
    ],
)
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_answer_tag_and_phrase():
    assert answer_tag("<think>2+2</think><answer> 4 </answer>") == "4"
    assert answer_tag(r"<answer>so \boxed{9}</answer>") == "9"
    assert answer_tag("<answer></answer>") is None
    assert answer_tag("<answer>1</answer> then <answer>2</answer>") == "2"
    assert answer_phrase("Answer: 42.") == "42"
    assert answer_phrase(r"The final answer is $\frac{3}{4}$, as computed.") == r"\frac{3}{4}"
    assert answer_phrase("so the answer is 12 because of that") == "12"
    assert answer_phrase("nothing") is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The answer is (B).", "B"),
        ("Answer: C", "C"),
        (r"\boxed{D}", "D"),
        (r"\boxed{\text{(E)}}", "E"),
        ("I think it's (A) or maybe (C)", "C"),
        ("the answer is a fraction", None),
        ("no choice", None),
    ],
)
def test_choice_letter(text, expected):
    assert choice_letter(text) == expected


def test_auto_precedence_and_none():
    # boxed beats everything; tag beats phrase; phrase beats last number
    assert extract_answer(r"Answer: 3. Actually \boxed{4}. Then 5") == "4"
    assert extract_answer("<answer>7</answer> and 8") == "7"
    assert extract_answer("Answer: 6, not 9") == "6"
    # free text after an answer phrase does not become an answer ("unclear" must not vote)
    assert extract_answer("the answer is unclear") is None
    assert extract_answer("the answer is unclear but 7") == "7"
    assert extract_answer("") is None
    assert extract_answer(None) is None
    assert extract_answer("nothing numeric") is None
    assert extract_answer("values 1 and 2", mode="boxed") is None
    assert extract_answer(r"\boxed{2} but 3", mode="last_number") == "3"
    with pytest.raises(ValueError, match="allowed"):
        extract_answer("x", mode="nope")


def test_clean_answer():
    assert clean_answer("  $42$. ") == "42"
    assert clean_answer(r"\(x+1\)") == "x+1"
    assert clean_answer(r"\boxed{5}") == "5"
    assert clean_answer("**7**") == "7"
    assert clean_answer("   ") is None
    assert clean_answer("$$") is None
