"""Demonstrations for supervised fine-tuning, as the pipeline's one batch type.

Sources (``data:`` of ``posttrain sft``):
* a JSONL file, one object per line: ``{"prompt": text or chat messages, "completion": text}``,
  or ``{"messages": [...]}`` whose last message is the assistant's (the completion) and whose
  earlier messages are the prompt. Errors name the file and the line.
* a task's problems (``data.path: null``): the prompt is the problem's, the completion its
  ``answer`` (or ``metadata["solution"]`` with ``data.completion: solution``).

A demonstration becomes one row of a ``Rollouts``: the prompt rendered exactly as the sampler
renders it (chat template with the generation prompt), the completion's tokens plus EOS as the
"completion", so the learner's log-prob pass is the RL one and the loss masks prompt tokens by
construction (they are never in ``completion_mask``).

Length bucketing (``data.length_bucketing``, sft.LengthBucketSampler) composes each batch of
demonstrations of similar length. Packing several demonstrations into one row was not built: the
learner's passes (models/logprobs.py, the lean decoder's ``additive_mask``) take one key mask per
row, so attention across the packed examples could not be blocked without changing them; the lean
decoder already skips padded positions in every token-wise op (``fast_decoder.Packing``), so
padding costs there only in the attention grid, which packing would make longer, not shorter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from posttrain.rollout.batch import Rollouts
from posttrain.rollout.sampler import render_prompt
from posttrain.tasks.base import Problem
from posttrain.trainers.preference_data import read_text_lines


class DemonstrationError(ValueError):
    """A demonstration file or task cannot be used for SFT (the message says where and why)."""


@dataclass
class Demonstration:
    problem: Problem  # the prompt (and, for task data, what the verifier needs)
    completion: str
    where: str  # "file:line" or "task problem <id>", for messages


def _check_messages(messages: Any, where: str) -> None:
    if not (isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages)):
        raise DemonstrationError(f"{where}: messages must be a non-empty list of {{'role': str, 'content': str}}")


def read_jsonl(path: str | Path) -> list[Demonstration]:
    path = Path(path)
    lines = read_text_lines(path, DemonstrationError, "data file", " (data.path / data.validation_path)")
    out = []
    for i, line in enumerate(lines, 1):
        where = f"{path}:{i}"
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DemonstrationError(f"{where}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DemonstrationError(f"{where}: expected a JSON object")
        if "messages" in record:
            _check_messages(record["messages"], where)
            *prompt, last = record["messages"]
            if last["role"] != "assistant" or not prompt:
                raise DemonstrationError(f"{where}: 'messages' must end with the assistant's turn after at least one "
                                         "earlier message (it is the completion)")
            prompt, completion = prompt, last["content"]
        elif "prompt" in record and "completion" in record:
            prompt, completion = record["prompt"], record["completion"]
            if not isinstance(prompt, str):
                _check_messages(prompt, where)
        else:
            raise DemonstrationError(f"{where}: needs 'prompt' and 'completion', or 'messages' (found keys "
                                     f"{sorted(record)})")
        if not isinstance(completion, str) or not completion.strip():
            raise DemonstrationError(f"{where}: the completion is empty or not text")
        out.append(Demonstration(Problem(id=where, prompt=prompt), completion, where))
    if not out:
        raise DemonstrationError(f"data file {path} holds no demonstrations")
    return out


def from_task(problems: Sequence[Problem], completion: str = "answer") -> list[Demonstration]:
    """Each problem with its answer (or worked solution) as the completion."""
    out = []
    for p in problems:
        text = p.answer if completion == "answer" else p.metadata.get("solution")
        if not isinstance(text, str) or not text.strip():
            raise DemonstrationError(f"task problem {p.id!r} has no {completion!r} to imitate: choose "
                                     f"data.completion={'solution' if completion == 'answer' else 'answer'} or a "
                                     "data.path file")
        out.append(Demonstration(p, text, f"task problem {p.id}"))
    return out


def encode(tokenizer, demos: Sequence[Demonstration], chat_template: bool,
           max_length: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + EOS) per demonstration; errors before any training."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DemonstrationError("the tokenizer has no EOS token, so a completion could not be taught to end")
    out = []
    for d in demos:
        prompt = render_prompt(tokenizer, d.problem.prompt, chat_template)
        completion = tokenizer(d.completion, add_special_tokens=False)["input_ids"]
        if not prompt or not completion:
            raise DemonstrationError(f"{d.where}: the {'prompt' if not prompt else 'completion'} encodes to no "
                                     "tokens, so there would be nothing to learn")
        if len(prompt) + len(completion) + 1 > max_length:
            raise DemonstrationError(f"{d.where}: {len(prompt)} prompt + {len(completion) + 1} completion tokens "
                                     f"exceed data.max_length={max_length}; raise it or shorten the demonstration")
        out.append((prompt, completion + [eos]))
    return out


def collate(encoded: Sequence[tuple[list[int], list[int]]], demos: Sequence[Demonstration],
            pad_id: int = 0) -> Rollouts:
    """One ``Rollouts`` row per demonstration: prompts left-padded, completions right-padded."""
    n = len(encoded)
    P = max(len(p) for p, _ in encoded)
    T = max(len(c) for _, c in encoded)
    prompt_ids = torch.full((n, P), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((n, P), dtype=torch.long)
    completion_ids = torch.full((n, T), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((n, T))
    for i, (p, c) in enumerate(encoded):
        prompt_ids[i, P - len(p):], prompt_mask[i, P - len(p):] = torch.tensor(p), 1
        completion_ids[i, :len(c)], completion_mask[i, :len(c)] = torch.tensor(c), 1.0
    return Rollouts(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                    completion_mask=completion_mask, group_ids=torch.arange(n), behaviour_logprobs=torch.zeros(n, T),
                    entropies=None, truncated=torch.zeros(n, dtype=torch.bool), texts=[d.completion for d in demos],
                    problems=[d.problem for d in demos])


def load_demonstrations(data_cfg, task) -> tuple[list[Demonstration], Optional[list[Demonstration]]]:
    """(train, held-out) demonstrations per ``data:`` (held-out None when there is none)."""
    train = read_jsonl(data_cfg.path) if data_cfg.path else from_task(task.problems("train"), data_cfg.completion)
    if data_cfg.validation_path:
        return train, read_jsonl(data_cfg.validation_path)
    if not data_cfg.path:
        return train, from_task(task.problems("test"), data_cfg.completion)
    return train, None


def padding_fraction(batch: Rollouts) -> float:
    """Share of the batch's [rows, prompt width + completion width] grid that is padding."""
    real = float(batch.prompt_mask.sum() + batch.completion_mask.sum())
    grid = batch.prompt_ids.numel() + batch.completion_ids.numel()
    return 1.0 - real / grid

