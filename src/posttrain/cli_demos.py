"""``posttrain demos CONFIG [key=value ...] --out FILE.jsonl [--split train] [--limit N] [--tool NAME] [--force]``:
tool-call demonstrations for an SFT warm start (environments/demonstrations.py).

CONFIG is an RL config with an ``environment:`` section (e.g. examples/tool_math.yaml); its
``task``, ``reward`` and ``environment`` are built exactly as ``posttrain rl`` builds them
(``registry.build_environment(cfg.environment, build_reward(cfg.reward))``), and each problem of
the split becomes two ``{"messages": [...]}`` lines that ``posttrain sft`` reads (data.path): the
call's turn and the answer's turn after the tool's real result (``--first-turn-only``: the first).
Everything that can be refused is refused before a problem is generated or a file written: an
existing FILE (unless --force), a config without ``environment:``, a task or tool the call
builder does not know. The file is written whole or not at all (a temporary file, renamed).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _demos(args) -> int:
    from posttrain.config import RLConfig, load_config
    from posttrain.environments.demonstrations import resolve_tool, tool_call_demonstrations
    from posttrain.environments.registry import build_environment
    from posttrain.rewards.registry import build_reward
    from posttrain.tasks.registry import build_task

    out = Path(args.out)
    if out.exists() and not args.force:
        raise ValueError(f"{out} already exists: pass --force to overwrite it, or choose another --out")
    if not out.parent.is_dir():
        raise ValueError(f"the directory of --out {out} does not exist: create {out.parent} first")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    cfg = load_config(args.config, args.overrides, cls=RLConfig)
    if cfg.environment is None:
        raise ValueError(f"{args.config} has no environment: section, so there is no tool to demonstrate: use an RL "
                         "config with one, e.g. examples/tool_math.yaml (environment: {type: tool_math, tools: "
                         "[python]})")
    # As the rl trainer builds it (trainers/rl.py): the run's reward, then the environment around it.
    env = build_environment(cfg.environment, build_reward(cfg.reward))
    task_name = cfg.task.get("name")
    tool = resolve_tool(env, task_name, args.tool)  # before the task generates its problems
    problems = list(build_task(cfg.task).problems(args.split))
    if args.limit is not None:
        problems = problems[:args.limit]
    if not problems:
        raise ValueError(f"task {task_name!r} has no {args.split} problems; check the task options")
    if not args.first_turn_only:
        from posttrain.models.loading import load_model_and_tokenizer

        # The result's role (tool, or user with <tool_response> tags) follows the chat template, as in RL.
        env.bind_tokenizer(load_model_and_tokenizer(cfg.model.name)[1])
    demos = tool_call_demonstrations(env, problems, task_name, tool, answers=not args.first_turn_only)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for record in demos:
                f.write(json.dumps(record) + "\n")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"{len(demos)} demonstrations ({task_name} {args.split}, tool {tool}) written to {out}")
    return 0


def add_commands(sub) -> None:
    cmd = sub.add_parser(
        "demos",
        help="tool-call demonstrations (JSONL for posttrain sft) from an RL config's task and environment",
        description="Write one {\"messages\": [...]} line per task problem: the environment's first-turn messages "
                    "(system tool prompt included) and a correct tool call as the assistant's turn. Example: "
                    "posttrain demos examples/tool_math.yaml --out runs/tool_math_demos.jsonl --limit 512",
    )
    cmd.add_argument("config", help="RL config with an environment: section (e.g. examples/tool_math.yaml)")
    cmd.add_argument("overrides", nargs="*", help="dotted overrides before the options, e.g. task.digits=3")
    cmd.add_argument("--out", required=True, help="JSONL file to write")
    cmd.add_argument("--split", default="train", choices=["train", "test"], help="task split (default: train)")
    cmd.add_argument("--limit", type=int, help="at most this many problems (the split's first N)")
    cmd.add_argument("--tool", help="the tool to call (default: the environment's first tool)")
    cmd.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    cmd.add_argument("--first-turn-only", action="store_true",
                     help="only the call's turn per problem (default: also the answer after the tool's real result, "
                          "which needs model.name's tokenizer for the result's role)")
    cmd.set_defaults(func=_demos)
