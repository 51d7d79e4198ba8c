"""Build a reward from its config.

>>> r = build_reward({"type": "composite", "parts": [
...     {"type": "numeric", "weight": 1.0},
...     {"type": "format", "pattern": r"^\\d+$", "match": "fullmatch", "weight": 0.1}]})
>>> r.name, [p[0] for p in r.parts]
('composite', ['numeric', 'format'])

Every key other than ``type`` (and ``weight``/``parts`` inside a composite) is passed to the
reward's constructor; unknown keys are a ``ValueError`` listing the allowed ones. Length
rewards accept a tokenizer object through ``build_reward(spec, tokenizer=...)`` (it cannot
live in YAML). ``noisy`` wraps another reward's spec: ``{type: noisy, flip_prob: 0.2, reward:
{type: numeric}}`` (``posttrain.rewards.noise``); ``darling`` wraps a quality reward's spec the
same way: ``{type: darling, reward: {type: numeric}}`` (``posttrain.rewards.diversity``).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

from posttrain.rewards.base import Reward

__all__ = ["REWARDS", "build_reward", "register_reward"]

RewardBuilder = Callable[..., Reward]
REWARDS: dict[str, RewardBuilder] = {}


def register_reward(name: str) -> Callable[[RewardBuilder], RewardBuilder]:
    """Register a reward class (or factory) under ``name`` for ``build_reward``."""

    def deco(cls: RewardBuilder) -> RewardBuilder:
        if name in REWARDS and REWARDS[name] is not cls:
            raise ValueError(f"reward type {name!r} is already registered")
        REWARDS[name] = cls
        return cls

    return deco


def _builtin() -> None:
    if REWARDS.get("numeric") is not None:
        return
    import posttrain.rewards.learned  # noqa: F401  (registers reward_model and judge)
    import posttrain.rewards.process  # noqa: F401  (registers step_verifier, prefix_prm, reasoning_pattern)
    from posttrain.rewards.code_reward import CodeReward
    from posttrain.rewards.diversity import DarlingReward
    from posttrain.rewards.majority import MajorityVoteReward
    from posttrain.rewards.math import MathReward, NumericReward
    from posttrain.rewards.noise import NoisyReward
    from posttrain.rewards.shaping import FormatReward, LengthReward, OverlongReward, ThinkFormatReward

    for name, cls in {
        "numeric": NumericReward,
        "math": MathReward,
        "format": FormatReward,
        "think_format": ThinkFormatReward,
        "length": LengthReward,
        "overlong": OverlongReward,
        "code": CodeReward,
        "majority_vote": MajorityVoteReward,
        "noisy": NoisyReward,
        "darling": DarlingReward,
    }.items():
        REWARDS.setdefault(name, cls)


def _allowed_types() -> list[str]:
    return sorted(set(REWARDS) | {"composite"})


def build_reward(spec: dict[str, Any], tokenizer: Optional[Any] = None) -> Reward:
    """``spec["type"]`` picks the reward; see the module docstring."""
    _builtin()
    if not isinstance(spec, dict):
        raise TypeError(f"reward spec must be a dict, got {type(spec).__name__}")
    params = dict(spec)
    kind = params.pop("type", None)
    if kind is None:
        raise ValueError(f"reward spec {spec!r} has no 'type'; allowed types: {_allowed_types()}")
    if kind == "composite":
        from posttrain.rewards.shaping import CompositeReward

        parts_spec = params.pop("parts", None)
        name = params.pop("name", "composite")
        if params:
            raise ValueError(f"composite reward has no option(s) {sorted(params)}; allowed: ['name', 'parts']")
        if not parts_spec:
            raise ValueError("composite reward needs a non-empty 'parts' list")
        parts = []
        for part in parts_spec:
            part = dict(part)
            weight = part.pop("weight", 1.0)
            parts.append((build_reward(part, tokenizer=tokenizer), float(weight)))
        return CompositeReward(parts, name=name)
    if kind not in REWARDS:
        raise ValueError(f"unknown reward type {kind!r}; allowed types: {_allowed_types()}")
    if "weight" in params:
        raise ValueError(f"'weight' only applies to parts of a composite reward (in {kind!r})")
    cls = REWARDS[kind]
    sig = inspect.signature(cls)
    allowed = [p for p in sig.parameters if p not in ("self",)]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"reward {kind!r} has no option(s) {unknown}; allowed: {allowed}")
    if tokenizer is not None and "tokenizer" in allowed and "tokenizer" not in params:
        params["tokenizer"] = tokenizer
    return cls(**params)
