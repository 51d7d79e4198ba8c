"""Adapter to the ``reasoning_gym`` package (a test extra; imported lazily).

``ReasoningGymTask`` draws entries from ``reasoning_gym.create_dataset(dataset, seed=...,
size=..., **options)`` index by index. Entries are deduplicated by question text and split
by a hash of that text (salted with the dataset name, not the seed), so the splits are
disjoint and no seed's test question is another seed's training question.

``ReasoningGymReward`` scores completions with the dataset's own ``score_answer`` on the
answer extracted from the last ``<answer>...</answer>`` (or else the last non-empty line).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

from posttrain.rewards.base import RewardOutput
from posttrain.tasks.base import Problem
from posttrain.tasks.splits import HashSplitTask

DEFAULT_TEMPLATE = "{prompt}\n\nGive your final answer inside <answer></answer> tags."


def _rg():
    try:
        import reasoning_gym
        from reasoning_gym.factory import DATASETS
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the reasoning_gym task needs the `reasoning-gym` package: pip install reasoning-gym") from exc
    return reasoning_gym, DATASETS


def _create(dataset: str, options: dict[str, Any], seed: int, size: int):
    reasoning_gym, datasets = _rg()
    if dataset not in datasets:
        names = sorted(datasets)
        close = [n for n in names if dataset.lower() in n or n in dataset.lower()]
        hint = f" (did you mean {close[:5]}?)" if close else ""
        raise ValueError(f"task.dataset {dataset!r} is not a reasoning_gym dataset{hint}; available: {', '.join(names)}")
    try:
        return reasoning_gym.create_dataset(dataset, seed=seed, size=size, **options)
    except TypeError as exc:
        raise ValueError(f"task.options {sorted(options)} do not fit reasoning_gym dataset {dataset!r}: {exc}") from None
    except AssertionError as exc:  # reasoning_gym validates configs with assert
        raise ValueError(f"task.options are invalid for reasoning_gym dataset {dataset!r}: {exc}") from None


@dataclass
class ReasoningGymConfig:
    dataset: str = "basic_arithmetic"
    options: dict = field(default_factory=dict)  # the dataset's own config knobs (difficulty)
    test_size: int = 100
    train_size: int = 1_000
    seed: int = 0
    test_fraction: float = 0.1
    max_draws: Optional[int] = None  # entries generated at most; default: ~3x what the splits need
    prompt_template: Optional[str] = DEFAULT_TEMPLATE
    system_prompt: Optional[str] = None

    def __post_init__(self) -> None:
        if self.test_size < 1 or self.train_size < 1:
            raise ValueError("task.test_size and task.train_size must be >= 1")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"task.test_fraction must be in (0, 1), got {self.test_fraction}")
        clash = sorted({"seed", "size"} & set(self.options))
        if clash:
            raise ValueError(f"task.options may not set {clash}: use task.seed and task.test_size/train_size")
        if self.prompt_template is not None and "{prompt}" not in self.prompt_template:
            raise ValueError("task.prompt_template must contain {prompt}")
        if self.max_draws is None:
            need = self.test_size / self.test_fraction + self.train_size / (1.0 - self.test_fraction)
            self.max_draws = int(3 * need) + 100
        if self.max_draws < 1:
            raise ValueError("task.max_draws must be >= 1")


class ReasoningGymTask(HashSplitTask):
    name = "reasoning_gym"

    def __init__(self, cfg: ReasoningGymConfig | None = None, **kwargs: Any):
        self.cfg = cfg or ReasoningGymConfig(**kwargs)
        self.name = f"reasoning_gym:{self.cfg.dataset}"
        self._dataset = _create(self.cfg.dataset, dict(self.cfg.options), self.cfg.seed, self.cfg.max_draws)
        self._cache = None

    @property
    def dataset(self):
        """The underlying ``reasoning_gym`` dataset (its ``score_answer`` verifies)."""
        return self._dataset

    def _stream(self) -> Iterator[tuple[str, Any]]:
        for idx in range(self.cfg.max_draws):
            entry = self._dataset[idx]
            yield entry["question"], entry

    def _prompt(self, question: str) -> Any:
        c = self.cfg
        text = c.prompt_template.format(prompt=question) if c.prompt_template else question
        if c.system_prompt is None:
            return text
        return [{"role": "system", "content": c.system_prompt}, {"role": "user", "content": text}]

    def build(self, question: str, entry: dict) -> Problem:
        c = self.cfg
        digest = hashlib.sha256(question.encode()).hexdigest()[:16]
        value = (entry.get("metadata") or {}).get("difficulty")  # a number in some datasets
        difficulty = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        return Problem(
            id=f"rg:{c.dataset}:{digest}",
            prompt=self._prompt(question),
            answer=None if entry.get("answer") is None else str(entry["answer"]),
            difficulty=difficulty,
            category=f"dataset={c.dataset}",
            metadata={
                "rg_dataset": c.dataset,
                "rg_options": dict(c.options),
                "rg_entry": entry,
                "question": question,
            },
        )


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)


def extract_tagged_answer(completion: str) -> tuple[Optional[str], bool]:
    """``(answer, tagged)``: the last ``<answer>`` content, else the last non-empty line."""
    tags = _ANSWER_TAG.findall(completion)
    if tags:
        return tags[-1].strip(), True
    lines = [line.strip() for line in completion.strip().splitlines() if line.strip()]
    return (lines[-1] if lines else None), False


class ReasoningGymReward:
    """Scores with the reasoning_gym dataset's ``score_answer(answer, entry)`` (in [0, 1]).

    The dataset and its options come from ``problem.metadata`` (as set by
    ``ReasoningGymTask``), or from ``dataset`` / ``options`` given here for problems built
    elsewhere (the entry is then rebuilt from ``problem.prompt`` / ``problem.answer``).
    Components: ``answer_tag`` (1.0 when the answer came from ``<answer>`` tags).
    """

    name = "reasoning_gym"

    def __init__(self, dataset: Optional[str] = None, options: Optional[dict] = None):
        self.dataset = dataset
        self.options = dict(options or {})
        self._scorers: dict[str, Any] = {}

    def _scorer(self, dataset: str, options: dict):
        key = json.dumps([dataset, options], sort_keys=True, default=str)
        if key not in self._scorers:
            self._scorers[key] = _create(dataset, options, seed=0, size=1)
        return self._scorers[key]

    def __call__(self, problem: Problem, completions: Sequence[str]) -> RewardOutput:
        meta = problem.metadata or {}
        dataset = meta.get("rg_dataset") or self.dataset
        if dataset is None:
            raise ValueError(
                f"ReasoningGymReward: problem {problem.id!r} has no metadata['rg_dataset']; "
                "give ReasoningGymReward(dataset=...)"
            )
        options = meta.get("rg_options", self.options)
        entry = meta.get("rg_entry") or {
            "question": problem.prompt if isinstance(problem.prompt, str) else "",
            "answer": problem.answer,
            "metadata": {},
        }
        scorer = self._scorer(dataset, dict(options))
        rewards, tagged, info = [], [], []
        for completion in completions:
            answer, has_tag = extract_tagged_answer(completion or "")
            try:
                score = float(scorer.score_answer(answer, entry))
                error = None
            except Exception as exc:  # noqa: BLE001 - a scorer failing on odd text scores 0
                score, error = 0.0, f"{type(exc).__name__}: {exc}"
            score = min(max(score, 0.0), 1.0)
            rewards.append(score)
            tagged.append(1.0 if has_tag else 0.0)
            item = {"extracted": answer, "score": score}
            if error:
                item["error"] = error
            info.append(item)
        return RewardOutput(rewards=rewards, components={"answer_tag": tagged}, info=info)
