"""Build a task source from its config: ``{"name": "arithmetic", ...knobs}``."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from posttrain.tasks.base import TaskSource

TaskBuilder = Callable[[dict[str, Any]], TaskSource]
TASKS: dict[str, TaskBuilder] = {}


def register_task(name: str) -> Callable[[TaskBuilder], TaskBuilder]:
    def deco(fn: TaskBuilder) -> TaskBuilder:
        TASKS[name] = fn
        return fn

    return deco


def _from_dataclass(cls, params: dict[str, Any], task: str):
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"task {task!r} has no option(s) {unknown}; allowed: {sorted(allowed)}")
    return cls(**params)


@register_task("arithmetic")
def _arithmetic(params: dict[str, Any]) -> TaskSource:
    from posttrain.tasks.arithmetic import ArithmeticConfig, ArithmeticTask

    return ArithmeticTask(_from_dataclass(ArithmeticConfig, params, "arithmetic"))



@register_task("multi_digit_arithmetic")
def _multi_digit_arithmetic(params: dict[str, Any]) -> TaskSource:
    from posttrain.tasks.procedural import MultiDigitArithmeticConfig, multi_digit_arithmetic

    return multi_digit_arithmetic(_from_dataclass(MultiDigitArithmeticConfig, params, "multi_digit_arithmetic"))


@register_task("guess_the_number")
def _guess_the_number(params: dict[str, Any]) -> TaskSource:
    from posttrain.tasks.guess_the_number import GuessTheNumberTask

    allowed = {"low", "high", "max_turns", "train_size", "test_size", "seed"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"task 'guess_the_number' has no option(s) {unknown}; allowed: {sorted(allowed)}")
    return GuessTheNumberTask(**params)


@register_task("countdown")
def _countdown(params: dict[str, Any]) -> TaskSource:
    from posttrain.tasks.countdown import CountdownConfig, CountdownTask

    return CountdownTask(_from_dataclass(CountdownConfig, params, "countdown"))


@register_task("stepwise_arithmetic")
def _stepwise_arithmetic(params: dict[str, Any]) -> TaskSource:
    from posttrain.tasks.stepwise_arithmetic import StepwiseArithmeticConfig, StepwiseArithmeticTask

    return StepwiseArithmeticTask(_from_dataclass(StepwiseArithmeticConfig, params, "stepwise_arithmetic"))


@register_task("sorting")
def _sorting(params: dict[str, Any]) -> TaskSource:
    from posttrain.tasks.procedural import SortingConfig, SortingTask

    return SortingTask(_from_dataclass(SortingConfig, params, "sorting"))


@register_task("list_ops")
def _list_ops(params: dict[str, Any]) -> TaskSource:
    from posttrain.tasks.procedural import ListOpsConfig, ListOpsTask

    return ListOpsTask(_from_dataclass(ListOpsConfig, params, "list_ops"))


@register_task("logic")
def _logic(params: dict[str, Any]) -> TaskSource:
    from posttrain.tasks.procedural import LogicConfig, LogicTask

    return LogicTask(_from_dataclass(LogicConfig, params, "logic"))


@register_task("reasoning_gym")
def _reasoning_gym(params: dict[str, Any]) -> TaskSource:
    from posttrain.tasks.reasoning_gym import ReasoningGymConfig, ReasoningGymTask

    return ReasoningGymTask(_from_dataclass(ReasoningGymConfig, params, "reasoning_gym"))


@register_task("jsonl")
def _jsonl(params: dict[str, Any]) -> TaskSource:
    from posttrain.tasks.loaders import JsonlConfig

    return _from_dataclass(JsonlConfig, params, "jsonl").build()


@register_task("gsm8k_jsonl")
def _gsm8k_jsonl(params: dict[str, Any]) -> TaskSource:
    from posttrain.tasks.loaders import GSM8KJsonlConfig

    return _from_dataclass(GSM8KJsonlConfig, params, "gsm8k_jsonl").build()


@register_task("math_jsonl")
def _math_jsonl(params: dict[str, Any]) -> TaskSource:
    from posttrain.tasks.loaders import MATHJsonlConfig

    return _from_dataclass(MATHJsonlConfig, params, "math_jsonl").build()


@register_task("hf_local")
def _hf_local(params: dict[str, Any]) -> TaskSource:
    from posttrain.tasks.loaders import HFLocalConfig

    return _from_dataclass(HFLocalConfig, params, "hf_local").build()


@register_task("humaneval")
def _humaneval(params: dict[str, Any]) -> TaskSource:
    from posttrain.tasks.humaneval import HumanEvalConfig, HumanEvalTask

    return HumanEvalTask(_from_dataclass(HumanEvalConfig, params, "humaneval"))


@register_task("mixture")
def _mixture(params: dict[str, Any]) -> TaskSource:
    from posttrain.tasks.mixture import MixtureConfig, MixtureTask

    return MixtureTask(_from_dataclass(MixtureConfig, params, "mixture"))


def build_task(spec: dict[str, Any]) -> TaskSource:
    """``spec["name"]`` picks the task; the other keys are its options."""
    params = dict(spec)
    name = params.pop("name", None)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[name](params)
