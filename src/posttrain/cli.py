"""Command line: ``posttrain rl | eval | report | bench | list``."""

from __future__ import annotations

import argparse
import errno
import json
import sys
from pathlib import Path


def _train(args, command: str, cls, train, example: str) -> int:
    """``posttrain rl|sft|dpo CONFIG [overrides]`` or ``--resume RUN_DIR [overrides]``."""
    from pathlib import Path

    from posttrain.config import load_config

    if args.resume:
        if args.config and "=" in args.config:  # `posttrain rl --resume DIR key=value`
            args.overrides.insert(0, args.config)
            args.config = None
        if args.config:
            raise ValueError("give either a config file or --resume RUN_DIR, not both")
        train(load_config(Path(args.resume) / "config.yaml", args.overrides, cls=cls), output_dir=args.resume,
              resume=True)
    else:
        if not args.config:
            raise ValueError(f"posttrain {command} needs a config file (e.g. {example}) or --resume RUN_DIR")
        train(load_config(args.config, args.overrides, cls=cls), output_dir=args.output_dir)
    return 0


def _rl(args) -> int:
    from posttrain.config import RLConfig
    from posttrain.trainers.rl_run import train_rl

    return _train(args, "rl", RLConfig, train_rl, "examples/arithmetic.yaml")


def _ei(args) -> int:
    from posttrain.config import EIConfig
    from posttrain.trainers.expert_iteration import train_expert_iteration

    return _train(args, "ei", EIConfig, train_expert_iteration, "examples/expert_iteration.yaml")


def _merge(args) -> int:
    from posttrain.models.lora import merge_run

    print(f"merged model written to {merge_run(args.run_dir, args.out_dir)}")
    return 0


def _sft(args) -> int:
    from posttrain.config import SFTConfig
    from posttrain.trainers.sft import train_sft

    return _train(args, "sft", SFTConfig, train_sft, "examples/sft.yaml")


def _dpo(args) -> int:
    from posttrain.config import DPOConfig
    from posttrain.trainers.dpo import train_dpo

    return _train(args, "dpo", DPOConfig, train_dpo, "examples/dpo.yaml")


def _list(args) -> int:
    if args.what == "algorithms":
        from posttrain.algorithms.catalog import catalog

        rows = catalog() + _selection_rows()
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            from rich.console import Console
            from rich.table import Table

            table = Table(title="posttrain algorithms")
            for col in ("kind", "name", "paper"):
                table.add_column(col, overflow="fold")
            for row in rows:
                table.add_row(row["kind"], row["name"], row.get("paper") or "")
            Console(width=160).print(table)
    elif args.what == "selection":
        for row in _selection_rows():
            print(f"{row['name']:<20} {row['summary']}  [{row['paper']}]")
    elif args.what == "tasks":
        from posttrain.tasks.registry import TASKS

        print("\n".join(sorted(TASKS)))
    elif args.what == "rewards":
        from posttrain.rewards.registry import REWARDS, _builtin

        _builtin()
        print("\n".join(sorted(set(REWARDS) | {"composite"})))
    return 0


def _selection_rows() -> list[dict]:
    from posttrain.algorithms.catalog import summary_line
    from posttrain.selection import SELECTORS

    return [{"kind": "selection", "name": e.name, "paper": e.paper, "summary": summary_line(e.fn.__doc__)}
            for e in SELECTORS.entries()]


def _report(args) -> int:
    from posttrain.evaluation.report import write_report

    for d in args.run_dirs:
        if not Path(d).is_dir():
            raise ValueError(f"{d} is not a directory")
    out = Path(args.out) if args.out else Path(args.run_dirs[0]) / "report.html"
    path = write_report([Path(d) for d in args.run_dirs], out, title=args.title)
    print(f"report written to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    for name, func, help_ in (("rl", _rl, "RL post-training (GRPO family, PPO)"),
                              ("sft", _sft, "supervised fine-tuning on demonstrations (JSONL or a task's answers)"),
                              ("dpo", _dpo, "preference optimisation on chosen/rejected pairs (DPO, IPO, SimPO, "
                                            "ORPO, ...)"),
                              ("ei", _ei, "expert iteration: sample, keep the verified-correct, fine-tune, repeat")):
        cmd = sub.add_parser(name, help=help_)
        cmd.add_argument("config", nargs="?", help="YAML config file")
        cmd.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.lr=1e-5")
        cmd.add_argument("--output-dir", help="run directory (default: a new folder under runs/)")
        cmd.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
        cmd.set_defaults(func=func)

    mg = sub.add_parser("merge", help="a LoRA run's adapter merged into its base: a full Hugging Face model")
    mg.add_argument("run_dir", help="LoRA run directory (its latest checkpoint) or a checkpoint directory")
    mg.add_argument("out_dir", help="new or empty directory for the merged model")
    mg.set_defaults(func=_merge)

    ls = sub.add_parser("list", help="list registered algorithms, selectors, tasks or rewards")
    ls.add_argument("what", choices=["algorithms", "selection", "tasks", "rewards"])
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_list)

    rep = sub.add_parser("report", help="self-contained HTML report of one or more runs")
    rep.add_argument("run_dirs", nargs="+")
    rep.add_argument("--out", help="HTML path (default: RUN_DIR/report.html)")
    rep.add_argument("--title")
    rep.set_defaults(func=_report)

    # Each command module adds its own sub-commands: add_commands(subparsers).
    import importlib

    for module in ("posttrain.cli_eval", "posttrain.cli_rm", "posttrain.cli_bench", "posttrain.cli_reproduce",
                   "posttrain.cli_demos"):
        try:
            importlib.import_module(module).add_commands(sub)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return parser


# Failures of a run that started well (exit 1, one line, no traceback). Named by module so that
# the CLI never imports torch to check them: an exception of a class whose module was never
# imported cannot have been raised.
_RUN_FAILURES = (("posttrain.trainers.rl", "NonFiniteLossError"),
                 ("posttrain.trainers.expert_iteration", "NothingToImitateError"), ("posttrain.rewards.errors", "RewardError"),
                 ("posttrain.trainers.learner_group", "LearnerCrashError"),
                 ("posttrain.trainers.selected_batch", "SelectionExhaustedError"))
# An optional extra missing or unusable, or a Ray cluster that cannot hold the run: input errors.
_SETUP_ERRORS = (("posttrain.rollout.vllm_engine", "VLLMNotInstalledError"),
                 ("posttrain.distributed.ray_pool", "RayUnavailableError"))
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _is_one_of(exc: BaseException, classes: tuple[tuple[str, str], ...]) -> bool:
    """Whether ``exc`` is one of these classes (checked only in modules already imported)."""
    for module, name in classes:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return True
    return False


def _is_run_failure(exc: BaseException) -> bool:
    return (isinstance(exc, OSError) and exc.errno in _DISK_FULL) or _is_one_of(exc, _RUN_FAILURES)


def _error(exc: BaseException) -> None:
    print(f"posttrain: error: {' '.join(str(exc).split()) or type(exc).__name__}", file=sys.stderr)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler): unwound like Ctrl-C, so ``finally`` blocks run and
    engine processes (vLLM's, Ray actors) are stopped instead of being left orphaned."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    import signal

    parser = build_parser()
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return args.func(args)
    except KeyboardInterrupt as exc:
        print("interrupted; the run directory keeps its last checkpoint (resume with --resume)", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        # Input errors (config, model, task, run dir): one clear line, no traceback.
        _error(exc)
        return 2
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is a known setup error or run failure
        if _is_one_of(exc, _SETUP_ERRORS):
            _error(exc)
            return 2
        # Non-finite losses, an aborting reward, a full disk, a dead learner: the run directory keeps
        # its last checkpoint (the message says which); one line, exit 1. Anything else is a bug: traceback.
        if not _is_run_failure(exc):
            raise
        _error(exc)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)


def entry() -> int:
    """Console entry point: ``main`` under tcmalloc when the system has it (see posttrain.allocator)."""
    from posttrain.allocator import reexec_with_tcmalloc

    reexec_with_tcmalloc()
    return main()


if __name__ == "__main__":
    sys.exit(entry())
