"""Task sources from local data files: JSONL (``JsonlTask``) and anything the ``datasets``
library reads from disk (``HFDatasetTask``: json / csv / parquet; never the hub).

A field mapping says which record field feeds which ``Problem`` attribute::

    fields={"prompt": "question", "answer": "answer", "tests": None, "id": None, "difficulty": None,
            "category": None}

``None`` leaves the attribute unset (``id`` then becomes a hash of the prompt). ``category``
(what curricula group prompts by) is kept as text: ``"Algebra"``, or ``3`` -> ``"3"``. Nested fields
are written with dots (``"meta.level"``). A mapped field that a record lacks is an error
naming the file, the line (or row) and the field.

Splits: with ``test_path`` the two files are the two splits (train records whose prompt is
also a test prompt are dropped); otherwise each record goes to "test" or "train" by a hash of
its prompt text salted with ``seed``, so duplicated prompts always land in the same split.
Duplicate prompts within a split are dropped (first one kept).

``answer_format`` post-processes the answer field: ``"gsm8k"`` (the number after ``####``) or
``"math"`` (the last ``\\boxed{}``); the full text is kept in ``metadata["solution"]``.

Prompts: a string, or a list of chat messages ``[{"role", "content"}]``. ``prompt_template``
(a format string with ``{prompt}``) rewrites a string prompt, or the last user message of a
list; ``system_prompt`` adds a system message first (unless the record has its own).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Optional

from posttrain.tasks.answers import ANSWER_FORMATS
from posttrain.tasks.base import Problem, check_split, split_of

DEFAULT_FIELDS: dict[str, Optional[str]] = {
    "prompt": "question",
    "answer": "answer",
    "tests": None,
    "id": None,
    "difficulty": None,
    "category": None,
}

_MISSING = object()


def _merge_fields(fields: Optional[dict[str, Optional[str]]], base: dict[str, Optional[str]]) -> dict:
    merged = dict(base)
    if fields:
        unknown = sorted(set(fields) - set(DEFAULT_FIELDS))
        if unknown:
            raise ValueError(f"task.fields has unknown key(s) {unknown}; allowed: {sorted(DEFAULT_FIELDS)}")
        merged.update(fields)
    if not merged.get("prompt"):
        raise ValueError("task.fields must map 'prompt' to a record field")
    return merged


def _lookup(record: Any, dotted: str) -> Any:
    value = record
    for part in dotted.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        else:
            return _MISSING
    return value


def _prompt_key(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def _check_unicode(text: Any, where: str, field: str) -> None:
    """JSON can spell a lone surrogate (``"\\ud800"``), which no UTF-8 writer or tokenizer takes."""
    if isinstance(text, str):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"{where}: field {field!r} is not valid Unicode text "
                f"(lone surrogate {exc.object[exc.start]!r} at character {exc.start})"
            ) from None


def _difficulty(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"not a number: {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    match = re.search(r"[-+]?\d+(?:\.\d+)?", str(value))  # "Level 3" -> 3.0
    if match is None:
        raise ValueError(f"not a number: {value!r}")
    return float(match.group(0))


class RecordMapper:
    """Turns raw records into ``Problem``s; every error names ``where`` (file and line)."""

    def __init__(
        self,
        fields: dict[str, Optional[str]],
        *,
        answer_format: Optional[str] = None,
        system_prompt: Optional[str] = None,
        prompt_template: Optional[str] = None,
        id_prefix: str = "data",
    ):
        if answer_format is not None and answer_format not in ANSWER_FORMATS:
            raise ValueError(f"task.answer_format is {answer_format!r}; allowed: {sorted(ANSWER_FORMATS)} or None")
        if prompt_template is not None and "{prompt}" not in prompt_template:
            raise ValueError("task.prompt_template must contain {prompt}")
        if prompt_template is not None:
            try:
                prompt_template.format(prompt="x")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(
                    f"task.prompt_template is not a valid format string with only {{prompt}} ({exc!r}); "
                    "write literal braces as {{ and }}"
                ) from None
        self.fields = fields
        self.answer_format = answer_format
        self.system_prompt = system_prompt
        self.prompt_template = prompt_template
        self.id_prefix = id_prefix

    def _get(self, record: dict, attr: str, where: str, required: bool) -> Any:
        name = self.fields.get(attr)
        if not name:
            return None
        value = _lookup(record, name)
        if value is _MISSING or (value is None and required):
            have = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{where}: missing field {name!r} (mapped to {attr}); the record has {have}")
        return value

    def _prompt(self, raw: Any, where: str) -> Any:
        if isinstance(raw, str):
            text = self.prompt_template.format(prompt=raw) if self.prompt_template else raw
            if self.system_prompt is None:
                return text
            return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": text}]
        if isinstance(raw, list) and raw:
            messages = []
            for i, m in enumerate(raw):
                if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                    raise ValueError(
                        f"{where}: prompt message {i} is not a {{'role': str, 'content': str}} dict: {m!r}"
                    )
                messages.append({"role": m["role"], "content": m["content"]})
            if self.prompt_template:
                users = [i for i, m in enumerate(messages) if m["role"] == "user"]
                if not users:
                    raise ValueError(f"{where}: prompt_template needs a user message in the prompt")
                last = messages[users[-1]]
                last["content"] = self.prompt_template.format(prompt=last["content"])
            if self.system_prompt is not None and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": self.system_prompt})
            return messages
        raise ValueError(f"{where}: the prompt must be a string or a non-empty list of chat messages, got {raw!r:.80}")

    def to_problem(self, record: Any, where: str, location: dict[str, Any]) -> Problem:
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        raw_prompt = self._get(record, "prompt", where, required=True)
        prompt = self._prompt(raw_prompt, where)
        metadata: dict[str, Any] = {**location, "record": record}
        answer = self._get(record, "answer", where, required=True)
        if answer is not None:
            answer = answer if isinstance(answer, str) else json.dumps(answer) if isinstance(answer, (list, dict)) else str(answer)
            _check_unicode(answer, where, self.fields["answer"])
            if self.answer_format:
                metadata["solution"] = answer
                final = ANSWER_FORMATS[self.answer_format](answer)
                if final is None:
                    what = "'#### <number>'" if self.answer_format == "gsm8k" else "\\boxed{...}"
                    raise ValueError(
                        f"{where}: field {self.fields['answer']!r} has no {what} final answer "
                        f"(answer_format={self.answer_format!r}): {answer[-120:]!r}"
                    )
                answer = final
        tests = self._get(record, "tests", where, required=True)
        if isinstance(tests, list):
            tests = "\n".join(map(str, tests))
        difficulty = self._get(record, "difficulty", where, required=False)
        if difficulty is not None:
            try:
                difficulty = _difficulty(difficulty)
            except ValueError as exc:
                raise ValueError(f"{where}: field {self.fields['difficulty']!r} (difficulty): {exc}") from None
        category = self._get(record, "category", where, required=False)
        if category is not None:
            if isinstance(category, (dict, list)):
                raise ValueError(
                    f"{where}: field {self.fields['category']!r} (category) must be a string or a number, "
                    f"got {type(category).__name__}"
                )
            category = str(category)
            _check_unicode(category, where, self.fields["category"])
        pid = self._get(record, "id", where, required=True)
        key = _prompt_key(raw_prompt)
        _check_unicode(key, where, self.fields["prompt"])
        _check_unicode(tests, where, self.fields.get("tests"))
        if pid is None:
            pid = f"{self.id_prefix}:{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        return Problem(
            id=str(pid),
            prompt=prompt,
            answer=answer,
            tests=tests,
            difficulty=difficulty,
            category=category,
            metadata={**metadata, "prompt_key": key},
        )


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """``(line_number, record)`` for each non-blank line (1-based numbers)."""
    gzipped = path.suffix == ".gz"
    opener = gzip.open if gzipped else open
    with opener(path, "rt", encoding="utf-8") as fh:
        try:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}, line {lineno}: malformed JSON: {exc.msg} (column {exc.colno})") from None
                except RecursionError:
                    raise ValueError(f"{path}, line {lineno}: JSON nested too deeply to parse") from None
                yield lineno, record
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text ({exc.reason})") from None
        except (OSError, EOFError, zlib.error) as exc:
            if not gzipped:
                raise
            # gzip.BadGzipFile (an OSError), a truncated stream (EOFError), a corrupt deflate block
            raise ValueError(f"{path}: not a readable gzip file ({type(exc).__name__}: {exc})") from None


def _check_file(path: os.PathLike | str, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{what}: no such file: {p}")
    return p


def _dedupe(problems: Iterable[Problem], drop_keys: set[str] = frozenset()) -> list[Problem]:
    seen: set[str] = set(drop_keys)
    out = []
    for p in problems:
        key = p.metadata["prompt_key"]
        if key in seen:
            continue
        seen.add(key)
        out.append(p)
    return out


def _where(p: Problem) -> str:
    m = p.metadata
    return f"{m.get('source')}, line {m['line']}" if "line" in m else f"{m.get('source')}, row {m.get('row')}"


def _check_ids(problems: list[Problem]) -> None:
    first: dict[str, Problem] = {}
    for p in problems:
        if p.id in first:
            raise ValueError(f"duplicate problem id {p.id!r}: {_where(first[p.id])} and {_where(p)}")
        first[p.id] = p


class _FileTask:
    """Set-up and split logic shared by the file loaders (subclasses read the records)."""

    name = "data"

    def _setup(
        self,
        name: Optional[str],
        fields: Optional[dict[str, Optional[str]]],
        *,
        answer_format: Optional[str],
        system_prompt: Optional[str],
        prompt_template: Optional[str],
    ) -> None:
        """Name, field mapping and record mapper (set before any file is read: the mapper checks its options)."""
        if name:
            self.name = name
        self.fields = _merge_fields(fields, DEFAULT_FIELDS)
        self.mapper = RecordMapper(
            self.fields,
            answer_format=answer_format,
            system_prompt=system_prompt,
            prompt_template=prompt_template,
            id_prefix=self.name,
        )

    def _finish(
        self,
        train_all: list[Problem],
        test_all: Optional[list[Problem]],
        source: str,
        *,
        test_fraction: float,
        seed: int,
        max_train: Optional[int],
        max_test: Optional[int],
    ) -> None:
        if test_all is not None:
            test = _dedupe(test_all)
            train = _dedupe(train_all, {p.metadata["prompt_key"] for p in test})
        else:
            if not 0.0 <= test_fraction <= 1.0:
                raise ValueError(f"task.test_fraction must be in [0, 1], got {test_fraction}")
            pool = _dedupe(train_all)
            salt = f"data:{seed}"  # not the loader name: one file splits alike through every loader
            test = [p for p in pool if split_of(p.metadata["prompt_key"], test_fraction, salt) == "test"]
            train = [p for p in pool if split_of(p.metadata["prompt_key"], test_fraction, salt) == "train"]
            if pool and 0.0 < test_fraction < 1.0 and (not test or not train):
                empty = "test" if not test else "train"
                raise ValueError(
                    f"{source}: the hash split (test_fraction={test_fraction}) of {len(pool)} records left the "
                    f"{empty} split empty: add records, change task.test_fraction, or give task.test_path"
                )
        if max_train is not None:
            train = train[:max_train]
        if max_test is not None:
            test = test[:max_test]
        _check_ids(train + test)
        self._splits = {"train": train, "test": test}

    def problems(self, split: str) -> list[Problem]:
        check_split(split)
        return list(self._splits[split])


class JsonlTask(_FileTask):
    """Problems from a local JSONL file (``.jsonl`` or ``.jsonl.gz``); see the module doc."""

    name = "jsonl"

    def __init__(
        self,
        path: os.PathLike | str,
        fields: Optional[dict[str, Optional[str]]] = None,
        test_path: Optional[os.PathLike | str] = None,
        test_fraction: float = 0.1,
        seed: int = 0,
        *,
        system_prompt: Optional[str] = None,
        prompt_template: Optional[str] = None,
        answer_format: Optional[str] = None,
        max_train: Optional[int] = None,
        max_test: Optional[int] = None,
        name: Optional[str] = None,
    ):
        self._setup(name, fields,
                    answer_format=answer_format, system_prompt=system_prompt, prompt_template=prompt_template)
        train_path = _check_file(path, "task.path")
        train_all = self._load(train_path)
        test_all = self._load(_check_file(test_path, "task.test_path")) if test_path is not None else None
        self._finish(train_all, test_all, str(train_path),
                     test_fraction=test_fraction, seed=seed, max_train=max_train, max_test=max_test)

    def _load(self, path: Path) -> list[Problem]:
        out = []
        for lineno, record in _iter_jsonl(path):
            where = f"{path}, line {lineno}"
            out.append(self.mapper.to_problem(record, where, {"source": str(path), "line": lineno}))
        if not out:
            raise ValueError(f"{path}: the file is empty (no JSON records)")
        return out


_HF_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def _hf_format(files: list[Path], fmt: Optional[str]) -> str:
    if fmt is not None:
        if fmt not in set(_HF_FORMATS.values()):
            raise ValueError(f"task.format is {fmt!r}; allowed: {sorted(set(_HF_FORMATS.values()))}")
        return fmt
    found = set()
    for f in files:
        suffixes = [s for s in f.suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
        fmt_f = _HF_FORMATS.get(suffixes[-1] if suffixes else "")
        if fmt_f is None:
            raise ValueError(f"cannot tell the format of {f} from its name: set task.format to json, csv or parquet")
        found.add(fmt_f)
    if len(found) != 1:
        raise ValueError(f"data files mix formats {sorted(found)}: give one format per task")
    return found.pop()


class HFDatasetTask(_FileTask):
    """Problems from local files read with ``datasets.load_dataset("json"|"csv"|"parquet",
    data_files=...)``. Only local paths are accepted; the hub is never contacted."""

    name = "hf_local"

    def __init__(
        self,
        data_files: os.PathLike | str | list,
        fields: Optional[dict[str, Optional[str]]] = None,
        test_files: Optional[os.PathLike | str | list] = None,
        test_fraction: float = 0.1,
        seed: int = 0,
        *,
        format: Optional[str] = None,
        system_prompt: Optional[str] = None,
        prompt_template: Optional[str] = None,
        answer_format: Optional[str] = None,
        max_train: Optional[int] = None,
        max_test: Optional[int] = None,
        name: Optional[str] = None,
    ):
        self._setup(name, fields,
                    answer_format=answer_format, system_prompt=system_prompt, prompt_template=prompt_template)
        train_files = self._files(data_files, "task.data_files")
        test_list = self._files(test_files, "task.test_files") if test_files is not None else None
        fmt = _hf_format(train_files + (test_list or []), format)
        train_all = self._load(train_files, fmt)
        test_all = self._load(test_list, fmt) if test_list is not None else None
        self._finish(train_all, test_all, ", ".join(map(str, train_files)),
                     test_fraction=test_fraction, seed=seed, max_train=max_train, max_test=max_test)

    @staticmethod
    def _files(files: Any, what: str) -> list[Path]:
        items = [files] if isinstance(files, (str, os.PathLike)) else list(files)
        if not items:
            raise ValueError(f"{what} is empty")
        return [_check_file(f, what) for f in items]

    def _load(self, files: list[Path], fmt: str) -> list[Problem]:
        try:
            import datasets
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError("HFDatasetTask needs the `datasets` package: pip install datasets") from exc
        source = ", ".join(map(str, files))
        # a throwaway cache: the rows are kept in memory, and nothing stale is ever reused
        with tempfile.TemporaryDirectory(prefix="posttrain-hf-") as cache_dir:
            try:
                ds = datasets.load_dataset(
                    fmt, data_files=[str(f) for f in files], split="train", keep_in_memory=True, cache_dir=cache_dir
                )
            except Exception as exc:  # noqa: BLE001 - the datasets library raises many kinds
                raise ValueError(f"{source}: could not read as {fmt}: {type(exc).__name__}: {exc}") from exc
            columns = set(ds.column_names)
            rows = list(ds)
        if not rows:
            raise ValueError(f"{source}: no records")
        for attr, name in self.fields.items():
            if name and name.split(".")[0] not in columns:
                raise ValueError(f"{source}: missing field {name!r} (mapped to {attr}); columns are {sorted(columns)}")
        return [
            self.mapper.to_problem(record, f"{source}, row {i}", {"source": source, "row": i})
            for i, record in enumerate(rows)
        ]


# ----------------------------------------------------------------------------- configs


@dataclass
class JsonlConfig:
    path: str = ""
    fields: Optional[dict] = None  # merged over DEFAULT_FIELDS (or the preset's fields)
    test_path: Optional[str] = None
    test_fraction: float = 0.1
    seed: int = 0
    system_prompt: Optional[str] = None
    prompt_template: Optional[str] = None
    answer_format: Optional[str] = None  # None, "gsm8k" or "math"
    max_train: Optional[int] = None
    max_test: Optional[int] = None

    PRESET_FIELDS: ClassVar[dict[str, Optional[str]]] = {}
    TASK_NAME: ClassVar[str] = "jsonl"

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError(f"task {self.TASK_NAME!r} needs task.path (a local .jsonl file)")
        self.fields = {**self.PRESET_FIELDS, **(self.fields or {})}

    def build(self) -> JsonlTask:
        return JsonlTask(
            self.path,
            fields=_merge_fields(self.fields, DEFAULT_FIELDS),
            test_path=self.test_path,
            test_fraction=self.test_fraction,
            seed=self.seed,
            system_prompt=self.system_prompt,
            prompt_template=self.prompt_template,
            answer_format=self.answer_format,
            max_train=self.max_train,
            max_test=self.max_test,
            name=self.TASK_NAME,
        )


@dataclass
class GSM8KJsonlConfig(JsonlConfig):
    """GSM8K-style JSONL: ``question`` and an ``answer`` ending in ``#### <number>``."""

    answer_format: Optional[str] = "gsm8k"
    PRESET_FIELDS: ClassVar[dict[str, Optional[str]]] = {"prompt": "question", "answer": "answer"}
    TASK_NAME: ClassVar[str] = "gsm8k_jsonl"


@dataclass
class MATHJsonlConfig(JsonlConfig):
    """MATH-style JSONL: ``problem`` and a ``solution`` with a final ``\\boxed{}``."""

    answer_format: Optional[str] = "math"
    PRESET_FIELDS: ClassVar[dict[str, Optional[str]]] = {"prompt": "problem", "answer": "solution"}
    TASK_NAME: ClassVar[str] = "math_jsonl"


@dataclass
class HFLocalConfig:
    data_files: Any = None  # a path or a list of paths (json/jsonl, csv, parquet)
    fields: Optional[dict] = None
    test_files: Any = None
    test_fraction: float = 0.1
    seed: int = 0
    format: Optional[str] = None  # inferred from the file names when None
    system_prompt: Optional[str] = None
    prompt_template: Optional[str] = None
    answer_format: Optional[str] = None
    max_train: Optional[int] = None
    max_test: Optional[int] = None

    def __post_init__(self) -> None:
        if not self.data_files:
            raise ValueError("task 'hf_local' needs task.data_files (local file path or list of paths)")

    def build(self) -> HFDatasetTask:
        return HFDatasetTask(
            self.data_files,
            fields=self.fields,
            test_files=self.test_files,
            test_fraction=self.test_fraction,
            seed=self.seed,
            format=self.format,
            system_prompt=self.system_prompt,
            prompt_template=self.prompt_template,
            answer_format=self.answer_format,
            max_train=self.max_train,
            max_test=self.max_test,
        )
