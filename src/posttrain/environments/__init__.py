"""Environments: multi-turn episodes, tools and games, producing the pipeline's one batch type.

``base`` is the contract (``Environment.reset/step``, ``StepResult``, ``SingleTurn``: a task's
Reward as the one-step case); ``episodes.run_episodes`` samples a batch of episodes with any
rollout engine into a ``Rollouts`` whose environment tokens carry no loss; ``tools`` holds the
tool-call format, the ``python``/``calculator``/``search`` tools, user tools from Python
functions and ``ToolEnvironment``; ``tool_math`` the tool-use math environment with OTC's
tool-efficiency term; ``games`` holds guess-the-number; ``external`` adapts TextArena's single-player games
(``textarena`` task and environment; the package itself is imported only when one is built);
``registry.build_environment``
builds one from a config dict.
"""

from posttrain.environments.base import EpisodeState, Environment, SingleTurn, StepResult, prompt_messages
from posttrain.environments.episodes import between_turn_tokens, episode_metrics, run_episodes
from posttrain.environments.external import TextArenaEnvironment, TextArenaTask
from posttrain.environments.games import GuessTheNumber, GuessTheNumberTask, guess_the_number_problems
from posttrain.environments.registry import ENVIRONMENTS, build_environment, register_environment
from posttrain.environments.search import BM25Index
from posttrain.environments.tool_math import ToolMath, otc_tool_reward
from posttrain.environments.tools import (
    TOOLS,
    Tool,
    ToolCall,
    ToolEnvironment,
    ToolError,
    build_tool,
    calculate,
    parse_tool_call,
    run_tool,
    tool_from_function,
)

__all__ = [
    "BM25Index",
    "ENVIRONMENTS",
    "EpisodeState",
    "Environment",
    "GuessTheNumber",
    "GuessTheNumberTask",
    "SingleTurn",
    "StepResult",
    "TOOLS",
    "TextArenaEnvironment",
    "TextArenaTask",
    "Tool",
    "ToolCall",
    "ToolEnvironment",
    "ToolError",
    "ToolMath",
    "between_turn_tokens",
    "build_environment",
    "build_tool",
    "calculate",
    "episode_metrics",
    "guess_the_number_problems",
    "otc_tool_reward",
    "parse_tool_call",
    "prompt_messages",
    "register_environment",
    "run_episodes",
    "run_tool",
    "tool_from_function",
]
