"""Procedural generators: determinism, disjoint splits, answers recomputed independently,
difficulty knobs."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from posttrain.tasks.base import Problem, TaskSource
from posttrain.tasks.countdown import CountdownTask, check_countdown
from posttrain.tasks.procedural import (
    ListOpsTask,
    LogicTask,
    SortingTask,
    multi_digit_arithmetic,
    normalize_list_answer,
)
from posttrain.tasks.registry import TASKS, build_task

SMALL = {"test_size": 40, "train_size": 300}

GENERATORS = {
    "countdown": lambda **kw: CountdownTask(**{**SMALL, **kw}),
    "sorting": lambda **kw: SortingTask(**{**SMALL, **kw}),
    "list_ops": lambda **kw: ListOpsTask(**{**SMALL, **kw}),
    "logic_boolean": lambda **kw: LogicTask(kind="boolean", **{**SMALL, **kw}),
    "logic_knights": lambda **kw: LogicTask(kind="knights", **{**SMALL, **kw}),
}


def _numbers(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"-?\d+", text)]


# ----------------------------------------------------------------------------- generic properties


@pytest.mark.parametrize("gen", sorted(GENERATORS))
def test_deterministic_for_a_seed(gen):
    a, b = GENERATORS[gen](seed=3), GENERATORS[gen](seed=3)
    for split in ("train", "test"):
        pa, pb = a.problems(split), b.problems(split)
        assert pa == pb
        assert [p.prompt for p in pa] == [p.prompt for p in pb]
        assert [p.metadata for p in pa] == [p.metadata for p in pb]


@pytest.mark.parametrize("gen", sorted(GENERATORS))
def test_sizes_protocol_and_disjoint_splits(gen):
    task = GENERATORS[gen]()
    assert isinstance(task, TaskSource)
    train, test = task.problems("train"), task.problems("test")
    assert len(test) == SMALL["test_size"] and len(train) == SMALL["train_size"]
    assert all(isinstance(p, Problem) and p.answer for p in train + test)
    assert len({p.id for p in train}) == len(train) and len({p.id for p in test}) == len(test)
    assert not {p.id for p in train} & {p.id for p in test}
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    with pytest.raises(ValueError, match="unknown split"):
        task.problems("validation")


@pytest.mark.parametrize("gen", sorted(GENERATORS))
def test_seeds_differ_but_never_leak_test_problems(gen):
    a, b = GENERATORS[gen](seed=0), GENERATORS[gen](seed=1)
    assert [p.id for p in a.problems("train")] != [p.id for p in b.problems("train")]
    # split membership depends on the problem only: seed 1 never trains on seed 0's test set
    assert not {p.prompt for p in a.problems("test")} & {p.prompt for p in b.problems("train")}
    assert not {p.prompt for p in b.problems("test")} & {p.prompt for p in a.problems("train")}


@pytest.mark.parametrize("gen", sorted(GENERATORS))
def test_test_split_does_not_depend_on_train_size(gen):
    small = GENERATORS[gen](train_size=50)
    large = GENERATORS[gen](train_size=400)
    assert small.problems("test") == large.problems("test")
    assert large.problems("train")[:50] == small.problems("train")


def test_problems_returns_a_copy():
    task = SortingTask(**SMALL)
    task.problems("train").clear()
    assert len(task.problems("train")) == SMALL["train_size"]


def test_too_small_space_is_a_clear_error():
    task = SortingTask(min_length=1, max_length=1, min_value=0, max_value=5, test_size=20, train_size=10)
    with pytest.raises(ValueError, match="too small"):
        task.problems("test")


# ----------------------------------------------------------------------------- answers


def test_sorting_answers():
    for order in ("ascending", "descending", "mixed"):
        task = SortingTask(order=order, **SMALL)
        seen_orders = set()
        for p in task.problems("train") + task.problems("test"):
            head, tail = p.prompt.split(":", 1)
            values = _numbers(tail.split(".")[0])
            desc = "descending" in head
            seen_orders.add(desc)
            assert p.answer == ", ".join(map(str, sorted(values, reverse=desc)))
            assert p.difficulty == len(values)
        assert seen_orders == ({True, False} if order == "mixed" else {order == "descending"})


def test_sorting_negative_values():
    task = SortingTask(min_value=-50, max_value=50, **SMALL)
    p = next(p for p in task.problems("train") if "-" in p.prompt.split(":", 1)[1])
    values = _numbers(p.prompt.split(":", 1)[1].split(".")[0])
    assert p.answer == ", ".join(map(str, sorted(values)))


def test_list_ops_answers():
    task = ListOpsTask(ops=["reverse", "max", "min", "sum", "length"], **SMALL)
    kinds = set()
    for p in task.problems("train") + task.problems("test"):
        values = _numbers(p.prompt.split(":", 1)[1])
        text = p.prompt
        if text.startswith("Reverse"):
            kinds.add("reverse")
            assert p.answer == ", ".join(map(str, reversed(values)))
        elif "largest" in text:
            kinds.add("max")
            assert p.answer == str(max(values))
        elif "smallest" in text:
            kinds.add("min")
            assert p.answer == str(min(values))
        elif "sum" in text:
            kinds.add("sum")
            assert p.answer == str(sum(values))
        else:
            kinds.add("length")
            assert "How many" in text and p.answer == str(len(values))
        assert p.difficulty == len(values)
    assert kinds == {"reverse", "max", "min", "sum", "length"}


def test_countdown_answers_are_solvable():
    task = CountdownTask(**SMALL)
    for p in task.problems("train") + task.problems("test"):
        shown = _numbers(p.prompt.split("equals")[0])
        target = int(p.answer)
        assert shown == p.metadata["numbers"] and target == p.metadata["target"]
        assert target == _numbers(p.prompt.split("equals")[1])[0]
        solution = p.metadata["solution"]
        assert sorted(_numbers(solution)) == sorted(shown)  # the generator uses every number once
        assert eval(solution, {"__builtins__": {}}) == target  # independent check: plain Python
        assert check_countdown(solution, shown, target, require_all=True)
        assert 3 <= len(shown) <= 4 and p.difficulty == len(shown)
        assert 1 <= target <= 100 and target not in shown


def _knights_brute_force(prompt: str) -> str:
    """Re-derive the knights from the prompt text alone."""
    names = re.search(r"inhabitants: (.*)\.\n", prompt).group(1).replace(" and ", ", ").split(", ")
    said = dict(re.findall(r'^(\w+) says: "(.*)"$', prompt, re.M))
    assert sorted(said) == sorted(names)

    def clause(speaker, text):
        m = re.fullmatch(r"(?:I am|(\w+) is) a (knight|knave)", text, re.I)
        if m:
            who = m.group(1) or speaker
            return lambda k: k[who] == (m.group(2) == "knight")
        m = re.fullmatch(r"(\w+) and (\w+) are of (the same kind|different kinds)", text)
        assert m, text
        a, b = (speaker if w == "I" else w for w in m.group(1, 2))
        same = m.group(3) == "the same kind"
        return lambda k: (k[a] == k[b]) == same

    def statement(speaker, text):
        text = text.rstrip(".")
        for conj in (" and ", " or "):
            parts = re.split(r"(?:(?<=knight)|(?<=knave))" + conj, text)
            if len(parts) == 2:
                f, g = clause(speaker, parts[0]), clause(speaker, parts[1])
                return (lambda k: f(k) and g(k)) if conj == " and " else (lambda k: f(k) or g(k))
        return clause(speaker, text)

    checks = {n: statement(n, said[n]) for n in names}
    solutions = []
    for values in itertools.product((True, False), repeat=len(names)):
        k = dict(zip(names, values))
        if all(checks[n](k) == k[n] for n in names):
            solutions.append([n for n in names if k[n]])
    assert len(solutions) == 1, prompt
    return ", ".join(solutions[0]) or "none"


@pytest.mark.parametrize("people", [2, 3, 5])
def test_knights_answers_unique_and_correct(people):
    task = LogicTask(kind="knights", num_people=people, test_size=30, train_size=60)
    problems = task.problems("train") + task.problems("test")
    for p in problems:
        assert p.answer == _knights_brute_force(p.prompt)
        assert p.difficulty == people
    answers = {p.answer for p in problems}
    assert len(answers) > 3  # not one degenerate answer


def test_boolean_answers_and_balance():
    task = LogicTask(kind="boolean", depth=4, num_vars=4, **SMALL)
    problems = task.problems("train") + task.problems("test")
    for p in problems:
        m = re.match(r"Let (.*)\. What is the value of the expression `(.*)`\?", p.prompt)
        env = {k: v == "True" for k, v in re.findall(r"([A-Z]) = (True|False)", m.group(1))}
        assert p.answer == str(eval(m.group(2), {"__builtins__": {}}, env))
        assert p.difficulty == 4
    share_true = sum(p.answer == "True" for p in problems) / len(problems)
    assert 0.4 < share_true < 0.6


def test_multi_digit_arithmetic():
    task = multi_digit_arithmetic(digits=3, test_size=20, train_size=100)
    assert task.name == "multi_digit_arithmetic"
    for p in task.problems("train") + task.problems("test"):
        a, op, b = re.match(r"What is (\d+) ([-+*]) (\d+)\?", p.prompt).groups()
        assert len(a) == 3 and len(b) == 3
        assert p.answer == str(eval(f"{a}{op}{b}"))
    assert not {p.id for p in task.problems("train")} & {p.id for p in task.problems("test")}


# ----------------------------------------------------------------------------- categories


def test_multi_digit_arithmetic_category_is_the_width():
    for digits in (1, 2, 4):
        task = multi_digit_arithmetic(digits=digits, test_size=10, train_size=50)
        for p in task.problems("train") + task.problems("test"):
            widths = {len(x) for x in re.findall(r"\d+", p.metadata["expr"])}
            assert widths == {digits} and p.category == f"digits={digits}"


def test_arithmetic_category_follows_each_problem_widest_operand():
    task = build_task({"name": "arithmetic", "min_operand": 0, "max_operand": 150, "ops": ["+"],
                       "test_size": 50, "train_size": 3000})
    problems = task.problems("train") + task.problems("test")
    for p in problems:
        assert p.category == f"digits={max(len(x) for x in re.findall(r'[0-9]+', p.metadata['expr']))}"
    assert {p.category for p in problems} == {"digits=1", "digits=2", "digits=3"}


def test_generator_categories_follow_their_knob():
    sorting = SortingTask(min_length=2, max_length=4, **SMALL).problems("train")
    assert all(p.category == f"length={len(p.metadata['numbers'])}" for p in sorting)
    assert {p.category for p in sorting} == {"length=2", "length=3", "length=4"}
    lists = ListOpsTask(min_length=3, max_length=5, **SMALL).problems("test")
    assert all(p.category == f"length={len(p.metadata['numbers'])}" for p in lists)
    countdown = CountdownTask(min_numbers=3, max_numbers=4, **SMALL).problems("train")
    assert all(p.category == f"numbers={len(p.metadata['numbers'])}" for p in countdown)
    assert {p.category for p in countdown} == {"numbers=3", "numbers=4"}
    assert {p.category for p in LogicTask(kind="boolean", depth=2, **SMALL).problems("test")} == {"depth=2"}
    knights = LogicTask(kind="knights", num_people=3, test_size=5, train_size=10).problems("test")
    assert {p.category for p in knights} == {"num_people=3"}


# ----------------------------------------------------------------------------- difficulty knobs


def test_sorting_length_knob():
    short = SortingTask(min_length=2, max_length=3, **SMALL).problems("train")
    long = SortingTask(min_length=10, max_length=12, **SMALL).problems("train")
    assert {p.difficulty for p in short} == {2.0, 3.0}
    assert {p.difficulty for p in long} == {10.0, 11.0, 12.0}
    assert all(len(_numbers(p.prompt.split(":", 1)[1])) == p.difficulty for p in long)


def test_list_ops_knobs():
    task = ListOpsTask(ops=["sum"], min_length=6, max_length=6, min_value=100, max_value=999, **SMALL)
    for p in task.problems("train"):
        values = _numbers(p.prompt.split(":", 1)[1])
        assert len(values) == 6 and all(100 <= v <= 999 for v in values)


def test_countdown_knobs():
    easy = CountdownTask(min_numbers=2, max_numbers=2, max_number=10, max_target=30, test_size=5, train_size=50)
    hard = CountdownTask(min_numbers=5, max_numbers=5, max_number=100, max_target=1000, ops=["+", "*"], **SMALL)
    for p in easy.problems("train"):
        assert len(p.metadata["numbers"]) == 2 and max(p.metadata["numbers"]) <= 10 and int(p.answer) <= 30
    for p in hard.problems("train"):
        assert len(p.metadata["numbers"]) == 5 and p.difficulty == 5
        assert not re.search(r"[-/]", p.metadata["solution"])


def test_logic_depth_knob():
    shallow = LogicTask(depth=1, num_vars=6, test_size=5, train_size=20).problems("train")
    deep = LogicTask(depth=5, num_vars=3, test_size=5, train_size=20).problems("train")
    assert max(p.prompt.count("(") for p in shallow) == 0
    assert min(p.prompt.count(" and ") + p.prompt.count(" or ") + p.prompt.count("not ") for p in deep) >= 5


@pytest.mark.parametrize(
    "cls, bad, key",
    [
        (SortingTask, {"order": "random"}, "task.order"),
        (SortingTask, {"min_length": 5, "max_length": 2}, "task.min_length"),
        (ListOpsTask, {"ops": ["median"]}, "task.ops"),
        (CountdownTask, {"ops": ["**"]}, "task.ops"),
        (CountdownTask, {"min_numbers": 1}, "task.min_numbers"),
        (CountdownTask, {"min_number": 0}, "task.min_number"),
        (CountdownTask, {"template": "no placeholders"}, "task.template"),
        (LogicTask, {"kind": "sudoku"}, "task.kind"),
        (LogicTask, {"num_people": 9}, "task.num_people"),
        (SortingTask, {"test_fraction": 1.5}, "task.test_fraction"),
        (SortingTask, {"test_size": 0}, "task.test_size"),
    ],
)
def test_config_errors_name_the_key(cls, bad, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        cls(**bad)


# ----------------------------------------------------------------------------- registry

ALL_NAMES = {
    "arithmetic", "multi_digit_arithmetic", "countdown", "sorting", "list_ops", "logic",
    "reasoning_gym", "jsonl", "hf_local", "gsm8k_jsonl", "math_jsonl", "humaneval",
}  # fmt: skip


def test_registry_has_every_task():
    assert ALL_NAMES <= set(TASKS)


@pytest.mark.parametrize("name", ["countdown", "sorting", "list_ops", "logic", "multi_digit_arithmetic"])
def test_registry_builds_procedural(name):
    task = build_task({"name": name, "test_size": 5, "train_size": 20, "seed": 2})
    assert len(task.problems("test")) == 5 and len(task.problems("train")) == 20


@pytest.mark.parametrize("name", sorted(ALL_NAMES))
def test_registry_unknown_option_names_allowed_ones(name):
    with pytest.raises(ValueError, match=r"no option\(s\) \['bogus'\]; allowed: \[.*'seed'"):
        build_task({"name": name, "bogus": 1})


def test_registry_options_reach_the_task():
    task = build_task({"name": "logic", "kind": "knights", "num_people": 4, "test_size": 3, "train_size": 5})
    assert all(p.difficulty == 4 for p in task.problems("train"))


def test_normalize_list_answer():
    assert normalize_list_answer("[3,1 , 2]") == "3, 1, 2"
    assert normalize_list_answer("-1, 5") == "-1, 5"
    assert normalize_list_answer("1, two") is None
    assert normalize_list_answer("  ") is None


def test_same_problems_across_processes():
    """No dependence on Python's per-process string hashing (PYTHONHASHSEED)."""
    import os
    import subprocess
    import sys

    code = (
        "import hashlib, json\n"
        "from posttrain.tasks.registry import build_task\n"
        "h = hashlib.sha256()\n"
        "for spec in [{'name': 'countdown'}, {'name': 'sorting', 'order': 'mixed'}, {'name': 'list_ops'},\n"
        "             {'name': 'logic'}, {'name': 'logic', 'kind': 'knights'}]:\n"
        "    t = build_task({**spec, 'test_size': 10, 'train_size': 50})\n"
        "    for s in ('train', 'test'):\n"
        "        for p in t.problems(s):\n"
        "            h.update(json.dumps([p.id, p.prompt, p.answer]).encode())\n"
        "print(h.hexdigest())\n"
    )
    src = str(Path(__file__).resolve().parents[2] / "src")
    digests = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": src}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        digests.add(out.stdout.strip())
    assert len(digests) == 1


def _commuted_twins(train: list, test: list) -> int:
    """Test problems whose operand-swapped twin ("b op a" for a commuting op) is in train."""
    train_exprs = {p.metadata["expr"] for p in train}
    twins = 0
    for p in test:
        (a, b), (op,) = p.metadata["operands"], p.metadata["ops"]
        if op in "+*" and a != b and f"{b} {op} {a}" in train_exprs:
            twins += 1
    return twins


@pytest.mark.parametrize("max_operand", [9, 999])  # enumerated split, and the hashed one of large spaces
def test_arithmetic_splits_are_disjoint_under_commutation(max_operand):
    from posttrain.tasks.arithmetic import ArithmeticTask

    task = ArithmeticTask(max_operand=max_operand, test_size=200, train_size=5000)
    train, test = task.problems("train"), task.problems("test")
    assert len(test) == 200 and len(train) == (100 if max_operand == 9 else 5000)
    assert _commuted_twins(train, test) == 0
    key = lambda p: ArithmeticTask.symmetry_key(p.metadata["operands"], p.metadata["ops"])  # noqa: E731
    assert not {key(p) for p in train} & {key(p) for p in test}
    # with the old per-expression hash, 32 of the 200 test problems at max_operand 9 had their twin in
    # train; now every commuting test pair has both members in test
    if max_operand == 9:
        pairs = [p for p in test if p.metadata["ops"][0] in "+*" and len(set(p.metadata["operands"])) == 2]
        assert pairs and all(f"{p.metadata['operands'][1]} {p.metadata['ops'][0]} {p.metadata['operands'][0]}"
                             in {q.metadata["expr"] for q in test} for p in pairs)


def test_symmetry_key_of_longer_chains_groups_reorderings():
    from posttrain.tasks.arithmetic import ArithmeticTask

    k = ArithmeticTask.symmetry_key
    assert k([3, 4], ["+"]) == k([4, 3], ["+"]) and k([3, 4], ["*"]) == k([4, 3], ["*"])
    assert k([3, 4], ["-"]) != k([4, 3], ["-"])
    assert k([1, 2, 3], ["+", "*"]) == k([3, 1, 2], ["*", "+"])
