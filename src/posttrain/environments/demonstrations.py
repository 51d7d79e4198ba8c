"""Tool-call demonstrations: an SFT warm start for tool-use RL (``posttrain demos``).

Why. RL can only reinforce what the policy samples: SmolLM2-135M-Instruct wrote no tool call in
0 of 3840 ``tool_math`` training episodes (benchmarks/results/environments/tool_math.md), so the
tool call never earned an advantage and GRPO had nothing to push up. The usual remedy is a
cold start: supervised fine-tuning on a few demonstrations of the behaviour, then RL from that
checkpoint. Two-stage "cold-start SFT, then RL" pipelines are common in the catalog (e.g.
ReasonRank, catalog 003-1, cold-start SFT on reasoning traces before RL); for tool use, ReTool
(arXiv:2504.11536, not in the catalog) fine-tunes on code-interpreter traces before RL, TAPO
(catalog 002-94) runs RL on interleaved reasoning and python/search calls, and OTC (catalog
001-13, the term ``tool_math`` implements) assumes a policy that already calls tools and
trains it to call fewer. ToolRL (arXiv:2504.13958, not in the catalog) runs GRPO from the raw
model with no SFT and reports it beating SFT-started models, but its 1.5B+ instruct models
already emit calls; a model that never does gives RL nothing to start from, so whether the warm
start helps is measured (benchmarks/results/environments/run_tool_math_warm.sh), not assumed.
Here the demonstrations are exactly the first turn the environment gives the policy, answered
by a correct tool call:

    {"messages": env.reset(problem).messages + [{"role": "assistant", "content": CALL}]}
    CALL = <tool_call>{"name": "python", "arguments": {"code": "print(1234 * 5678)"}}</tool_call>

which ``posttrain sft`` reads (trainers/sft_data.py: the last message is the completion, the
earlier ones the prompt, rendered as the sampler renders them, so the loss is on CALL only).
The prompt messages come from ``env.reset`` itself, system tool prompt included, so the
demonstration's prompt is token for token the one RL samples from.

With ``answers=True`` each problem also gets its second turn: the first turn and the call, the
tool's result exactly as the environment returns it (the tool really runs, through ``env.step``,
with the observation role the tokenizer's template supports), then the answer alone as the
assistant's reply:

    {"messages": first turn + [call, {"role": env.observation_role, "content": RESULT},
                               {"role": "assistant", "content": ANSWER}]}

Without it a warm-started model learns to call but not to stop calling: every turn would be
another call until ``max_turns`` ends the episode unanswered (reward 0).

The call is built from the problem's own expression by a small function per task
(``EXPRESSIONS``: task name -> the Python expression of a problem) and one per tool
(``CALL_ARGUMENTS``: ``python`` prints the expression, ``calculator`` evaluates it); a task or
tool without one is a ``ValueError`` naming it and the supported ones.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Optional, Sequence

from posttrain.environments.base import Environment
from posttrain.tasks.base import Problem

__all__ = ["CALL_ARGUMENTS", "EXPRESSIONS", "answer_demonstration", "check_supported", "demonstration",
           "resolve_tool",
           "tool_call_demonstrations", "tool_call_text"]


def _arithmetic_expression(problem: Problem) -> str:
    # tasks/arithmetic.py stores the expression it evaluated for the answer (Python syntax and
    # precedence, negative operands parenthesised), so printing it reproduces problem.answer.
    expr = problem.metadata.get("expr")
    if not isinstance(expr, str) or not expr.strip():
        raise ValueError(f"problem {problem.id!r} has no metadata['expr'] to build a tool call from")
    return expr


# task name -> the Python expression whose value is the problem's answer
EXPRESSIONS: dict[str, Callable[[Problem], str]] = {
    "arithmetic": _arithmetic_expression,
    "multi_digit_arithmetic": _arithmetic_expression,
}

# tool name -> the call's arguments for an expression (the tools' own parameter names, tools.py)
CALL_ARGUMENTS: dict[str, Callable[[str], dict[str, Any]]] = {
    "python": lambda expr: {"code": f"print({expr})"},
    "calculator": lambda expr: {"expression": expr},
}


def check_supported(task: str, tool: str) -> None:
    """Raise a ``ValueError`` naming ``task`` or ``tool`` when no call can be built for it."""
    if task not in EXPRESSIONS:
        raise ValueError(f"no tool-call demonstrations for task {task!r}: supported tasks are {sorted(EXPRESSIONS)} "
                         "(add an expression builder to environments/demonstrations.py EXPRESSIONS)")
    if tool not in CALL_ARGUMENTS:
        raise ValueError(f"no tool-call demonstrations for tool {tool!r}: supported tools are "
                         f"{sorted(CALL_ARGUMENTS)} (choose one of the environment's tools with --tool)")


def tool_call_text(tool: str, arguments: dict[str, Any]) -> str:
    """A call in the environment's format (tools.py): ``<tool_call>{"name", "arguments"}</tool_call>``."""
    return "<tool_call>" + json.dumps({"name": tool, "arguments": arguments}) + "</tool_call>"


def _tool_names(env: Environment) -> list[str]:
    tools = getattr(env, "tools", None)
    if not isinstance(tools, dict) or not tools:
        raise ValueError(f"environment {env.name!r} has no tools to demonstrate a call of: use a tool environment "
                         "(environment: {type: tool_math} or {type: tools, tools: [python]})")
    return list(tools)


def resolve_tool(env: Environment, task: str, tool: Optional[str] = None) -> str:
    """The tool the demonstrations call (``tool``, default the environment's first), checked
    against the environment's tools and the call builders; ``ValueError`` naming what is wrong."""
    names = _tool_names(env)
    if tool is None:  # the environment's first tool, as its system prompt lists them
        tool = names[0]
    elif tool not in names:
        raise ValueError(f"tool {tool!r} is not one of the environment's tools {names}")
    check_supported(task, tool)
    return tool


def demonstration(env: Environment, problem: Problem, task: str, tool: str) -> dict[str, list[dict[str, str]]]:
    """One ``{"messages": [...]}`` record: ``env.reset(problem)``'s messages, then the tool call."""
    call = tool_call_text(tool, CALL_ARGUMENTS[tool](EXPRESSIONS[task](problem)))
    messages = [dict(m) for m in env.reset(problem).messages]
    return {"messages": messages + [{"role": "assistant", "content": call}]}


def answer_demonstration(env: Environment, problem: Problem, call_record: dict) -> dict[str, list[dict[str, str]]]:
    """The second turn's record after ``call_record`` (``demonstration``'s): the call's turn, the
    tool's real result, then the answer alone."""
    first = call_record["messages"]
    state = env.reset(problem)
    state.messages.append(first[-1])
    state.turn, state.max_turns = 1, env.max_turns  # after the call's turn, as the episode runner counts
    result = env.step(state, first[-1]["content"])
    answer = str(problem.answer).strip()
    printed = re.findall(r"-?\d+(?:\.\d+)?", str(result.observation or ""))  # inside <tool_response> tags or not
    if result.done or result.info.get("tool_error") or printed != [answer]:
        raise ValueError(f"problem {problem.id!r}: the demonstrated call did not return its answer {answer!r} "
                         f"(observation {result.observation!r}, info {result.info})")
    return {"messages": first + [{"role": env.observation_role, "content": str(result.observation)},
                                 {"role": "assistant", "content": answer}]}


def tool_call_demonstrations(env: Environment, problems: Sequence[Problem], task: str,
                             tool: Optional[str] = None,
                             answers: bool = False) -> list[dict[str, list[dict[str, str]]]]:
    """One demonstration per problem (module docstring), calling ``tool`` (default: the
    environment's first tool), and with ``answers`` its second-turn record after it. ``env``:
    built as ``posttrain rl`` builds it (``registry.build_environment(cfg.environment, reward)``,
    then ``bind_tokenizer``); ``task``: the task's name, which picks the expression builder.
    Unsupported task or tool: ``ValueError`` before any problem."""
    tool = resolve_tool(env, task, tool)
    out = []
    for p in problems:
        out.append(demonstration(env, p, task, tool))
        if answers:
            out.append(answer_demonstration(env, p, out[-1]))
    return out
