"""Tools: the call format, the python tool's limits as observations, user tools, ToolEnvironment's steps."""

import json

import pytest

from posttrain.environments.base import EpisodeState
from posttrain.environments.tools import (ToolEnvironment, build_tool, parse_tool_call, python_tool, run_tool,
                                          template_renders_role, tool_from_function, tools_system_prompt)
from posttrain.models.tiny import tiny_tokenizer
from posttrain.rewards.math import NumericReward
from posttrain.tasks.base import Problem

PROBLEM = Problem(id="p", prompt="What is 12 * 7?", answer="84")


def call(name, **arguments):
    return f'Let me check. <tool_call>{json.dumps({"name": name, "arguments": arguments})}</tool_call>'


def state(env, turn=1):
    s = env.reset(PROBLEM)
    s.max_turns, s.turn = env.max_turns, turn
    return s


def test_parse_tool_call():
    c = parse_tool_call(call("calculator", expression="1+1") + " trailing <tool_call>{}</tool_call>")
    assert (c.name, c.arguments, c.error) == ("calculator", {"expression": "1+1"}, None)
    # no closing tag (it was the stop string); arguments as a JSON string
    c = parse_tool_call('<tool_call>{"name": "python", "arguments": "{\\"code\\": \\"print(1)\\"}"}')
    assert (c.name, c.arguments) == ("python", {"code": "print(1)"})
    assert parse_tool_call("The answer is 84.") is None
    bad = parse_tool_call("<tool_call>{name: calculator}</tool_call>")
    assert bad.name is None and "could not read the tool call" in bad.error
    assert "arguments must be" in parse_tool_call('<tool_call>{"name": "x", "arguments": [1]}</tool_call>').error


def test_python_tool_timeout_and_sandbox_violations_are_observations():
    env = ToolEnvironment([python_tool(timeout_s=1.0, memory_mb=128)], NumericReward(), max_turns=3)
    ok = env.step(state(env), call("python", code="print(12 * 7)"))
    assert (ok.observation, ok.done, ok.reward, ok.info["tool_error"]) == ("84", False, 0.0, False)
    cases = {
        "while True:\n    pass": "timed out after 1 s",
        "open('/etc/posttrain-test', 'w')": "Read-only file system",
        "import socket\nsocket.create_connection(('8.8.8.8', 53), timeout=1)": "OSError",
        "x = bytearray(1 << 31)": "MemoryError",
        "raise ValueError('boom')": "ValueError: boom",
    }
    for code, expected in cases.items():
        res = env.step(state(env), call("python", code=code))
        assert not res.done and res.info == {"tool_call": True, "tool": "python", "tool_error": True}, code
        assert res.observation.startswith("error: tool 'python'") and expected in res.observation, res.observation


def test_user_tool_from_function_and_its_exception_names_it():
    def lookup(city: str, year: int = 2020) -> str:
        """Population of a city.

        Args:
            city: the city's name
            year (int): census year
        """
        if city == "Atlantis":
            raise KeyError("no such city")
        return f"{city}: 1000 in {year}"

    tool = tool_from_function(lookup)
    assert tool.name == "lookup" and tool.description == "Population of a city."
    assert tool.parameters == {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "the city's name"},
        "year": {"type": "integer", "description": "census year"}}}
    tools = {"lookup": tool}
    assert run_tool(tools, parse_tool_call(call("lookup", city="Oslo"))) == ("Oslo: 1000 in 2020", False)
    text, err = run_tool(tools, parse_tool_call(call("lookup", city="Atlantis")))
    assert err and text == "error: tool 'lookup' raised KeyError: 'no such city'"
    text, err = run_tool(tools, parse_tool_call(call("lookup", town="Oslo")))
    assert err and "tool 'lookup'" in text and "unknown argument(s) ['town']" in text and "missing argument(s) ['city']" in text
    text, err = run_tool(tools, parse_tool_call(call("weather", city="Oslo")))
    assert err and text == "error: no tool named 'weather'; available: lookup"

    def nodoc(x):
        return x

    with pytest.raises(ValueError, match="'nodoc' has no docstring"):
        tool_from_function(nodoc)
    with pytest.raises(ValueError, match="unknown tool 'nope'"):
        build_tool("nope")


def test_tool_environment_turns_and_final_scoring():
    env = ToolEnvironment(["calculator"], NumericReward(), max_turns=3)
    s = env.reset(PROBLEM)
    assert s.messages[0]["role"] == "system" and '"name": "calculator"' in s.messages[0]["content"]
    assert s.messages[1] == {"role": "user", "content": "What is 12 * 7?"}
    s.max_turns = 3
    s.turn = 1
    first = env.step(s, call("calculator", expression="12 * 7"))
    assert (first.observation, first.reward, first.done) == ("84", 0.0, False)
    s.turn = 2
    final = env.step(s, "The answer is 84")
    assert final.done and final.reward == 1.0 and final.observation is None
    assert final.info["components"]["reward_error"] == 0.0
    s.turn = 3  # a tool call in the last turn: not run, reward 0
    last = env.step(s, call("calculator", expression="84"))
    assert last.done and last.reward == 0.0 and last.info["unanswered_tool_call"]
    # a system prompt of the problem's own is kept, the tool description appended
    own = env.reset(Problem(id="q", prompt=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]))
    assert own.messages[0]["content"].startswith("Be brief.\n\nYou can call tools") and len(own.messages) == 2
    assert tools_system_prompt([]).endswith("Tools:")


def test_observation_role_follows_the_template():
    tok = tiny_tokenizer()
    assert template_renders_role(tok, "tool")
    env = ToolEnvironment(["calculator"], NumericReward(), max_turns=2)
    env.bind_tokenizer(tok)
    assert env.observation_role == "tool"
    strict = tiny_tokenizer()
    strict.chat_template = ("{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
                            "{{ raise_exception('bad role') }}{% endif %}{{ m['content'] }}\n{% endfor %}")
    assert not template_renders_role(strict, "tool")
    env.bind_tokenizer(strict)
    res = env.step(state(env), call("calculator", expression="2+2"))
    assert env.observation_role == "user" and res.observation == "<tool_response>\n4\n</tool_response>"


def test_step_many_runs_calls_concurrently_in_order():
    env = ToolEnvironment(["calculator"], NumericReward(), max_turns=2, max_workers=4)
    states = [state(env) for _ in range(5)]
    out = env.step_many(states, [call("calculator", expression=f"{i} * 10") for i in range(5)])
    assert [r.observation for r in out] == ["0", "10", "20", "30", "40"]
    assert isinstance(states[0], EpisodeState)
