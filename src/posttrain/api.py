"""Train from Python with your own reward function, dataset or environment, and the CLI's config.

    from posttrain import load_config, train

    def exact(completions, answer, **kwargs):  # TRL's convention: keyword lists in, one float per completion
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    rows = [{"prompt": f"What is {a} + {b}? Answer with just the number.", "answer": str(a + b)}
            for a in range(10) for b in range(10)]
    cfg = load_config("examples/arithmetic.yaml", ["trainer.steps=5"])
    summary = train(cfg, reward=exact, dataset=rows)

Reward functions are called as TRL calls them, so TRL users' functions work unchanged: keyword
arguments ``prompts``, ``completions`` and ``completion_ids`` (lists, one entry per completion of
one prompt's group) plus every field of the dataset row (``answer`` and any other column),
repeated per completion; ``**kwargs`` absorbs the rest. They return one number per completion
(``None`` is an error here: posttrain scores every completion). A function that raises, or
returns the wrong count, fails with an error naming it (``trainer.on_reward_error`` decides
whether the run stops or scores the group 0). Held-out accuracy counts reward > 0 as correct.

``dataset`` / ``test_dataset``: a list of dicts or a ``datasets.Dataset`` with a ``prompt``
column (text or chat messages) and optionally ``answer`` and ``id``; without ``test_dataset`` a
``test_fraction`` of the rows, chosen by a hash of the prompt, is held out. ``environment``: an
``Environment`` instance (posttrain.environments) for multi-turn episodes.

What came from Python is recorded in ``RUN_DIR/python_api.json`` (config.yaml keeps the rest):
resume such a run with ``train(..., resume=True)`` and the same objects, not from the CLI.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from posttrain.config import RLConfig, load_config
from posttrain.rewards.base import RewardOutput
from posttrain.tasks.base import Problem, check_split, split_of

__all__ = ["DatasetTask", "FunctionReward", "load_config", "train"]


class FunctionReward:
    """A Python function as a posttrain Reward, called with TRL's keyword convention."""

    def __init__(self, fn: Callable[..., Any], tokenizer=None):
        if not callable(fn):
            raise TypeError(f"reward must be a function, got {type(fn).__name__}")
        self.fn, self.tokenizer = fn, tokenizer
        self.name = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, problem: Problem, completions) -> RewardOutput:
        n = len(completions)
        fields = {"answer": problem.answer, **problem.metadata.get("row", {})}
        kwargs = {"prompts": [problem.prompt] * n, "completions": list(completions),
                  **{k: [v] * n for k, v in fields.items() if k not in ("prompt", "completion")}}
        if self.tokenizer is not None:
            kwargs["completion_ids"] = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in completions]
        out = self.fn(**kwargs)
        if not isinstance(out, (list, tuple)) or len(out) != n:
            raise ValueError(f"reward function {self.name!r} returned {type(out).__name__} of length "
                             f"{len(out) if hasattr(out, '__len__') else '?'}; it must return a list of {n} numbers "
                             "(one per completion)")
        bad = [i for i, x in enumerate(out) if isinstance(x, bool) or not isinstance(x, (int, float))]
        if bad:
            raise ValueError(f"reward function {self.name!r} returned {out[bad[0]]!r} for completion {bad[0]}; "
                             "it must return a number for every completion")
        return RewardOutput(rewards=[float(x) for x in out])


class DatasetTask:
    """A TaskSource over rows of a list or a ``datasets.Dataset``."""

    name = "dataset"

    def __init__(self, rows: Iterable[dict], test_rows: Optional[Iterable[dict]] = None,
                 test_fraction: float = 0.1, salt: str = ""):
        train = [self._problem(r, i, "train") for i, r in enumerate(rows)]
        if test_rows is not None:
            self.splits = {"train": train, "test": [self._problem(r, i, "test") for i, r in enumerate(test_rows)]}
        else:  # a hash of the prompt decides, so the split does not depend on the rows' order
            self.splits = {s: [p for p in train if split_of(json.dumps(p.prompt, sort_keys=True), test_fraction, salt)
                               == s] for s in ("train", "test")}
        for split, problems in self.splits.items():
            if not problems:
                raise ValueError(f"the dataset's {split} split is empty: give more rows, a test_dataset, or another "
                                 f"test_fraction (now {test_fraction})")

    @staticmethod
    def _problem(row: dict, i: int, split: str) -> Problem:
        if not isinstance(row, dict) or "prompt" not in row:
            raise ValueError(f"dataset row {i} ({split}) needs a 'prompt' field, got "
                             f"{sorted(row) if isinstance(row, dict) else type(row).__name__}")
        key = json.dumps(row["prompt"], sort_keys=True)
        pid = str(row.get("id", hashlib.sha256(key.encode()).hexdigest()[:12]))
        answer = row.get("answer")
        return Problem(id=pid, prompt=row["prompt"], answer=None if answer is None else str(answer),
                       metadata={"row": {k: v for k, v in row.items() if k not in ("prompt", "id")}})

    def problems(self, split: str) -> list[Problem]:
        check_split(split)
        return list(self.splits[split])


def train(cfg: RLConfig | str, reward: Optional[Callable] = None, dataset=None, test_dataset=None,
          environment=None, output_dir: Optional[str] = None, resume: bool = False, quiet: bool = False,
          test_fraction: float = 0.1) -> dict:
    """RL per ``cfg`` (a config or a YAML path) with Python objects in place of config sections:
    ``reward`` (a function) replaces ``reward:``, ``dataset`` replaces ``task:``, ``environment``
    replaces ``environment:``. Returns the run's summary (``eval_before``, ``eval_after``, ...)."""
    from posttrain.trainers.rl_run import train_rl

    if isinstance(cfg, (str, Path)):
        cfg = load_config(cfg)
    if reward is not None and (not callable(reward) or inspect.isclass(reward)):
        raise TypeError(f"reward must be a function (TRL's convention), got {reward!r}")
    task = DatasetTask(dataset, test_dataset, test_fraction) if dataset is not None else None
    record = {"reward": getattr(reward, "__name__", None), "dataset_rows": None if task is None else
              {s: len(task.problems(s)) for s in ("train", "test")},
              "environment": None if environment is None else type(environment).__name__}
    return train_rl(cfg, output_dir=output_dir, resume=resume, quiet=quiet, task=task,
                    reward=FunctionReward(reward) if reward is not None else None, environment=environment,
                    python_api=record)
