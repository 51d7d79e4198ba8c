"""Registries and the typed contract shared by every algorithm.

- An advantage estimator is ``fn(inp: AdvantageInput, cfg: AdvantageConfig) -> Tensor[N, T]``.
- A policy loss is ``fn(inp: PolicyLossInput, cfg: PolicyLossConfig) -> PolicyLossOutput``
  holding a per-token loss matrix [N, T]; aggregation to a scalar happens outside the loss
  (``posttrain.algorithms.aggregation``) and no loss overrides it.
- A mismatch correction is ``fn(inp: CorrectionInput, cfg: CorrectionConfig) -> CorrectionOutput``
  acting on behaviour vs old log-probs (never on current vs old: that is the loss's clip).

Every registered function carries its paper (title, arXiv id) so ``posttrain list algorithms``
can print it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Generic, Optional, TypeVar

import torch

F = TypeVar("F", bound=Callable)


@dataclass(frozen=True)
class Entry(Generic[F]):
    kind: str
    name: str
    fn: F
    paper: str  # "Title (arXiv:XXXX.XXXXX)" or "" for textbook methods


class Registry(Generic[F]):
    """Name -> function, with the paper each one comes from."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[F]] = {}

    def register(self, name: str, paper: str = "") -> Callable[[F], F]:
        def deco(fn: F) -> F:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(self.kind, name, fn, paper)
            return fn

        return deco

    def get(self, name: str) -> F:
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; registered: {', '.join(sorted(self._entries))}")
        return self._entries[name].fn

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry[F]]:
        return [self._entries[k] for k in self.names()]

    def __contains__(self, name: str) -> bool:
        return name in self._entries


# ---------------------------------------------------------------- advantage estimators
@dataclass
class AdvantageInput:
    rewards: torch.Tensor  # [N] scalar outcome reward per sample
    group_ids: torch.Tensor  # [N] long
    mask: torch.Tensor  # [N, T] float, 1 on completion tokens
    reward_components: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [N]
    token_rewards: Optional[torch.Tensor] = None  # [N, T] process / step rewards
    values: Optional[torch.Tensor] = None  # [N, T] critic values (GAE)
    logprobs: Optional[torch.Tensor] = None  # [N, T] old (or behaviour) log-probs
    ref_logprobs: Optional[torch.Tensor] = None  # [N, T]
    baseline_rewards: Optional[torch.Tensor] = None  # [N] e.g. ReMax greedy-rollout reward
    answers: Optional[list[str]] = None  # canonical answer per sample (semantic clustering)


@dataclass
class AdvantageConfig:
    """Parameters of the advantage estimators (each estimator reads the ones it needs)."""

    eps: float = 1e-6  # added to the std in std-normalisation
    std_normalize: bool = True  # GRPO divides by the group std; False gives Dr.GRPO
    gamma: float = 1.0  # discount (GAE, REINFORCE++)
    lam: float = 0.95  # GAE lambda

    def __post_init__(self) -> None:
        if self.eps < 0:
            raise ValueError("algorithm.advantage.eps must be >= 0")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError("algorithm.advantage.gamma must be in [0, 1]")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError("algorithm.advantage.lam must be in [0, 1]")


AdvantageFn = Callable[[AdvantageInput, AdvantageConfig], torch.Tensor]
ADVANTAGES: Registry[AdvantageFn] = Registry("advantage estimator")


# ---------------------------------------------------------------- policy losses
@dataclass
class PolicyLossInput:
    logprobs: torch.Tensor  # [N, T] current policy (requires grad)
    old_logprobs: torch.Tensor  # [N, T] policy at rollout weights (no grad)
    advantages: torch.Tensor  # [N, T]
    mask: torch.Tensor  # [N, T] float
    is_weights: Optional[torch.Tensor] = None  # [N, T] mismatch-correction weights (no grad)
    behaviour_logprobs: Optional[torch.Tensor] = None  # [N, T] rollout engine's log-probs
    entropy: Optional[torch.Tensor] = None  # [N, T] current policy entropy


@dataclass
class PolicyLossConfig:
    clip_low: float = 0.2  # epsilon_low
    clip_high: float = 0.2  # epsilon_high (DAPO clip-higher uses 0.28)
    dual_clip: Optional[float] = None  # c in dual-clip PPO (e.g. 3.0); None disables

    def __post_init__(self) -> None:
        if self.clip_low < 0 or self.clip_high < 0:
            raise ValueError("algorithm.loss.clip_low and clip_high must be >= 0")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError("algorithm.loss.dual_clip must be > 1 (or null to disable)")


@dataclass
class PolicyLossOutput:
    loss: torch.Tensor  # [N, T] per-token loss (masked positions may hold anything)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # scalars, means over mask


PolicyLossFn = Callable[[PolicyLossInput, PolicyLossConfig], PolicyLossOutput]
POLICY_LOSSES: Registry[PolicyLossFn] = Registry("policy loss")


# ---------------------------------------------------------------- mismatch corrections
@dataclass
class CorrectionInput:
    behaviour_logprobs: torch.Tensor  # [N, T]
    old_logprobs: torch.Tensor  # [N, T]
    mask: torch.Tensor  # [N, T] float


@dataclass
class CorrectionConfig:
    threshold_low: Optional[float] = None
    threshold_high: float = 2.0


@dataclass
class CorrectionOutput:
    weights: torch.Tensor  # [N, T] multiplies the per-token loss (no grad)
    mask: torch.Tensor  # [N, T] float: tokens kept (rejected tokens get 0)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


CorrectionFn = Callable[[CorrectionInput, CorrectionConfig], CorrectionOutput]
CORRECTIONS: Registry[CorrectionFn] = Registry("mismatch correction")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1.0)
