"""Tools the policy can call, and ``ToolEnvironment``: tool calls until a final answer, which a Reward scores.

Tool-call format (the Hermes / Qwen2.5 format, which tool-trained chat templates use): a model
message calls a tool by containing

    <tool_call>{"name": "calculator", "arguments": {"expression": "12 * 7"}}</tool_call>

One call per message: the first ``<tool_call>`` is run (a missing closing tag at the end of the
message is accepted, so ``</tool_call>`` can be a stop string), the rest of the message is
ignored. ``arguments`` may also be a JSON string of the object. The tools are described to the
model in a system message (``tools_system_prompt``: the format above, then one JSON schema per
tool), written into the conversation by ``reset``, because the engines render the conversation
without a ``tools=`` argument. The result comes back as a ``tool`` message when the chat
template renders that role, else as a ``user`` message wrapped in
``<tool_response>...</tool_response>`` (``ToolEnvironment.bind_tokenizer`` checks).

Tools (``TOOLS``, ``build_tool``): ``python`` (runs code in posttrain's sandbox,
``rewards.sandbox.run_python``, with its limits; stdout is the result), ``calculator``
(arithmetic on numbers by walking the ``ast``, never ``eval``), ``search`` (BM25 over a local
directory of text files, ``environments.search``), and user tools: plain Python functions,
whose name, signature and docstring (first paragraph: description; an ``Args:`` section or
``:param name:`` lines: parameter descriptions) become the tool's schema.

Nothing a tool does crashes an episode: a timeout, a sandbox limit, a bad call, an unknown tool
or an exception in a user's function becomes the observation text, which names the tool, and
the step's info says ``tool_error: True``.
"""

from __future__ import annotations

import ast
import inspect
import json
import math
import operator
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from posttrain.environments.base import Environment, EpisodeState, StepResult
from posttrain.environments.search import BM25Index
from posttrain.rewards.base import Reward
from posttrain.rewards.errors import score_group

__all__ = ["TOOLS", "Tool", "ToolCall", "ToolEnvironment", "ToolError", "build_tool", "calculate", "calculator_tool",
           "parse_tool_call", "python_tool", "run_tool", "search_tool", "template_renders_role", "tool_from_function",
           "tools_system_prompt"]


class ToolError(Exception):
    """A tool's expected failure; its message is shown to the model."""


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object
    fn: Callable[..., Any]

    def schema(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


# ---------------------------------------------------------------------------- user functions

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


def _param_docs(doc: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for m in re.finditer(r"^\s*:param\s+(?:\w+\s+)?(\w+):\s*(.+)$", doc, re.MULTILINE):
        out[m.group(1)] = m.group(2).strip()
    section = re.search(r"^\s*(?:Args|Arguments|Parameters):\s*\n((?:[ \t]+.+\n?)+)", doc, re.MULTILINE)
    if section:
        for m in re.finditer(r"^\s+(\w+)(?:\s*\([^)]*\))?:\s*(.+)$", section.group(1), re.MULTILINE):
            out.setdefault(m.group(1), m.group(2).strip())
    return out


def tool_from_function(fn: Callable[..., Any], name: Optional[str] = None) -> Tool:
    """A tool from a Python function: its name, signature and docstring describe it."""
    tool_name = name or getattr(fn, "__name__", None)
    if not tool_name or tool_name == "<lambda>":
        raise ValueError(f"tool function {fn!r} needs a name: use a def, or pass name=")
    doc = inspect.getdoc(fn)
    if not doc:
        raise ValueError(f"tool function {tool_name!r} has no docstring: its docstring describes it to the model")
    described = _param_docs(doc)
    properties: dict[str, Any] = {}
    required = []
    for pname, p in inspect.signature(fn).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise ValueError(f"tool function {tool_name!r}: *{pname} parameters cannot be described to the model")
        prop: dict[str, Any] = {}
        if p.annotation in _JSON_TYPES:
            prop["type"] = _JSON_TYPES[p.annotation]
        if pname in described:
            prop["description"] = described[pname]
        properties[pname] = prop
        if p.default is p.empty:
            required.append(pname)
    description = doc.split("\n\n")[0].replace("\n", " ").strip()
    return Tool(tool_name, description, {"type": "object", "properties": properties, "required": required}, fn)


# ---------------------------------------------------------------------------- built-in tools

def python_tool(timeout_s: float = 5.0, memory_mb: int = 256, max_output_bytes: int = 16384) -> Tool:
    """Run a Python program in posttrain's sandbox; the result is its stdout."""
    from posttrain.rewards.sandbox import SandboxError, run_python

    def python(code: str) -> str:
        try:
            res = run_python(code, timeout_s=timeout_s, memory_mb=memory_mb, max_output_bytes=max_output_bytes)
        except SandboxError as exc:
            raise ToolError(f"the sandbox is unavailable: {exc}") from exc
        out = res.stdout.rstrip("\n")
        if res.timed_out:
            raise ToolError(f"timed out after {timeout_s:g} s" + (f"; output so far:\n{out}" if out else ""))
        if res.killed_reason is not None:
            raise ToolError(f"killed ({res.killed_reason} limit)" + (f"; output so far:\n{out}" if out else ""))
        if not res.ok:
            tail = res.stderr.strip()[-800:]
            raise ToolError(f"exit code {res.exit_code}" + (f"; output:\n{out}" if out else "") + f"\n{tail}")
        return out if out else "(no output)"

    params = {"type": "object", "required": ["code"],
              "properties": {"code": {"type": "string", "description": "a Python program; print what you need"}}}
    return Tool("python", "Run a Python program (standard library only, no network) and return what it prints.",
                params, python)


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCS = {"abs": abs, "round": round, "min": min, "max": max, "sqrt": math.sqrt}
MAX_POWER_BITS = 4096  # a power whose result would need more bits is refused (9**9**9 would hang)


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(right) > MAX_POWER_BITS or (abs(left) > 1 and abs(right) * math.log2(abs(left)) > MAX_POWER_BITS):
                raise ToolError("the power is too large")
        try:
            return _BINARY[type(node.op)](left, right)
        except ZeroDivisionError as exc:
            raise ToolError("division by zero") from exc
        except (OverflowError, ValueError) as exc:
            raise ToolError(str(exc)) from exc
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS and not node.keywords:
        try:
            return _FUNCS[node.func.id](*[_evaluate(a) for a in node.args])
        except (TypeError, ValueError) as exc:
            raise ToolError(f"{node.func.id}: {exc}") from exc
    raise ToolError(f"unsupported expression {ast.unparse(node)!r}: use numbers, + - * / // % **, parentheses "
                    f"and {', '.join(_FUNCS)}")


def calculate(expression: str) -> str:
    """The value of an arithmetic expression, as text (an integral float prints as an integer)."""
    try:
        tree = ast.parse(str(expression).strip(), mode="eval")
    except SyntaxError as exc:
        raise ToolError(f"not an expression: {exc.msg}") from exc
    value = _evaluate(tree)
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.12g}"
    return str(value)


def calculator_tool() -> Tool:
    params = {"type": "object", "required": ["expression"],
              "properties": {"expression": {"type": "string", "description": "e.g. (12 + 7) * 3 / 4"}}}
    return Tool("calculator", "Evaluate an arithmetic expression: numbers, + - * / // % **, parentheses, "
                "abs, round, min, max, sqrt.", params, calculate)


def search_tool(directory: str, top_k: int = 3, max_chars: int = 600, k1: float = 1.5, b: float = 0.75,
                extensions: Sequence[str] = (".txt", ".md")) -> Tool:
    """BM25 search over the text files under ``directory`` (see ``environments.search``)."""
    index = BM25Index.from_directory(directory, extensions, k1=k1, b=b)

    def search(query: str) -> str:
        hits = index.search(str(query), top_k)
        if not hits:
            return "no results"
        parts = []
        for rank, (doc_id, score) in enumerate(hits, 1):
            text = index.text(doc_id).strip()
            parts.append(f"[{rank}] {doc_id} (score {score:.3f})\n{text[:max_chars]}")
        return "\n\n".join(parts)

    params = {"type": "object", "required": ["query"],
              "properties": {"query": {"type": "string", "description": "keywords to look for"}}}
    return Tool("search", f"Search a local collection of {len(index)} documents by keywords; returns the best "
                f"matches with their text.", params, search)


TOOLS: dict[str, Callable[..., Tool]] = {"python": python_tool, "calculator": calculator_tool, "search": search_tool}


def build_tool(spec: Any) -> Tool:
    """A ``Tool`` from a Tool, a registered name, a dict ``{"type": name, **options}`` or a Python function."""
    if isinstance(spec, Tool):
        return spec
    if isinstance(spec, str):
        spec = {"type": spec}
    if isinstance(spec, dict):
        options = dict(spec)
        kind = options.pop("type", None)
        if kind not in TOOLS:
            raise ValueError(f"unknown tool {kind!r}; built-in tools: {sorted(TOOLS)} (or pass a Python function)")
        return TOOLS[kind](**options)
    if callable(spec):
        return tool_from_function(spec)
    raise TypeError(f"cannot make a tool from {spec!r}")


# ---------------------------------------------------------------------------- calls

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


@dataclass
class ToolCall:
    name: Optional[str]
    arguments: dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None  # the call could not be read


def parse_tool_call(message: str) -> Optional[ToolCall]:
    """The first tool call of ``message`` (None when there is none)."""
    m = _CALL.search(message)
    if m is None:
        return None
    try:
        call = json.loads(m.group(1))
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            raise ValueError('expected {"name": ..., "arguments": {...}}')
        args = call.get("arguments", {})
        if isinstance(args, str):
            args = json.loads(args) if args.strip() else {}
        if not isinstance(args, dict):
            raise ValueError("arguments must be a JSON object")
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        return ToolCall(None, error=f"could not read the tool call: {exc}")
    return ToolCall(call["name"], args)


def run_tool(tools: dict[str, Tool], call: ToolCall, max_chars: int = 2000) -> tuple[str, bool]:
    """(result text, error) of ``call``; never raises for anything the call or the tool does."""
    if call.error is not None:
        return f"error: {call.error}", True
    tool = tools.get(call.name or "")
    if tool is None:
        return f"error: no tool named {call.name!r}; available: {', '.join(sorted(tools))}", True
    props, required = tool.parameters.get("properties", {}), tool.parameters.get("required", [])
    unknown = sorted(set(call.arguments) - set(props))
    missing = [p for p in required if p not in call.arguments]
    if unknown or missing:
        what = "; ".join(x for x in (f"unknown argument(s) {unknown}" if unknown else "",
                                     f"missing argument(s) {missing}" if missing else "") if x)
        return f"error: tool {tool.name!r}: {what}; its parameters: {sorted(props)}", True
    try:
        text, error = str(tool.fn(**call.arguments)), False
    except ToolError as exc:
        text, error = f"error: tool {tool.name!r}: {exc}", True
    except Exception as exc:  # noqa: BLE001 - a user's tool failing is an observation, not a crash
        text, error = f"error: tool {tool.name!r} raised {type(exc).__name__}: {exc}", True
    if len(text) > max_chars:
        text = text[:max_chars] + f"\n... ({len(text) - max_chars} more characters cut)"
    return text, error


def tools_system_prompt(tools: Sequence[Tool]) -> str:
    lines = ["You can call tools. To call one, write", "",
             '<tool_call>{"name": <tool name>, "arguments": <JSON object of arguments>}</tool_call>', "",
             "and stop: its result comes back in the next message. One call per message. When you have the "
             "final answer, reply with it and no tool call.", "", "Tools:"]
    lines += [json.dumps(t.schema()) for t in tools]
    return "\n".join(lines)


def template_renders_role(tokenizer, role: str) -> bool:
    """Whether the tokenizer's chat template renders a message of ``role`` (without an error and with its text)."""
    probe = "posttrain-role-probe-7f3a"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": role, "content": probe}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - templates reject roles by raising anything
        return False
    return probe in text


# ---------------------------------------------------------------------------- environment

class ToolEnvironment(Environment):
    """Each model message is checked for a tool call: if there is one, the tool runs and its
    result is the observation (reward 0); if not, the episode ends and ``reward`` scores the
    message. A tool call in the last allowed turn ends the episode with reward 0 (the tool does
    not run, nothing is scored). ``tools``: anything ``build_tool`` takes. ``max_workers`` > 1
    runs the tool calls of one turn concurrently (threads; the python tool runs in processes).
    """

    def __init__(self, tools: Sequence[Any], reward: Reward, max_turns: int = 4, max_tokens: Optional[int] = None,
                 on_error: str = "zero", max_workers: int = 1, max_result_chars: int = 2000):
        built = [build_tool(t) for t in tools]
        names = [t.name for t in built]
        if len(set(names)) != len(names):
            raise ValueError(f"tool names must be unique, got {names}")
        self.tools = {t.name: t for t in built}
        self.reward, self.on_error = reward, on_error
        self.max_turns, self.max_tokens = int(max_turns), max_tokens
        self.max_workers, self.max_result_chars = int(max_workers), int(max_result_chars)
        self.observation_role = "tool"
        self.system_prompt = tools_system_prompt(built)
        self.name = f"tools({','.join(names)})"

    def bind_tokenizer(self, tokenizer) -> None:
        self.observation_role = "tool" if template_renders_role(tokenizer, "tool") else "user"

    def reset(self, problem) -> EpisodeState:
        state = super().reset(problem)
        if state.messages and state.messages[0]["role"] == "system":
            state.messages[0]["content"] = state.messages[0]["content"] + "\n\n" + self.system_prompt
        else:
            state.messages.insert(0, {"role": "system", "content": self.system_prompt})
        return state

    def step(self, state: EpisodeState, message: str) -> StepResult:
        call = parse_tool_call(message)
        if call is None:
            out, errors = score_group(self.reward, state.problem, [message], on_error=self.on_error)
            info = dict(out.info[0], components={k: float(v[0]) for k, v in out.components.items()})
            if errors:
                info["reward_errors"] = errors
            return StepResult(None, float(out.rewards[0]), True, info)
        info = {"tool_call": True, "tool": call.name}
        if state.last_turn:
            return StepResult(None, 0.0, True, dict(info, unanswered_tool_call=True))
        text, error = run_tool(self.tools, call, self.max_result_chars)
        if self.observation_role != "tool":
            text = f"<tool_response>\n{text}\n</tool_response>"
        return StepResult(text, 0.0, False, dict(info, tool_error=error))

    def step_many(self, states: Sequence[EpisodeState], messages: Sequence[str]) -> list[StepResult]:
        if self.max_workers <= 1 or len(states) <= 1:
            return super().step_many(states, messages)
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            return list(pool.map(self.step, states, messages))
