"""Tool-use math: the model may call a ``python`` tool (or others) before it answers; the right
answer is rewarded, optionally scaled by OTC's tool-efficiency term.

    environment: {type: tool_math, tools: [python], max_turns: 4, otc: grpo, otc_c: 1.0, otc_alpha: 1.0}

``ToolMath`` is ``ToolEnvironment`` (tools.py: each message with a tool call runs the tool and
sees its result; the first message without one is the answer, scored by the run's reward, e.g.
``numeric`` on a ``multi_digit_arithmetic`` task whose large operands make the tool worth
calling) with a system prompt that says so, plus the OTC term.

OTC, "OTC: Optimal Tool Calls via Reinforcement Learning" (Wang et al., arXiv:2504.14870,
catalog 001-13; later titled "Acting Less is Reasoning More! Teaching Model to Act
Efficiently"): the episode's reward is the task reward scaled by a tool term,

    r = alpha * r_tool(m, n) * r_task

with m the tool calls of the episode and n the optimal (fewest) number for the problem.

* ``otc: ppo`` (OTC-PPO, no group to estimate n from): r_tool = cos(m * pi / (2m + c)), 1 at
  m = 0, falling towards cos(pi/2) = 0 as m grows; c > 0 sets how fast (c = 1: 0.5 at m = 1,
  0.309 at m = 2).
* ``otc: grpo`` (OTC-GRPO): n = the fewest tool calls among the correct episodes of the same
  problem in this batch (the group), and
      f(m, n) = 0 if m = n = 0;  m if n = 0;  2nm / (m + n) otherwise
      r_tool  = 1 if f(m, n) = n = 0;  cos(m * pi / (2m + c)) if n = 0;  sin(f(m, n) * pi / (2n)) otherwise
  so r_tool = 1 at m = n and decays on both sides (n = 2: m = 1 and m = 4 both give
  sin(pi/3) = 0.866). A group with no correct episode has no n; it falls back to n = 0 (the
  OTC-PPO form), which changes nothing there since r_task = 0.

r_task is the run's reward of the answer (0 for an episode that never answered). An episode is
correct by held-out evaluation's rule: its answer's ``correct`` reward component > 0 (else a
composite part's ``<part>/correct``, else r_task > 0). Since
r_tool > 0 for every finite m of a correct episode, correct episodes keep a reward > 0 and
wrong ones 0: held-out accuracy (the ``correct`` component, which passes through unscaled) is
unchanged by the option. n is estimated from the batch's group only, so the term needs no state
across steps (a resumed run scores as a straight one); with one episode per problem (held-out
evaluation) a correct episode is its own optimum, r_tool = 1. Defaults c = 1 and alpha = 1 are
our choice (the card gives no value).

Logged per episode as reward components (``reward_component/...`` per step): ``otc/tool``
(r_tool), ``otc/optimal_calls`` (n) and ``otc/task_reward`` (r_task before scaling); with a
``/`` in their names they are diagnostics, never parts GDPO would normalise. The tool-call rate
is ``env/tool_use_frac`` and ``env/tool_calls_per_episode`` (episodes.episode_metrics).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

from posttrain.environments.base import EpisodeState
from posttrain.environments.tools import ToolEnvironment
from posttrain.rewards.base import Reward

__all__ = ["OTC_MODES", "ToolMath", "otc_mapping", "otc_tool_reward"]

OTC_MODES = ("grpo", "ppo")

INSTRUCTIONS = ("Solve the problem. For long computations call the python tool and print the result. When you "
                "know the answer, reply with just the number and no tool call.")


def otc_mapping(m: int, n: int) -> float:
    """OTC-GRPO's f(m, n): 0 if m = n = 0; m if n = 0; 2nm / (m + n) otherwise."""
    if n == 0:
        return float(m)
    return 2.0 * n * m / (m + n)


def otc_tool_reward(m: int, n: Optional[int] = None, c: float = 1.0) -> float:
    """OTC's r_tool for m tool calls: OTC-PPO's cos(m pi / (2m + c)) when n is None or 0, else
    OTC-GRPO's sin(f(m, n) pi / (2n)) (module docstring)."""
    if m < 0 or (n is not None and n < 0):
        raise ValueError(f"tool-call counts must be >= 0, got m={m}, n={n}")
    if not n:
        return math.cos(m * math.pi / (2 * m + c))  # m = 0: cos(0) = 1, the f = n = 0 case
    return math.sin(otc_mapping(m, n) * math.pi / (2 * n))


def _correct(components: dict[str, float], reward: float) -> bool:
    """Held-out evaluation's rule (evaluation.runner.correct_flags): the ``correct`` component,
    else a composite part's ``<part>/correct``, else reward > 0."""
    if "correct" in components:
        return components["correct"] > 0
    for name, value in components.items():
        if name.endswith("/correct"):
            return value > 0
    return reward > 0


class ToolMath(ToolEnvironment):
    """A ToolEnvironment for math with a python tool by default and an optional OTC term (module docstring)."""

    def __init__(self, reward: Reward, tools: Sequence[Any] = ("python",), max_turns: int = 4,
                 max_tokens: Optional[int] = None, on_error: str = "zero", max_workers: int = 1,
                 max_result_chars: int = 2000, instructions: str = INSTRUCTIONS, otc: Optional[str] = None,
                 otc_c: float = 1.0, otc_alpha: float = 1.0):
        if otc not in (None, *OTC_MODES):
            raise ValueError(f"environment.otc must be null, 'grpo' or 'ppo', got {otc!r}")
        if not (isinstance(otc_c, (int, float)) and otc_c > 0 and math.isfinite(otc_c)):
            raise ValueError(f"environment.otc_c must be a finite number > 0 (OTC's smoothing constant c), got {otc_c!r}")
        if not (isinstance(otc_alpha, (int, float)) and otc_alpha > 0 and math.isfinite(otc_alpha)):
            raise ValueError(f"environment.otc_alpha must be a finite number > 0 (OTC's scale alpha), got {otc_alpha!r}")
        if not list(tools):
            raise ValueError("environment.tools is empty: tool_math needs at least one tool (e.g. [python])")
        super().__init__(tools, reward, max_turns=max_turns, max_tokens=max_tokens, on_error=on_error,
                         max_workers=max_workers, max_result_chars=max_result_chars)
        self.otc, self.otc_c, self.otc_alpha = otc, float(otc_c), float(otc_alpha)
        self.system_prompt = f"{instructions}\n\n{self.system_prompt}" if instructions else self.system_prompt
        self.name = f"tool_math({','.join(self.tools)}{', otc=' + otc if otc else ''})"

    def finish(self, states: Sequence[EpisodeState], step_rewards: list[list[float]],
               infos: list[list[dict]]) -> None:
        """Apply the OTC term once every episode of the batch has ended (n needs the whole group)."""
        if self.otc is None:
            return
        calls = [sum(1 for i in info if i.get("tool_call")) for info in infos]
        task = [sum(r) for r in step_rewards]
        correct = [_correct(info[-1].get("components", {}) if info else {}, r) for info, r in zip(infos, task)]
        optimal: dict[int, int] = {}  # group -> fewest tool calls of a correct episode
        if self.otc == "grpo":
            for s, m, ok in zip(states, calls, correct):
                if ok:
                    optimal[s.group] = min(m, optimal.get(s.group, m))
        for k, s in enumerate(states):
            n = optimal.get(s.group, 0) if self.otc == "grpo" else None
            r_tool = otc_tool_reward(calls[k], n, self.otc_c)
            scale = self.otc_alpha * r_tool
            # Every step scaled: the episode's reward (their sum) becomes alpha * r_tool * r_task.
            step_rewards[k][:] = [scale * r for r in step_rewards[k]]
            if not infos[k]:
                continue
            last = infos[k][-1]
            last["components"] = dict(last.get("components", {}), **{
                "otc/tool": r_tool, "otc/optimal_calls": float(n or 0), "otc/task_reward": task[k]})
