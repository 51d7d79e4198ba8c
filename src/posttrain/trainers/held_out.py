"""Held-out task accuracy of a policy through its rollout engine, shared by every trainer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from posttrain.evaluation.runner import correct_flags
from posttrain.rewards.errors import score_rollouts
from posttrain.rollout.engine import SamplingParams
from posttrain.tasks.base import Problem


@dataclass
class EvalResult:
    accuracy: float
    n_problems: int
    mean_reward: float
    mean_length: float
    by_source: dict[str, float] = field(default_factory=dict)  # accuracy per Problem.source (mixtures)
    extra: dict[str, float] = field(default_factory=dict)  # a trainer's own held-out figures (e.g. SFT's NLL)

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "n_problems": self.n_problems, "mean_reward": self.mean_reward,
                "mean_length": self.mean_length, **{f"accuracy/{k}": v for k, v in self.by_source.items()},
                **self.extra}


def held_out_accuracy(engine, problems: Sequence[Problem], reward, params: SamplingParams, seed: int,
                      device: torch.device, on_error: str = "zero", chunk: int = 64, env=None) -> EvalResult:
    """One sample per problem at ``params``; accuracy = the reward's ``correct`` component (else
    reward > 0). A generator of its own, seeded with ``seed``, so evaluating never shifts the
    training RNG and every evaluation of a run samples alike. With ``env`` (an Environment) each
    problem is one episode, scored by the environment, and ``extra`` holds the episodes' means
    (``env/tool_use_frac``, ``env/tool_calls_per_episode``, ``env/turns_mean``, ...)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    correct, rewards, lengths, episodes = [], [], [], []
    for s in range(0, len(problems), chunk):
        if env is not None:
            from posttrain.environments.episodes import run_episodes

            r = run_episodes(engine, env, problems[s:s + chunk], 1, params, gen)
            episodes += r.metadata
        else:
            r = engine.generate(problems[s:s + chunk], 1, params, gen)
            score_rollouts(r, reward, on_error)
        flags, _ = correct_flags({k: v.tolist() for k, v in r.reward_components.items()}, r.rewards.tolist())
        correct += [float(f) for f in flags]
        rewards += r.rewards.tolist()
        lengths += r.completion_lengths.tolist()
    sources = [p.source for p in problems]
    by_source = {src: float(np.mean([c for c, s in zip(correct, sources) if s == src]))
                 for src in dict.fromkeys(sources) if src is not None}
    extra = {}
    if env is not None:
        from posttrain.environments.episodes import metadata_metrics

        extra = metadata_metrics(episodes)
    return EvalResult(float(np.mean(correct)), len(problems), float(np.mean(rewards)), float(np.mean(lengths)),
                      by_source, extra)
