"""Code-execution reward: run the completion's code against ``problem.tests`` in the sandbox.

The program that runs is a small harness around two sources, kept apart:

* the solution: the last ```python fenced block of the completion (else the last fenced
  block, else an unterminated fence's tail, else the raw completion), preceded by the code
  stub ``problem.metadata["prompt"]`` when there is one (``include_prompt="auto"``, the
  default). A HumanEval stub ends in a function whose body is only its docstring, so both a
  body-only completion and a complete function (which then redefines it) make a valid
  program. ``include_prompt=True`` also falls back to a plain-text ``problem.prompt``;
  ``False`` never prepends;
* the tests: ``problem.tests``. If they define ``check`` without calling it and
  ``problem.metadata["entry_point"]`` names the function under test, ``check(<entry_point>)``
  is appended.

The harness runs the solution, then the tests, in one fresh namespace (``__name__ ==
"__main__"``) with the program's own prints discarded, and reports back on stdout behind a
random per-run token that the program never sees in its source, its environment or its
arguments. A program that exits early (``sys.exit(0)``, ``os._exit(0)``), crashes, times out
or is killed reports nothing and scores 0. (A program that digs the token out of the
interpreter's memory could still forge a pass: this harness stops accidents and easy
exploits, not a deliberate attack on the reward.)

Modes: ``"all"``: 1.0 iff the tests ran to the end without an exception (any failing
``assert`` stops them); ``"fraction"``: every ``assert`` statement of the tests is rewritten to
record its outcome and carry on, and the reward is the fraction of assert statements that
ran and never failed (an assert in a loop must pass every time).
"""

from __future__ import annotations

import ast
import json
import re
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

from posttrain.rewards.base import RewardOutput
from posttrain.rewards.sandbox import SandboxResult, run_python
from posttrain.tasks.base import Problem

__all__ = ["CodeReward", "build_program", "extract_code", "instrument_asserts"]

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)```", re.DOTALL)
_OPEN_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[^\n]*\n(.*)$", re.DOTALL | re.IGNORECASE)
_PY = {"python", "py", "python3", "python2"}


def extract_code(text: str, block: str = "last") -> str:
    """Code of a completion: the last (``block="last"``) or all joined (``"all"``) ```python
    blocks; else fenced blocks of any language; else the tail of an unterminated fence; else
    the raw text."""
    if block not in ("last", "all"):
        raise ValueError(f"block must be 'last' or 'all', got {block!r}")
    blocks = _FENCE.findall(text)
    chosen = [code for lang, code in blocks if lang.lower() in _PY] or [code for _, code in blocks]
    if chosen:
        return chosen[-1] if block == "last" else "\n\n".join(chosen)
    m = _OPEN_FENCE.search(text)
    if m:
        return m.group(1)
    return text


class _AssertRewriter(ast.NodeTransformer):
    def __init__(self) -> None:
        self.count = 0

    def visit_Assert(self, node: ast.Assert) -> ast.AST:
        idx = self.count
        self.count += 1
        call = ast.Call(
            func=ast.Name(id="__posttrain_check__", ctx=ast.Load()),
            args=[ast.Constant(idx), ast.Lambda(args=ast.arguments(posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[], defaults=[]), body=node.test)],
            keywords=[],
        )
        return ast.copy_location(ast.Expr(value=call), node)


def instrument_asserts(tests: str) -> tuple[str, int]:
    """Rewrite every ``assert X`` in ``tests`` to ``__posttrain_check__(i, lambda: X)``.
    Returns (new source, number of assert statements)."""
    tree = ast.parse(tests)
    rw = _AssertRewriter()
    tree = ast.fix_missing_locations(rw.visit(tree))
    return ast.unparse(tree), rw.count


def _with_check_call(tests: str, entry_point: Optional[str]) -> str:
    if not entry_point:
        return tests
    try:
        tree = ast.parse(tests)
    except SyntaxError:
        return tests
    defines = any(isinstance(n, ast.FunctionDef) and n.name == "check" for n in tree.body)
    calls = any(
        isinstance(n, ast.Expr) and isinstance(n.value, ast.Call) and isinstance(n.value.func, ast.Name) and n.value.func.id == "check"
        for n in tree.body
    )
    if defines and not calls:
        return tests.rstrip() + f"\n\ncheck({entry_point})\n"
    return tests


_HARNESS = r'''
import sys as _sys, os as _os

def _posttrain_harness(_write=_os.write):
    import json, traceback
    token = _sys.stdin.readline().strip()
    solution, tests = {solution!r}, {tests!r}
    passed, failed = set(), set()

    def check(i, fn):
        try:
            ok = bool(fn())
        except Exception:
            ok = False
        (passed if ok else failed).add(i)

    namespace = {{"__name__": "__main__", "__posttrain_check__": check}}
    result = {{"error": None, "stage": "solution"}}
    _sys.stdout = open(_os.devnull, "w")
    try:
        exec(compile(solution, "<solution>", "exec"), namespace)
        result["stage"] = "tests"
        exec(compile(tests, "<tests>", "exec"), namespace)
        result["stage"] = "done"
    except BaseException as e:
        result["error"] = (type(e).__name__ + ": " + str(e))[:300]
        try:
            traceback.print_exc(limit=4)
        except BaseException:
            pass
    result["passed"] = sorted(passed - failed)
    result["failed"] = sorted(failed)
    _write(1, ("\n" + token + " " + json.dumps(result) + "\n").encode())

_posttrain_harness()
'''


def build_program(solution: str, tests: str) -> str:
    """The harness program for ``solution`` + ``tests`` (expects the report token on stdin)."""
    return _HARNESS.format(solution=solution, tests=tests)


class CodeReward:
    """Sandboxed unit-test reward (see the module docstring). ``name="code"``.

    Components: ``passed`` (the reward: 0/1 in mode ``"all"``, a fraction in ``"fraction"``)
    and ``timed_out`` (0/1). Info: ``exit_code``, ``killed_reason``, ``error`` (the exception
    that stopped the solution or tests), ``n_asserts``/``n_passed`` (fraction mode),
    ``stderr`` (tail) and ``wall_s``. Identical programs in a group run once; distinct ones
    run ``max_workers`` at a time.
    """

    name = "code"

    def __init__(
        self,
        mode: str = "all",
        timeout_s: float = 5.0,
        memory_mb: int = 512,
        include_prompt: bool | str = "auto",
        block: str = "last",
        max_workers: int = 1,
        max_output_bytes: int = 65536,
    ):
        if mode not in ("all", "fraction"):
            raise ValueError(f"CodeReward mode must be 'all' or 'fraction', got {mode!r}")
        if block not in ("last", "all"):
            raise ValueError(f"block must be 'last' or 'all', got {block!r}")
        if include_prompt not in (True, False, "auto"):
            raise ValueError(f"include_prompt must be True, False or 'auto', got {include_prompt!r}")
        self.mode, self.timeout_s, self.memory_mb = mode, float(timeout_s), int(memory_mb)
        self.include_prompt, self.block, self.max_workers = include_prompt, block, max(1, int(max_workers))
        self.max_output_bytes = int(max_output_bytes)

    def _tests(self, problem: Problem) -> tuple[str, int]:
        if not problem.tests:
            raise ValueError(f"CodeReward needs problem.tests; problem {problem.id!r} has none")
        tests = _with_check_call(problem.tests, problem.metadata.get("entry_point"))
        if self.mode == "fraction":
            return instrument_asserts(tests)
        return tests, 0

    def _solution(self, problem: Problem, completion: str) -> str:
        code = extract_code(completion, self.block)
        if self.include_prompt is False:
            return code
        stub = problem.metadata.get("prompt")
        if not isinstance(stub, str) and self.include_prompt is True and isinstance(problem.prompt, str):
            stub = problem.prompt
        if isinstance(stub, str) and stub:
            return (stub if stub.endswith("\n") else stub + "\n") + code
        return code

    def _score(self, res: SandboxResult, token: str, n_asserts: int) -> tuple[float, dict[str, Any]]:
        info: dict[str, Any] = {
            "exit_code": res.exit_code,
            "killed_reason": res.killed_reason,
            "wall_s": round(res.wall_s, 4),
            "stderr": res.stderr[-500:],
        }
        report = None
        for line in reversed(res.stdout.splitlines()):
            if line.startswith(token + " "):
                try:
                    report = json.loads(line[len(token) + 1 :])
                except ValueError:
                    report = None
                break
        if report is None or res.timed_out or res.killed_reason is not None:
            info["error"] = (report or {}).get("error") or ("no test report" if res.killed_reason is None else res.killed_reason)
            return 0.0, info
        info["error"] = report.get("error")
        if self.mode == "all":
            return (1.0 if report.get("error") is None and res.exit_code == 0 else 0.0), info
        n_passed = len(report.get("passed", []))
        info["n_asserts"], info["n_passed"] = n_asserts, n_passed
        if n_asserts == 0:
            return (1.0 if report.get("error") is None else 0.0), info
        return n_passed / n_asserts, info

    def __call__(self, problem: Problem, completions: Sequence[str]) -> RewardOutput:
        tests, n_asserts = self._tests(problem)
        solutions = [self._solution(problem, c) for c in completions]
        unique = list(dict.fromkeys(solutions))

        def run(solution: str) -> tuple[float, dict[str, Any], bool]:
            token = secrets.token_hex(16)
            res = run_python(
                build_program(solution, tests),
                timeout_s=self.timeout_s,
                memory_mb=self.memory_mb,
                stdin=token + "\n",
                max_output_bytes=self.max_output_bytes,
            )
            reward, info = self._score(res, token, n_asserts)
            return reward, info, res.timed_out

        if self.max_workers > 1 and len(unique) > 1:
            with ThreadPoolExecutor(max_workers=min(self.max_workers, len(unique))) as pool:
                results = dict(zip(unique, pool.map(run, unique)))
        else:
            results = {s: run(s) for s in unique}
        rewards = [results[s][0] for s in solutions]
        return RewardOutput(
            rewards=rewards,
            components={"passed": list(rewards), "timed_out": [1.0 if results[s][2] else 0.0 for s in solutions]},
            info=[dict(results[s][1]) for s in solutions],
        )
