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


def build_task(spec: dict[str, Any]) -> TaskSource:
    """``spec["name"]`` picks the task; the other keys are its options."""
    params = dict(spec)
    name = params.pop("name", None)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[name](params)
