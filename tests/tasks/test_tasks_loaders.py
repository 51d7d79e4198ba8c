"""Local data loaders: JSONL with field mapping, hash/explicit splits, errors naming file and
line, GSM8K / MATH presets, chat prompts, and ``datasets``-backed local files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from posttrain.tasks.loaders import HFDatasetTask, JsonlTask
from posttrain.tasks.registry import build_task


def write_jsonl(path: Path, records: list, raw_lines: dict[int, str] | None = None) -> Path:
    lines = [json.dumps(r) for r in records]
    for i, raw in (raw_lines or {}).items():
        lines.insert(i, raw)
    path.write_text("\n".join(lines) + "\n")
    return path


def qa(n: int, start: int = 0) -> list[dict]:
    return [{"q": f"What is {i} + 1?", "a": i + 1, "level": f"Level {i % 5 + 1}"} for i in range(start, start + n)]


# ----------------------------------------------------------------------------- mapping and splits


def test_field_mapping_and_hash_split(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", qa(200))
    task = JsonlTask(path, fields={"prompt": "q", "answer": "a", "difficulty": "level"}, test_fraction=0.2, seed=0)
    train, test = task.problems("train"), task.problems("test")
    assert len(train) + len(test) == 200
    assert 20 <= len(test) <= 60
    assert not {p.id for p in train} & {p.id for p in test}
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    for p in train + test:
        i = int(p.prompt.split()[2])
        assert p.answer == str(i + 1)
        assert p.difficulty == i % 5 + 1
        assert p.metadata["record"]["q"] == p.prompt and p.metadata["line"] == i + 1
    # deterministic, and the seed changes the split
    again = JsonlTask(path, fields={"prompt": "q", "answer": "a"}, test_fraction=0.2, seed=0)
    assert [p.id for p in again.problems("test")] == [p.id for p in test]
    other = JsonlTask(path, fields={"prompt": "q", "answer": "a"}, test_fraction=0.2, seed=1)
    assert {p.id for p in other.problems("test")} != {p.id for p in test}


def test_id_field_nested_fields_and_tests(tmp_path):
    records = [
        {"task": {"name": f"t{i}", "text": f"write f{i}"}, "checks": [f"assert f{i}() == {i}", "assert True"]}
        for i in range(30)
    ]
    path = write_jsonl(tmp_path / "code.jsonl", records)
    task = JsonlTask(
        path,
        fields={"prompt": "task.text", "answer": None, "tests": "checks", "id": "task.name"},
        test_fraction=0.3,
    )
    problems = task.problems("train") + task.problems("test")
    assert sorted(p.id for p in problems) == sorted(f"t{i}" for i in range(30))
    p = next(p for p in problems if p.id == "t4")
    assert p.prompt == "write f4" and p.answer is None and p.tests == "assert f4() == 4\nassert True"


def test_category_field(tmp_path):
    records = [{"q": f"What is {i} + 1?", "a": i + 1, "meta": {"topic": ["add", 7][i % 2]}} for i in range(40)]
    path = write_jsonl(tmp_path / "data.jsonl", records)
    task = JsonlTask(path, fields={"prompt": "q", "answer": "a", "category": "meta.topic"}, test_fraction=0.25)
    for p in task.problems("train") + task.problems("test"):
        assert p.category == ("add" if int(p.prompt.split()[2]) % 2 == 0 else "7")  # numbers become text
    plain = JsonlTask(path, fields={"prompt": "q", "answer": "a"}, test_fraction=0.25)
    assert {p.category for p in plain.problems("train")} == {None}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"q": "x", "a": 1, "topic": ["a"]}])
    with pytest.raises(ValueError, match=r"bad.jsonl, line 1: field 'topic' \(category\) must be a string"):
        JsonlTask(bad, fields={"prompt": "q", "answer": "a", "category": "topic"})


def test_separate_test_file_is_decontaminated(tmp_path):
    train_path = write_jsonl(tmp_path / "train.jsonl", qa(20))
    test_path = write_jsonl(tmp_path / "test.jsonl", qa(5, start=15))  # overlaps train on 15..19
    task = JsonlTask(train_path, fields={"prompt": "q", "answer": "a"}, test_path=test_path)
    assert len(task.problems("test")) == 5
    assert len(task.problems("train")) == 15
    assert not {p.prompt for p in task.problems("train")} & {p.prompt for p in task.problems("test")}


def test_duplicate_prompts_are_dropped(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa(50) + qa(50))
    task = JsonlTask(path, fields={"prompt": "q", "answer": "a"}, test_fraction=0.2)
    assert len(task.problems("train")) + len(task.problems("test")) == 50


def test_duplicate_ids_are_an_error(tmp_path):
    records = [{"question": f"q{i}", "answer": "1", "id": i % 3} for i in range(30)]
    path = write_jsonl(tmp_path / "ids.jsonl", records)
    with pytest.raises(ValueError, match="duplicate problem id"):
        JsonlTask(path, fields={"id": "id"}, test_fraction=0.3)


def test_gzip_and_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        for r in qa(40):
            fh.write(json.dumps(r) + "\n\n")
    task = JsonlTask(path, fields={"prompt": "q", "answer": "a"}, test_fraction=0.25)
    assert len(task.problems("train")) + len(task.problems("test")) == 40


def test_max_train_and_max_test(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", qa(100))
    task = JsonlTask(path, fields={"prompt": "q", "answer": "a"}, test_fraction=0.5, max_train=7, max_test=3)
    assert len(task.problems("train")) == 7 and len(task.problems("test")) == 3


# ----------------------------------------------------------------------------- errors


def test_malformed_line_error_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", qa(10), raw_lines={6: '{"q": "broken", '})
    with pytest.raises(ValueError) as err:
        JsonlTask(path, fields={"prompt": "q", "answer": "a"})
    assert "line 7" in str(err.value) and "bad.jsonl" in str(err.value) and "malformed JSON" in str(err.value)


def test_missing_field_error_names_field_file_and_line(tmp_path):
    records = qa(10)
    del records[3]["a"]
    path = write_jsonl(tmp_path / "missing.jsonl", records)
    with pytest.raises(ValueError) as err:
        JsonlTask(path, fields={"prompt": "q", "answer": "a"})
    msg = str(err.value)
    assert "'a'" in msg and "line 4" in msg and "missing.jsonl" in msg and "answer" in msg


def test_default_mapping_missing_field(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", qa(5))  # has "q", not the default "question"
    with pytest.raises(ValueError, match=r"line 1: missing field 'question' \(mapped to prompt\)"):
        JsonlTask(path)


def test_non_object_line(tmp_path):
    path = write_jsonl(tmp_path / "list.jsonl", qa(3) + [[1, 2]])
    with pytest.raises(ValueError, match="line 4: expected a JSON object"):
        JsonlTask(path, fields={"prompt": "q", "answer": "a"})


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match="empty.jsonl: the file is empty"):
        JsonlTask(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        JsonlTask(tmp_path / "nope.jsonl")


def test_bad_options(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", qa(20))
    with pytest.raises(ValueError, match="task.fields has unknown key"):
        JsonlTask(path, fields={"question": "q"})
    with pytest.raises(ValueError, match="task.prompt_template"):
        JsonlTask(path, fields={"prompt": "q", "answer": "a"}, prompt_template="no placeholder")
    with pytest.raises(ValueError, match="task.answer_format"):
        JsonlTask(path, fields={"prompt": "q", "answer": "a"}, answer_format="latex")


def test_tiny_file_with_empty_split_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "tiny.jsonl", qa(1))
    with pytest.raises(ValueError, match="split empty"):
        JsonlTask(path, fields={"prompt": "q", "answer": "a"}, test_fraction=0.5)


# ----------------------------------------------------------------------------- chat prompts


def test_system_prompt_and_template_on_text_prompts(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", qa(30))
    task = JsonlTask(
        path,
        fields={"prompt": "q", "answer": "a"},
        system_prompt="You are terse.",
        prompt_template="Question: {prompt}\nAnswer:",
        test_fraction=0.3,
    )
    p = task.problems("train")[0]
    assert p.prompt[0] == {"role": "system", "content": "You are terse."}
    assert p.prompt[1]["role"] == "user"
    assert p.prompt[1]["content"].startswith("Question: What is ") and p.prompt[1]["content"].endswith("\nAnswer:")


def test_message_list_prompts(tmp_path):
    records = [
        {"messages": [{"role": "user", "content": f"hi {i}"}], "answer": str(i)} for i in range(20)
    ] + [{"messages": [{"role": "system", "content": "own"}, {"role": "user", "content": "x"}], "answer": "x"}]
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    task = JsonlTask(
        path, fields={"prompt": "messages"}, system_prompt="SYS", prompt_template="[{prompt}]", test_fraction=0.3
    )
    problems = {p.answer: p for p in task.problems("train") + task.problems("test")}
    assert problems["3"].prompt == [{"role": "system", "content": "SYS"}, {"role": "user", "content": "[hi 3]"}]
    assert problems["x"].prompt[0] == {"role": "system", "content": "own"}  # the record's own system wins
    bad = write_jsonl(tmp_path / "badchat.jsonl", [{"messages": [{"role": "user"}], "answer": "1"}])
    with pytest.raises(ValueError, match="line 1: prompt message 0"):
        JsonlTask(bad, fields={"prompt": "messages"})


# ----------------------------------------------------------------------------- presets


def test_gsm8k_preset(tmp_path):
    records = [
        {"question": f"Tom has {i} apples and buys 1,000 more. How many?", "answer": f"{i} + 1000 = {i + 1000}\n#### {i + 1000:,}"}
        for i in range(40)
    ]
    path = write_jsonl(tmp_path / "gsm8k.jsonl", records)
    task = build_task({"name": "gsm8k_jsonl", "path": str(path), "test_fraction": 0.25})
    assert task.name == "gsm8k_jsonl"
    for p in task.problems("train") + task.problems("test"):
        i = int(p.prompt.split()[2])
        assert p.answer == str(i + 1000)
        assert p.metadata["solution"].endswith(f"#### {i + 1000:,}")


def test_gsm8k_preset_missing_marker_names_line(tmp_path):
    records = [{"question": "q1", "answer": "1\n#### 1"}, {"question": "q2", "answer": "just 2"}]
    path = write_jsonl(tmp_path / "gsm8k.jsonl", records)
    with pytest.raises(ValueError, match="line 2: field 'answer' has no '#### <number>'"):
        build_task({"name": "gsm8k_jsonl", "path": str(path)})


def test_math_preset(tmp_path):
    records = [
        {"problem": f"Compute {i}/2.", "solution": f"We get $\\boxed{{\\frac{{{i}}}{{2}}}}$.", "level": f"Level {i % 5 + 1}"}
        for i in range(40)
    ]
    path = write_jsonl(tmp_path / "math.jsonl", records)
    task = build_task({"name": "math_jsonl", "path": str(path), "fields": {"difficulty": "level"}, "test_fraction": 0.25})
    for p in task.problems("train") + task.problems("test"):
        i = int(p.prompt.split()[1].split("/")[0])
        assert p.answer == f"\\frac{{{i}}}{{2}}"
        assert p.difficulty == i % 5 + 1


def test_jsonl_registry_entry(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", qa(30))
    task = build_task({"name": "jsonl", "path": str(path), "fields": {"prompt": "q", "answer": "a"}, "test_fraction": 0.3})
    assert len(task.problems("train")) + len(task.problems("test")) == 30
    with pytest.raises(ValueError, match="needs task.path"):
        build_task({"name": "jsonl"})


# ----------------------------------------------------------------------------- datasets-backed files


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory):
    pytest.importorskip("datasets")
    d = tmp_path_factory.mktemp("hf")
    records = [{"question": f"What is {i} * 2?", "answer": str(2 * i)} for i in range(60)]
    write_jsonl(d / "data.jsonl", records)
    (d / "data.csv").write_text("question,answer\n" + "".join(f"What is {i} * 2?,{2 * i}\n" for i in range(60)))
    try:
        import pandas as pd

        pd.DataFrame(records).to_parquet(d / "data.parquet")
    except Exception:  # pragma: no cover - pyarrow missing
        pass
    return d


@pytest.mark.parametrize("ext", ["jsonl", "csv", "parquet"])
def test_hf_local_formats(hf_files, ext):
    path = hf_files / f"data.{ext}"
    if not path.exists():
        pytest.skip("parquet writer unavailable")
    task = HFDatasetTask(path, test_fraction=0.2)
    train, test = task.problems("train"), task.problems("test")
    assert len(train) + len(test) == 60 and test
    assert not {p.prompt for p in train} & {p.prompt for p in test}
    for p in train + test:
        assert p.answer == str(2 * int(p.prompt.split()[2]))


def test_hf_local_matches_jsonl_split(hf_files):
    a = HFDatasetTask(hf_files / "data.jsonl", test_fraction=0.2, seed=4)
    b = JsonlTask(hf_files / "data.jsonl", test_fraction=0.2, seed=4)
    assert {p.prompt for p in a.problems("test")} == {p.prompt for p in b.problems("test")}


def test_hf_local_errors(hf_files, tmp_path):
    with pytest.raises(ValueError, match=r"missing field 'problem' \(mapped to prompt\)"):
        HFDatasetTask(hf_files / "data.csv", fields={"prompt": "problem"})
    with pytest.raises(FileNotFoundError):
        HFDatasetTask(tmp_path / "nowhere.csv")
    odd = tmp_path / "data.txt"
    odd.write_text("x")
    with pytest.raises(ValueError, match="set task.format"):
        HFDatasetTask(odd)
    task = build_task({"name": "hf_local", "data_files": [str(hf_files / "data.csv")], "test_fraction": 0.2})
    assert len(task.problems("test")) > 0
