"""build_environment: types, options, the run's reward."""

import pytest

from posttrain.environments import GuessTheNumber, SingleTurn, ToolEnvironment
from posttrain.environments.registry import build_environment
from posttrain.rewards.math import NumericReward


def test_build_environment():
    reward = NumericReward()
    single = build_environment(None, reward)
    assert isinstance(single, SingleTurn) and single.reward is reward and single.max_turns == 1
    tools = build_environment({"type": "tools", "tools": ["calculator", {"type": "python", "timeout_s": 2}],
                               "max_turns": 3, "max_tokens": 512}, reward)
    assert isinstance(tools, ToolEnvironment) and sorted(tools.tools) == ["calculator", "python"]
    assert (tools.max_turns, tools.max_tokens, tools.reward) == (3, 512, reward)
    game = build_environment({"type": "guess_the_number", "high": 20, "max_turns": 5}, reward)
    assert isinstance(game, GuessTheNumber) and (game.high, game.max_turns) == (20, 5)
    with pytest.raises(ValueError, match="unknown environment type 'chess'"):
        build_environment({"type": "chess"}, reward)
    with pytest.raises(ValueError, match=r"has no option\(s\) \['turns'\]"):
        build_environment({"type": "guess_the_number", "turns": 3}, reward)
    with pytest.raises(ValueError, match="set it under reward"):
        build_environment({"type": "tools", "tools": [], "reward": {"type": "numeric"}}, reward)
