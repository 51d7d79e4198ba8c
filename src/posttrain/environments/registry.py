"""Build an environment from its config.

>>> env = build_environment({"type": "tools", "tools": ["calculator"], "max_turns": 3}, reward=None)
>>> env.name, env.max_turns
('tools(calculator)', 3)

``type`` picks the environment (``ENVIRONMENTS``); every other key goes to its constructor, and
an unknown key is a ``ValueError`` listing the allowed ones. Environments that score with the
task's reward (``single_turn``, ``tools``, ``tool_math``) receive it as ``reward``; a ``tools`` entry is
anything ``tools.build_tool`` takes (a name, ``{"type": "search", "directory": ...}``, or, from
Python, a function).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

from posttrain.environments.base import Environment, SingleTurn
from posttrain.environments.games import GuessTheNumber
from posttrain.environments.tool_math import ToolMath
from posttrain.environments.tools import ToolEnvironment
from posttrain.rewards.base import Reward

__all__ = ["ENVIRONMENTS", "build_environment", "register_environment"]

ENVIRONMENTS: dict[str, Callable[..., Environment]] = {
    "single_turn": SingleTurn,
    "tools": ToolEnvironment,
    "guess_the_number": GuessTheNumber,
    "tool_math": ToolMath,
}


def register_environment(name: str) -> Callable[[Callable[..., Environment]], Callable[..., Environment]]:
    """Register an environment class (or factory) under ``name`` for ``build_environment``."""

    def deco(cls):
        if name in ENVIRONMENTS and ENVIRONMENTS[name] is not cls:
            raise ValueError(f"environment type {name!r} is already registered")
        ENVIRONMENTS[name] = cls
        return cls

    return deco


def build_environment(spec: Optional[dict[str, Any]], reward: Optional[Reward]) -> Environment:
    """The environment of ``spec`` (None: ``single_turn``), scoring with ``reward`` where it takes one."""
    params = dict(spec or {"type": "single_turn"})
    kind = params.pop("type", None)
    if kind not in ENVIRONMENTS:
        raise ValueError(f"unknown environment type {kind!r}; allowed types: {sorted(ENVIRONMENTS)}")
    cls = ENVIRONMENTS[kind]
    allowed = [p for p in inspect.signature(cls).parameters if p != "self"]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"environment {kind!r} has no option(s) {unknown}; allowed: {allowed}")
    if "reward" in allowed:
        if "reward" in params:
            raise ValueError(f"environment {kind!r} scores with the run's reward; set it under reward, not here")
        params["reward"] = reward
    return cls(**params)
