"""The ``mixture`` task: train shares follow the weights, tests are kept whole and held out,
problems are tagged with their source, and bad part lists fail when the task is built."""

from __future__ import annotations

from collections import Counter

import pytest

from posttrain.tasks.registry import TASKS, build_task


def add(digits: int, **kw) -> dict:
    return {"name": "multi_digit_arithmetic", "digits": digits, "ops": ["+"], "test_size": 5, "train_size": 10, **kw}


def mixture(*parts: dict, **kw):
    return build_task({"name": "mixture", "parts": list(parts), **kw})


def test_registered():
    assert "mixture" in TASKS


def test_train_shares_follow_the_weights_hand_worked():
    # weights 2:1 over train splits of 10 and 10: the heavier part is the limit -> 10 and 5
    task = mixture(add(2, label="add2", weight=2.0), add(3, label="add3", weight=1.0))
    train = task.problems("train")
    assert Counter(p.source for p in train) == {"add2": 10, "add3": 5}
    # the first n_j problems of each part, in the part's own order
    part3 = build_task(add(3)).problems("train")
    assert [p.id for p in train if p.source == "add3"] != []
    assert {p.id for p in train if p.source == "add3"} == {f"add3/{p.id}" for p in part3[:5]}


def test_train_shares_limited_by_the_smallest_pool():
    task = mixture(add(2, weight=1.0), add(3, train_size=4, weight=1.0))
    assert Counter(p.source for p in task.problems("train")) == {"multi_digit_arithmetic": 4,
                                                                  "multi_digit_arithmetic-2": 4}
    # 1:3 over 10 and 10: 10/3 problems per unit of weight, rounded down -> 3 and 10
    task = mixture(add(2, weight=1), add(3, weight=3))
    assert sorted(Counter(p.source for p in task.problems("train")).values()) == [3, 10]


def test_counts_are_exact_for_decimal_weights():
    # in floats 3 / 0.7 * 0.7 < 3, which would take 2 problems from a part that has 3
    task = mixture(add(2, weight=0.7), add(3, weight=1.4))
    assert task.counts([3, 100]) == [3, 6]
    assert task.counts([10, 10]) == [5, 10]


def test_sources_categories_and_ids():
    task = mixture(add(2, label="easy"), add(4, label="hard"), {"name": "sorting", "test_size": 4, "train_size": 10})
    test = task.problems("test")
    # test: every part's whole test split, round-robin; the shorter part drops out at its end
    assert [p.source for p in test] == ["easy", "hard", "sorting"] * 4 + ["easy", "hard"]
    originals = build_task(add(4)).problems("test")
    assert [p.id for p in test if p.source == "hard"] == [f"hard/{p.id}" for p in originals]
    for p in test + task.problems("train"):
        assert p.id.startswith(f"{p.source}/")
        want = {"easy": "digits=2", "hard": "digits=4"}.get(p.source, f"length={len(p.metadata.get('numbers', []))}")
        assert p.category == want
    train_ids = [p.id for p in task.problems("train")]
    assert len(set(train_ids)) == len(train_ids)
    assert not set(train_ids) & {p.id for p in test}


def test_category_defaults_to_the_label(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(f'{{"question": "What is {i} + 2?", "answer": "{i + 2}"}}\n' for i in range(40)))
    task = mixture({"name": "jsonl", "path": str(path), "label": "file"}, add(2))
    by_source = {p.source: p.category for p in task.problems("test")}
    assert by_source == {"file": "file", "multi_digit_arithmetic": "digits=2"}


def test_deterministic_for_a_seed_and_the_seed_shuffles():
    parts = [add(2, weight=2), add(3)]
    a, b = mixture(*parts, seed=1), mixture(*parts, seed=1)
    assert [p.id for p in a.problems("train")] == [p.id for p in b.problems("train")]
    assert a.problems("test") == b.problems("test")
    other = mixture(*parts, seed=2)
    assert [p.id for p in other.problems("train")] != [p.id for p in a.problems("train")]
    assert sorted(p.id for p in other.problems("train")) == sorted(p.id for p in a.problems("train"))
    # interleaved, not one part after the other
    sources = [p.source for p in a.problems("train")]
    assert sources != sorted(sources) and sources != sorted(sources, reverse=True)


def test_a_prompt_shared_across_train_and_test_is_an_error():
    # the same task twice with another seed: one part's test problems are the other's training problems
    wide = {"name": "arithmetic", "max_operand": 20, "ops": ["+"], "test_size": 20, "train_size": 400}
    task = mixture({**wide, "label": "a"}, {**wide, "seed": 1, "label": "b"})
    assert task.problems("test")  # the test split alone is fine
    with pytest.raises(ValueError, match="is also test problem .* give the parts disjoint knobs"):
        task.problems("train")


def test_part_without_training_problems_is_an_error():
    task = mixture(add(2, weight=1), add(3, weight=0.01))  # 10 * 0.01 < 1: nothing taken
    with pytest.raises(ValueError, match=r"multi_digit_arithmetic-2 \(10 in its train split, 0 taken\)"):
        task.problems("train")


@pytest.mark.parametrize(
    "parts, message",
    [
        ([], r"needs task.parts, a non-empty list"),
        ("countdown", r"needs task.parts, a non-empty list"),
        (["countdown"], r"task.parts\[0\] must be a task config"),
        ([add(2), {"digits": 3}], r"task.parts\[1\] has no 'name': say which task"),
        ([{"name": "no_such_task"}], r"task.parts\[0\]: unknown task 'no_such_task'; available: .*countdown"),
        ([add(2, weight=0)], r"task.parts\[0\] \(multi_digit_arithmetic\) has weight 0: a weight must be a number > 0"),
        ([add(2, weight=-1.5)], r"has weight -1.5"),
        ([add(2, weight="heavy")], r"has weight 'heavy'"),
        ([add(2, weight=float("nan"))], r"has weight nan"),
        ([add(2, label="x"), add(3, label="x")], r"task.parts\[0\] and task.parts\[1\] both have label 'x'"),
        ([add(2, label="")], r"a label must be a non-empty string"),
        ([{"name": "mixture", "parts": [add(2)]}], r"task.parts\[0\] is itself a mixture: mixtures do not nest"),
        ([add(2, bogus=1)], r"task.parts\[0\] \(multi_digit_arithmetic\): task 'multi_digit_arithmetic' has no "
                            r"option\(s\) \['bogus'\]"),
    ],
)
def test_bad_parts_fail_when_built(parts, message):
    with pytest.raises(ValueError, match=message):
        build_task({"name": "mixture", "parts": parts})


def test_input_errors_come_before_any_part_is_built():
    # part 0 would fail only when built (digits out of range); the bad weight of part 1 is reported first
    with pytest.raises(ValueError, match=r"task.parts\[1\] .* has weight 0"):
        mixture(add(99), add(2, weight=0))


def test_default_labels_are_made_unique():
    task = mixture(add(2), add(3), add(4, label="multi_digit_arithmetic-2"), add(5))
    assert task.labels == ["multi_digit_arithmetic", "multi_digit_arithmetic-3", "multi_digit_arithmetic-2",
                           "multi_digit_arithmetic-4"]


def test_unknown_mixture_option():
    with pytest.raises(ValueError, match=r"task 'mixture' has no option\(s\) \['weights'\]"):
        build_task({"name": "mixture", "parts": [add(2)], "weights": [1]})
