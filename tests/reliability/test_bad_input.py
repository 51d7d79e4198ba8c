"""Bad input, property-based: whatever a user types, the answer is a config or one clear error.

* ``load_config`` with random dotted overrides (keys from the real schema and junk keys; values
  of every YAML kind: wrong types, nested mappings, anchors, tags, dates, special floats,
  broken syntax) and with random YAML files returns an ``RLConfig`` or raises ``ConfigError``
  whose message names the offending key; nothing else escapes. Every accepted config survives
  the dump/load round trip that ``--resume`` relies on.
* A JSONL task file with random damage (truncated lines, random bytes, wrong field types,
  missing fields, non-objects, blank files) gives a task or a ``ValueError`` /
  ``FileNotFoundError`` naming the file (and the line, for a bad record); never a KeyError,
  TypeError, AttributeError or UnicodeDecodeError from deep inside.
* ``posttrain.cli.main`` with bad input returns 2 and prints exactly one line.

Bugs these generators found are pinned by the tests under "found bugs" at the end of this
file (fixed; their triggers are back in the generators). Examples tried are counted and
printed in the reliability report.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import types
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from posttrain.cli import main
from posttrain.config import ConfigError, RLConfig, dump_config, load_config, to_dict
from posttrain.tasks.loaders import JsonlTask

SCALE = int(os.environ.get("POSTTRAIN_HYPOTHESIS_SCALE", "1"))  # x10 with the explore profile


# ----------------------------------------------------------------------------- the schema


def _schema(cls: type = RLConfig, prefix: str = "") -> dict[str, typing.Any]:
    """Every dotted leaf path of the config and its annotation (sections included)."""
    out: dict[str, typing.Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        out[path] = hints[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_schema(hints[f.name], path + "."))
    return out


SCHEMA = _schema()
SECTIONS = sorted(p for p, t in SCHEMA.items() if dataclasses.is_dataclass(t))
LEAVES = sorted(p for p, t in SCHEMA.items() if not dataclasses.is_dataclass(t))
FREE_FORM = ("task", "reward")  # plain dicts validated later by the task / reward builders


def offending(path: str) -> list[str]:
    """The key an error about override ``path`` must name: the path up to its first unknown
    component (``trainer.bogus.x`` -> ``trainer.bogus``), or all of it."""
    parts = path.split(".")
    for i in range(1, len(parts) + 1):
        head = ".".join(parts[:i])
        if head in FREE_FORM:
            return parts[:i] if i == len(parts) else parts[: i + 1]
        if head not in SCHEMA:
            return parts[:i]
    return parts


def names_key(message: str, parts: list[str]) -> bool:
    """``a.b.c`` is named when the message holds ``a.b`` and ``c``: nested configs owned by other
    modules write pairs such as ``algorithm.loss.clip_low and clip_high must be >= 0`` or
    ``algorithm.loss.dppo_low/high must be >= 0`` (the family stem ``dppo`` counts)."""
    parent, leaf = ".".join(parts[:-1]), parts[-1]
    stem = leaf.split("_")[0]
    return parent in message and (leaf in message or (len(stem) >= 3 and f"{stem}_" in message))


# ----------------------------------------------------------------------------- strategies

JUNK_NAMES = st.sampled_from(["bogus", "lr", "Trainer", "steps ", "", "0", "-", "__class__", "née", "a b", "😀"])
YAML_SNIPPETS = st.sampled_from([
    "", "~", "null", "NULL", "true", "False", "yes", "off", "0", "-1", "3", "007", "0x1F", "0o17", "1_000",
    "99999999999999999999999", "1.5", "-0.0", "3.", ".5", "1e3", "1e-5", "1.0e+3", "1e999", ".inf", "-.inf",
    ".nan", "nan", "2020-01-01", "2001-12-14t21:59:43.10-05:00", "12:30", "'3'", '"1e-3"', "'  '", "abc",
    "[]", "{}", "[1, 2]", "[0.9, 0.99]", "[0.9]", "[a, [b]]", "{a: 1}", "{lr: 1e-3}", "{lr: x}", "{name: x}",
    "{coef: -1}", "{steps: 0}", "{type: numeric}", "&a [*a]", "!!binary aGVsbG8=", "!!set {a, b}",
    "!!python/name:os.system", "!!python/object/apply:os.system [ls]", "!!float 3", "!!int '3'", "!!str 3",
    "|\n  block", "[unclosed", "{a: 1", "a: b: c", "- a\n- b", "? a", "@", "`x`", "%TAG", "'unterminated",
    "\t", "{a: 1, a: 2}", "k3", "grpo", "ppo_clip", "token-mean", "cosine", "auto", "bfloat16", "abort",
])
NUMBERS = st.one_of(
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(allow_nan=True, allow_infinity=True),
).map(lambda v: yaml.safe_dump(v).strip().removesuffix("..."))
# JSON/YAML text of random nested data
DATA = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000), st.floats(allow_nan=False), st.text(max_size=8)),
    lambda kids: st.one_of(st.lists(kids, max_size=3),
                           st.dictionaries(st.text(alphabet="abcdeflnrst_", min_size=1, max_size=6), kids, max_size=3)),
    max_leaves=8,
).map(lambda v: yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("..."))
VALUES = st.one_of(YAML_SNIPPETS, NUMBERS, DATA, st.text(alphabet="ab:[]{}#&*!|>'\",- .0123", max_size=12))


def _plausible(tp) -> st.SearchStrategy:
    """Values of the annotated type, mostly in range, as YAML text (so that some configs pass)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return st.sampled_from(args).map(lambda v: yaml.safe_dump(v).strip().removesuffix("...").strip())
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*[_plausible(a) for a in args])
    if tp is type(None):
        return st.just("null")
    if origin is list:
        return st.lists(st.floats(0, 0.999), min_size=2, max_size=2).map(lambda v: yaml.safe_dump(v, default_flow_style=True))
    if tp is bool:
        return st.sampled_from(["true", "false"])
    if tp is int:
        return st.integers(0, 64).map(str)
    if tp is float:
        return st.floats(0.0, 1.0).map(lambda v: repr(v))
    if tp is str:
        return st.sampled_from(["grpo", "ppo_clip", "token-mean", "k3", "rloo", "dr_grpo", "tiny-random", "x"])
    return VALUES


PLAUSIBLE = {path: _plausible(tp) for path, tp in SCHEMA.items() if not dataclasses.is_dataclass(tp)}


@st.composite
def keys(draw) -> str:
    kind = draw(st.sampled_from(["leaf"] * 6 + ["section", "junk_under_section", "junk", "too_deep"]))
    if kind == "leaf":
        return draw(st.sampled_from(LEAVES))
    if kind == "section":
        return draw(st.sampled_from(SECTIONS + list(FREE_FORM)))
    if kind == "junk_under_section":
        return draw(st.sampled_from(SECTIONS)) + "." + draw(JUNK_NAMES)
    if kind == "junk":
        return ".".join(draw(st.lists(JUNK_NAMES, min_size=1, max_size=3)))
    return draw(st.sampled_from(LEAVES)) + "." + draw(JUNK_NAMES)


@st.composite
def overrides(draw) -> str:
    key = draw(keys())
    value = draw(PLAUSIBLE[key] if key in PLAUSIBLE and draw(st.integers(0, 3)) else VALUES)
    form = draw(st.sampled_from(["=", "=", "=", " = ", "==", "", "=\n"]))
    return f"{key}{form}{value}"


def _split(override: str) -> tuple[str, str] | None:
    return tuple(override.split("=", 1)) if "=" in override else None


def _names_override(message: str, override: str) -> bool:
    """The error names the override: its text (malformed or unparsable ones) or its key."""
    if override[:30] in message or repr(override)[1:31] in message:
        return True
    parts = _split(override)
    return parts is not None and bool(parts[0].strip()) and names_key(message, offending(parts[0].strip()))


def _roundtrip(cfg, tmp: Path) -> None:
    """An accepted config is written to config.yaml and read back by --resume: the same config."""
    dump_config(cfg, tmp / "config.yaml")
    back = load_config(tmp / "config.yaml")
    assert yaml.safe_dump(to_dict(back)) == yaml.safe_dump(to_dict(cfg))


# ----------------------------------------------------------------------------- config


@settings(max_examples=1000 * SCALE)
@given(ov=st.lists(overrides(), min_size=1, max_size=4))
def test_overrides_give_a_config_or_a_config_error_naming_the_key(ov, tmp_path_factory, examples):
    examples["config overrides"] += 1
    try:
        cfg = load_config(None, ov)
    except ConfigError as exc:
        assert any(_names_override(str(exc), o) for o in ov), f"{str(exc)!r} names none of {ov}"
        return
    assert isinstance(cfg, RLConfig)
    examples["config overrides accepted"] += 1
    _roundtrip(cfg, tmp_path_factory.mktemp("roundtrip"))


@settings(max_examples=400 * SCALE)
@given(key=st.sampled_from(LEAVES), value=VALUES)
def test_one_override_error_names_exactly_that_key(key, value, examples):
    examples["single override"] += 1
    try:
        load_config(None, [f"{key}={value}"])
    except ConfigError as exc:
        assert _names_override(str(exc), f"{key}={value}"), (key, value, str(exc))


SECTION_DICTS = st.fixed_dictionaries({}, optional={
    name: st.one_of(
        st.dictionaries(st.sampled_from(sorted({p.split(".")[1] for p in SCHEMA if p.startswith(name + ".")} | {"bogus"})),
                        VALUES.map(lambda t: _safe_load_or(t)), max_size=4),
        VALUES.map(lambda t: _safe_load_or(t)),
    )
    for name in ("model", "rollout", "algorithm", "trainer", "task", "reward", "output_dir", "junk")
})


def _safe_load_or(text: str):
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError):
        return text


@settings(max_examples=300 * SCALE)
@given(data=st.one_of(SECTION_DICTS, st.none(), st.integers(), st.lists(st.integers(), max_size=2), st.text(max_size=20)))
def test_random_config_files(data, tmp_path_factory, examples):
    examples["config files"] += 1
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    try:
        path.write_text(yaml.safe_dump(data, allow_unicode=True))
    except (yaml.YAMLError, RecursionError, UnicodeEncodeError):
        return
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        message = str(exc)
        keys_in_data = set()
        if isinstance(data, dict):
            for k, v in data.items():
                keys_in_data.add(str(k))
                if isinstance(v, dict):
                    keys_in_data |= {f"{k}.{kk}" for kk in v} | {str(kk) for kk in v}
        assert str(path) in message or "config must be a mapping" in message or any(k in message for k in keys_in_data), message
        return
    assert isinstance(cfg, RLConfig)


@settings(max_examples=200 * SCALE)
@given(blob=st.one_of(st.binary(max_size=200),
                      st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
                      st.text(alphabet="abtrinelos:-[]{}&*!|>'\"#\n\t .019", max_size=200).map(str.encode)))
def test_random_bytes_as_a_config_file(blob, tmp_path_factory, examples):
    examples["config files (random bytes)"] += 1
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    path.write_bytes(blob)
    try:
        load_config(path)
    except ConfigError as exc:
        assert str(exc)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        (tmp_path / "list.yaml").write_text("- a\n- b\n")
        load_config(tmp_path / "list.yaml")


# ----------------------------------------------------------------------------- JSONL tasks

GOOD = {"question": "What is 2 + 2?", "answer": "4"}
ODD_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10),
    st.lists(st.integers(), max_size=2), st.just([]), st.just({}), st.just([{"role": "user"}]),
    st.just([{"role": "user", "content": 3}]), st.just([{"role": "user", "content": "hi"}]), st.just({"a": {"b": 1}}),
)


@st.composite
def jsonl_lines(draw) -> bytes:
    kind = draw(st.sampled_from(["good", "good", "missing", "wrong_type", "extra", "not_object", "truncated",
                                 "bytes", "blank", "nan", "bom", "deep_ok", "deep", "garbage_text"]))
    n = draw(st.integers(0, 10**6))
    good = {"question": f"q{n}?", "answer": str(n)}
    if kind == "good":
        return json.dumps(good).encode()
    if kind == "missing":
        return json.dumps({k: v for k, v in good.items() if k != draw(st.sampled_from(["question", "answer"]))}).encode()
    if kind == "wrong_type":
        return json.dumps({**good, draw(st.sampled_from(["question", "answer"])): draw(ODD_VALUES)}).encode()
    if kind == "extra":
        return json.dumps({**good, "id": draw(ODD_VALUES), "meta": draw(ODD_VALUES)}).encode()
    if kind == "not_object":
        return json.dumps(draw(st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text(max_size=5),
                                         st.none()))).encode()
    if kind == "truncated":
        text = json.dumps(good).encode()
        return text[: draw(st.integers(1, len(text) - 1))]
    if kind == "bytes":
        return draw(st.binary(min_size=1, max_size=30)).replace(b"\n", b" ")
    if kind == "blank":
        return draw(st.sampled_from([b"", b"   ", b"\t"]))
    if kind == "nan":
        return b'{"question": NaN, "answer": Infinity}'
    if kind == "bom":
        return b"\xef\xbb\xbf" + json.dumps(good).encode()
    if kind == "deep_ok":  # nesting well within limits
        return json.dumps({**good, "meta": json.loads("[" * 50 + "]" * 50)}).encode()
    if kind == "deep":  # nesting too deep for the parser
        return b"[" * 5_000
    return draw(st.text(alphabet="{}[]\":,abc 01", max_size=20)).encode()


@settings(max_examples=600 * SCALE)
@given(lines=st.lists(jsonl_lines(), max_size=8), newline=st.sampled_from(["\n", "\r\n"]), final_newline=st.booleans(),
       test_fraction=st.sampled_from([None, 0.0, 0.5, 1.0]), answer_format=st.sampled_from([None, "gsm8k", "math"]))
def test_damaged_jsonl_gives_a_task_or_a_clear_error(lines, newline, final_newline, test_fraction, answer_format,
                                                      tmp_path_factory, examples):
    examples["jsonl files"] += 1
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_bytes(newline.encode().join(lines) + (newline.encode() if final_newline and lines else b""))
    kwargs = {"answer_format": answer_format}
    if test_fraction is None:
        test = path.with_name("test.jsonl")
        test.write_text(json.dumps({"question": "held-out?", "answer": "1"}) + "\n")
        kwargs["test_path"] = str(test)
    else:
        kwargs["test_fraction"] = test_fraction
    try:
        task = JsonlTask(path, **kwargs)
    except (ValueError, FileNotFoundError) as exc:
        assert type(exc) in (ValueError, FileNotFoundError), f"{type(exc).__name__} escaped: {exc}"
        message = str(exc)
        assert str(path) in message or "task." in message, message
        if "line" in message:
            assert _line_number(message) <= len(lines), message
        return
    problems = task.problems("train") + task.problems("test")
    assert all(isinstance(p.prompt, (str, list)) for p in problems)
    examples["jsonl files accepted"] += 1


def _line_number(message: str) -> int:
    import re

    return int(re.search(r"line (\d+)", message).group(1))


@settings(max_examples=60 * SCALE)
@given(lines=st.lists(st.sampled_from([json.dumps(GOOD), json.dumps({"question": "x", "answer": 1}), "{bad"]), max_size=5))
def test_gzipped_jsonl(lines, tmp_path_factory, examples):
    examples["jsonl.gz files"] += 1
    path = tmp_path_factory.mktemp("data") / "train.jsonl.gz"
    path.write_bytes(gzip.compress("\n".join(lines).encode()))
    try:
        JsonlTask(path, test_fraction=0.0)
    except ValueError as exc:
        assert type(exc) is ValueError and str(path) in str(exc)


def test_missing_and_directory_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="task.path: no such file"):
        JsonlTask(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="task.path"):
        JsonlTask(tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        JsonlTask(tmp_path / "empty.jsonl")


# ----------------------------------------------------------------------------- CLI


def _one_line_error(capsys, argv: list[str]) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, (argv, rc, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("posttrain: error:") and "Traceback" not in err, err
    return lines[0]


def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  name: tiny-random\n")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    data = tmp_path / "bad.jsonl"
    data.write_text('{"question": "a", "answer": "1"}\n{"question": 3\n')
    bool_data = tmp_path / "bool.jsonl"
    bool_data.write_text("".join(f'{{"question": "is {i} even?", "answer": {str(i % 2 == 0).lower()}}}\n' for i in range(6)))
    out = str(tmp_path / "out")
    cases = {
        "no config": (["rl"], "needs a config file"),
        "missing config": (["rl", str(tmp_path / "missing.yaml")], "missing.yaml"),
        "unknown key": (["rl", str(cfg), "trainer.bogus=1", "--output-dir", out], "trainer.bogus"),
        "wrong type": (["rl", str(cfg), "trainer.lr=fast", "--output-dir", out], "trainer.lr"),
        "out of range": (["rl", str(cfg), "rollout.top_p=2", "--output-dir", out], "rollout.top_p"),
        "not an override": (["rl", str(cfg), "trainer.lr", "--output-dir", out], "trainer.lr"),
        "unknown model": (["rl", str(cfg), "model.name=nope", "--output-dir", out], "nope"),
        "missing model dir": (["rl", str(cfg), f"model.name={tmp_path}/nomodel", "--output-dir", out], "nomodel"),
        "unknown task": (["rl", str(cfg), "task.name=nope", "--output-dir", out], "nope"),
        "task option": (["rl", str(cfg), "task.bogus=1", "--output-dir", out], "bogus"),
        "bad data line": (["rl", str(cfg), f"task={{name: jsonl, path: {data}, test_fraction: 0.0}}", "--output-dir", out],
                          "line 2"),
        "missing data": (["rl", str(cfg), f"task={{name: jsonl, path: {tmp_path}/none.jsonl}}", "--output-dir", out],
                         "none.jsonl"),
        # a boolean answer is not a number: refused up front, not at the first evaluation (was exit 1 + a run dir)
        "unscorable answers": (["rl", str(cfg), f"task={{name: jsonl, path: {bool_data}, test_fraction: 0.5}}",
                                "--output-dir", out], "needs a numeric answer"),
        "unknown reward": (["rl", str(cfg), "reward.type=nope", "--output-dir", out], "nope"),
        "busy output dir": (["rl", str(cfg), "--output-dir", str(busy)], "not empty"),
        "file as parent": (["rl", str(cfg), "--output-dir", str(a_file / "run")], "not a directory"),
        "resume non-run": (["rl", "--resume", str(tmp_path)], "config.yaml"),
        "resume missing": (["rl", "--resume", str(tmp_path / "none")], "none"),
        "config and resume": (["rl", str(cfg), "--resume", str(tmp_path)], "not both"),
        "resume bad override": (["rl", "--resume", str(tmp_path), "trainer.lr=x"], "config.yaml"),
        "report non-dir": (["report", str(a_file)], "not a directory"),
    }
    for name, (argv, needle) in cases.items():
        line = _one_line_error(capsys, argv)
        assert needle in line, (name, line)
    assert not (tmp_path / "out").exists(), "a failed start left a run directory behind"


@settings(max_examples=150 * SCALE)
@given(ov=st.lists(overrides().filter(lambda o: not o.startswith(("task", "reward", "model", "output_dir"))),
                   min_size=1, max_size=3))
def test_cli_random_overrides_never_traceback(ov, tmp_path_factory, examples):
    """Overrides of everything but the task/reward/model (whose builders could start real work):
    with a non-empty --output-dir every start must fail, so each one exits 2 with one line."""
    examples["cli overrides"] += 1
    tmp = tmp_path_factory.mktemp("cli")
    cfg = tmp / "c.yaml"
    cfg.write_text("model:\n  name: tiny-random\n")
    (tmp / "busy").mkdir()
    (tmp / "busy" / "x").write_text("x")
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(["rl", str(cfg), *ov, "--output-dir", str(tmp / "busy")])
        except SystemExit as exc:  # argparse: an override that looks like an option
            rc = exc.code
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert rc == 2 and "Traceback" not in err.getvalue(), (ov, rc, err.getvalue())
    assert len(lines) == 1 or lines[0].startswith("usage:"), err.getvalue()


def test_cli_argparse_errors_exit_2(capsys):
    for argv in (["rl", "--bogus"], ["nope"], ["list", "nothing"], []):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        assert "Traceback" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- found bugs
# Found by the generators above and fixed; each stays pinned here (its trigger is also back in
# the generators).


def test_deeply_nested_yaml_is_a_config_error(tmp_path):
    """Bug 1: deeply nested YAML raised RecursionError (override and file)."""
    with pytest.raises(ConfigError, match="trainer.lr"):
        load_config(None, ["trainer.lr=" + "[" * 5000])
    path = tmp_path / "deep.yaml"
    path.write_text("task: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="deep.yaml"):
        load_config(path)


def test_non_utf8_config_file(tmp_path):
    """Bug 2: a non-UTF-8 config file raised UnicodeDecodeError without the file name."""
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xff\xfe trainer: 1")
    with pytest.raises(ConfigError, match="c.yaml"):
        load_config(path)


@pytest.mark.parametrize("line", [b'{"question": "\\ud800", "answer": "1"}',
                                  b'{"question": [{"role": "user", "content": "\\udfff"}], "answer": "1"}',
                                  b'{"question": "q", "answer": "\\udc80"}'])
def test_lone_surrogate_in_jsonl(tmp_path, line):
    """Bug 3: a JSON string with a lone surrogate escape raised UnicodeEncodeError when hashed."""
    path = tmp_path / "t.jsonl"
    path.write_bytes(line + b"\n")
    with pytest.raises(ValueError, match="line 1") as info:
        JsonlTask(path, test_fraction=0.0)
    assert type(info.value) is ValueError


def test_deeply_nested_jsonl(tmp_path):
    """Bug 4: deeply nested JSON raised RecursionError."""
    path = tmp_path / "t.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b"[" * 100_000 + b"\n")
    with pytest.raises(ValueError, match="line 2"):
        JsonlTask(path, test_fraction=0.0)


@pytest.mark.parametrize("blob", [b"not gzip", gzip.compress(b'{"question": "a", "answer": "1"}\n' * 20)[:25],
                                  gzip.compress(b'{"question": "a", "answer": "1"}\n')[:-4] + b"\0\0\0\0"])
def test_damaged_gzip(tmp_path, blob):
    """Bug 5: a damaged .jsonl.gz raised gzip.BadGzipFile / EOFError (or a CRC error)."""
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(blob)
    with pytest.raises(ValueError, match="t.jsonl.gz") as info:
        JsonlTask(path, test_fraction=0.0)
    assert type(info.value) is ValueError


@pytest.mark.parametrize("override", ["trainer.lr=.inf", "rollout.temperature=1e999", "trainer.max_grad_norm=.inf",
                                      "algorithm.kl.coef=.nan", "algorithm.entropy.coef=.nan",
                                      "algorithm.kl.target=.inf", "trainer.weight_decay=-.inf",
                                      "trainer.eval_temperature=" + "9" * 400])
def test_non_finite_numbers_rejected(override):
    """Bug 6: non-finite floats passed the range checks (`x > 0` holds for inf, `x < 0` fails for nan)."""
    with pytest.raises(ConfigError, match=override.split("=")[0] + " must be a finite number"):
        load_config(None, [override])


def test_yaml_error_is_one_line(tmp_path, capsys):
    """Bug 7: a YAML syntax error was reported over several lines (PyYAML's message)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  name: tiny-random\n")
    line = _one_line_error(capsys, ["rl", str(cfg), "trainer.adam_betas=[0.9", "--output-dir", str(tmp_path / "o")])
    assert "adam_betas" in line
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  lr: [1\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert "\n" not in str(info.value) and "bad.yaml" in str(info.value)


@pytest.mark.parametrize("override", ["task.extra=&a [*a]", "task=&a {name: x, self: *a}",
                                      "reward.weights=&a {w: [1, *a]}", "eval_reward=&a {type: numeric, x: [*a]}"])
def test_self_referential_value_is_rejected(tmp_path, override):
    """Bug 8: a self-referential value (a YAML alias inside its own anchor) was accepted in a
    free-form section, then dump_config recursed forever writing config.yaml."""
    with pytest.raises(ConfigError, match="refers to itself") as info:
        load_config(None, [override])
    assert names_key(str(info.value), offending(override.split("=")[0]))


def test_shared_aliases_are_fine(tmp_path):
    """Aliases that are not cycles still load and round-trip, and many aliases of aliases are
    checked in time linear in the distinct nodes (not their expanded size)."""
    cfg = load_config(None, ["task={name: arithmetic, a: &x [1, 2], b: *x}"])
    assert cfg.task["b"] == [1, 2]
    _roundtrip(cfg, tmp_path)
    levels = ["l0: &l0 [1, 2]"] + [f"l{i}: &l{i} [*l{i - 1}, *l{i - 1}]" for i in range(1, 60)]
    path = tmp_path / "many.yaml"
    path.write_text("task:\n" + "".join(f"  {line}\n" for line in levels))
    assert load_config(path).task["l59"][0][0]  # 2**59 leaves once expanded; never walked


def test_too_deep_free_form_value_is_rejected():
    with pytest.raises(ConfigError, match=r"task\.extra.* nested more than"):
        load_config(None, ["task.extra=" + "[" * 200 + "]" * 200])


@pytest.mark.parametrize("kind", ["nonfinite", "reward", "disk_full"])
def test_cli_run_failures_exit_1_with_one_line(monkeypatch, capsys, kind):
    """Bug 9: a run that fails after a good start (non-finite loss, an aborting reward, a full
    disk) printed a full traceback; now one line and exit 1 (input errors keep exit 2)."""
    import errno

    from posttrain import cli

    def fail(args):
        if kind == "nonfinite":
            from posttrain.trainers.rl import NonFiniteLossError

            raise NonFiniteLossError("3 consecutive non-finite loss/gradient steps at step 4;\nlast good: step_3")
        if kind == "reward":
            from posttrain.rewards.errors import RewardError

            raise RewardError("reward 'x' failed on problem 'p': ValueError('boom')", problem_id="p", reward_name="x",
                              completions=["a"], cause=ValueError("boom"))
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoints/step_2.tmp")

    monkeypatch.setattr(cli, "_rl", fail)
    rc = cli.main(["rl", "c.yaml"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("posttrain: error:") and "Traceback" not in err, err
    needle = {"nonfinite": "last good: step_3", "reward": "failed on problem 'p'", "disk_full": "No space left"}[kind]
    assert needle in lines[0]


def test_cli_other_errors_still_raise(monkeypatch):
    """Bugs keep their traceback: only the known run failures are turned into one line."""
    from posttrain import cli

    def fail(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_rl", fail)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["rl", "c.yaml"])

    def other_oserror(args):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(cli, "_rl", other_oserror)
    with pytest.raises(OSError, match="Input/output"):
        cli.main(["rl", "c.yaml"])


def test_a_missing_optional_extra_is_one_line_and_exit_2(tmp_path, capsys):
    """Bug: rollout.engine=vllm without vLLM installed ended in a traceback (found by the generator above)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  name: tiny-random\n")
    assert main(["rl", str(cfg), "rollout.engine=vllm", "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "vLLM is not usable here" in err and "rollout.engine=hf" in err
    assert not (tmp_path / "run").exists()
