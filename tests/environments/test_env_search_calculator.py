"""BM25 and the calculator against values computed by hand."""

import math

import pytest

from posttrain.environments.search import BM25Index, tokenize
from posttrain.environments.tools import ToolError, calculate, calculator_tool, search_tool

DOCS = [("d1", "The cat sat."), ("d2", "the dog sat on the cat"), ("d3", "Dogs run")]


def test_bm25_scores_by_hand():
    # Lengths 3, 6, 2 tokens: avgdl = 11/3. k1 = 1.5, b = 0.75, N = 3.
    # "cat" is in d1, d2 (n = 2): IDF = ln(1 + (3 - 2 + 0.5) / (2 + 0.5)) = ln(1.6) = 0.470004
    # "dog" is in d2 only ("dogs" is another token): IDF = ln(1 + 2.5 / 1.5) = ln(8/3) = 0.980829
    # k1 (1 - b + b |D| / avgdl):  d1: 1.5 (0.25 + 0.75 * 3 / (11/3)) = 1.295455
    #                              d2: 1.5 (0.25 + 0.75 * 6 / (11/3)) = 2.215909
    # d1, "cat" (f = 1): 0.470004 * 1 * 2.5 / (1 + 1.295455) = 0.470004 * 1.089109 = 0.511885
    # d2, "cat" (f = 1): 0.470004 * 2.5 / 3.215909 = 0.470004 * 0.777385 = 0.365374
    # d2, "dog" (f = 1): 0.980829 * 0.777385 = 0.762482;  d2, "cat dog": 0.365374 + 0.762482 = 1.127856
    # d2, "the" (f = 2, n = 2): 0.470004 * 2 * 2.5 / (2 + 2.215909) = 0.470004 * 1.185984 = 0.557417
    idx = BM25Index(DOCS)
    assert idx.avgdl == pytest.approx(11 / 3)
    assert idx.idf("cat") == pytest.approx(0.470004, abs=1e-6)
    assert idx.idf("dog") == pytest.approx(0.980829, abs=1e-6)
    assert idx.score("cat", 0) == pytest.approx(0.511885, abs=1e-6)
    assert idx.score("cat", 1) == pytest.approx(0.365374, abs=1e-6)
    assert idx.score("cat dog", 1) == pytest.approx(1.127856, abs=1e-6)
    assert idx.score("the", 1) == pytest.approx(0.557417, abs=1e-6)
    assert idx.score("cat cat", 0) == idx.score("cat", 0)  # a repeated query term counts once
    assert idx.score("cat dog", 2) == 0.0
    assert idx.search("cat dog") == [("d2", pytest.approx(1.127856, abs=1e-6)), ("d1", pytest.approx(0.511885, abs=1e-6))]
    assert idx.search("cat dog", top_k=1)[0][0] == "d2"
    assert idx.search("elephant") == []
    assert tokenize("The cat, sat!") == ["the", "cat", "sat"]


def test_search_tool_over_a_directory(tmp_path):
    for name, text in DOCS:
        (tmp_path / f"{name}.txt").write_text(text)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d4.md").write_text("a cat again and again")
    (tmp_path / "skip.bin").write_text("cat cat cat")
    tool = search_tool(str(tmp_path), top_k=2)
    out = tool.fn(query="cat dog")
    assert out.startswith("[1] d2.txt (score ") and "the dog sat on the cat" in out  # 4 documents: other scores
    assert "[2]" in out and "[3]" not in out and "skip.bin" not in out
    assert tool.fn(query="zebra") == "no results"
    with pytest.raises(ValueError, match="not a directory"):
        search_tool(str(tmp_path / "missing"))


@pytest.mark.parametrize("expr,value", [
    ("2 + 3 * 4", "14"), ("(1 + 2) * -3", "-9"), ("7 / 2", "3.5"), ("7 // 2", "3"), ("10 % 4", "2"),
    ("2 ** 10", "1024"), ("6 / 3", "2"), ("sqrt(16) + abs(-2)", "6"), ("max(3, 9, 4) - min(2, 5)", "7"),
    ("round(2.567, 2)", "2.57"), ("0.1 + 0.2", "0.3"), ("123456789 * 987654321", "121932631112635269"),
])
def test_calculator_values(expr, value):
    assert calculate(expr) == value


@pytest.mark.parametrize("expr,message", [
    ("1 / 0", "division by zero"), ("9 ** 9 ** 9", "too large"), ("__import__('os')", "unsupported"),
    ("x + 1", "unsupported"), ("'a' * 3", "unsupported"), ("2 +", "not an expression"), ("sqrt(-1)", "sqrt"),
    ("True + 1", "unsupported"),
])
def test_calculator_refuses(expr, message):
    with pytest.raises(ToolError, match=message):
        calculate(expr)


def test_calculator_tool_schema():
    tool = calculator_tool()
    assert tool.name == "calculator" and tool.parameters["required"] == ["expression"]
    assert math.isclose(float(tool.fn(expression="1/3")), 1 / 3, rel_tol=1e-11)
