"""Where a run's metrics and sampled completions go besides RUN_DIR/metrics.jsonl.

``trainer.report_to`` lists the loggers (TRL's ``report_to``, verl's ``trainer.logger``):

    tensorboard  RUN_DIR/tb/ event files (the default; tensorboard is a dependency)
    wandb        Weights & Biases, offline unless WANDB_MODE is set or an API key is
                 (WANDB_API_KEY, or ``wandb login``'s ~/.netrc entry): the run is written to
                 RUN_DIR/wandb/offline-run-*/ and ``wandb sync`` uploads it later. Project:
                 $WANDB_PROJECT or "posttrain"; run name: the run directory's name.
    trackio      Hugging Face's local tracker: one SQLite database per project under
                 $TRACKIO_DIR (default ~/.cache/huggingface/trackio); project $TRACKIO_PROJECT or
                 "posttrain"; ``trackio show`` opens its dashboard.

An empty list logs to metrics.jsonl only. A name that is not one of these, or one whose package
is not installed, is a ``ConfigError`` when the config loads (before any work), naming the
``pip install`` that fixes it.

``trainer.log_completions_every: N`` (0: off) shows ``trainer.log_completions`` sampled
completions of every N-th RL step (prompt, completion, reward, answer and correctness where the
reward reports one) as a console table (not when quiet), appends them in full to
RUN_DIR/completions.jsonl and logs them as a table to each logger (wandb.Table, trackio.Table,
TensorBoard text), as TRL's ``log_completions`` does (TRL #2948).

Resume: TensorBoard purges the events of steps after the checkpoint (``purge_step``); wandb
continues the same run id and trackio the same run name (both kept in RUN_DIR/loggers.json), so
their rows of steps redone after a crash appear twice there (metrics.jsonl is truncated).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import netrc
import os
import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

# name in report_to -> (module imported, pip package)
LOGGERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
           "trackio": ("trackio", "trackio")}
COMPLETION_COLUMNS = ["step", "prompt", "completion", "reward", "answer", "correct"]


@dataclass
class LoggingConfig:
    """The logging fields of ``trainer`` (TrainerConfig inherits them)."""

    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])  # tensorboard, wandb, trackio
    log_completions_every: int = 0  # RL: show/log sampled completions every N steps; 0: never
    log_completions: int = 3  # how many completions each time

    def __post_init__(self) -> None:
        # ValueError: the config loader reports it as a ConfigError (posttrain.config imports this
        # module, so importing ConfigError here would make a cycle)
        for name in self.report_to:
            if name not in LOGGERS:
                raise ValueError(f"trainer.report_to: unknown logger {name!r}; choose from "
                                  f"{', '.join(LOGGERS)} (an empty list logs to metrics.jsonl only)")
            module, package = LOGGERS[name]
            if importlib.util.find_spec(module) is None:
                raise ValueError(f"trainer.report_to names {name}, which is not installed: pip install {package} "
                                  f"(or pip install 'posttrain[loggers]'), or drop it from trainer.report_to")
        if self.log_completions_every < 0:
            raise ValueError("trainer.log_completions_every must be >= 0 (0: no completions table)")
        if self.log_completions < 1:
            raise ValueError("trainer.log_completions must be >= 1 (completions per table)")


class Logger(Protocol):
    def log_scalars(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_table(self, step: int, name: str, columns: list[str], rows: list[list]) -> None: ...

    def close(self) -> None: ...


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardLogger:
    def __init__(self, path: Path, resume_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides the earlier files' events from this step on, which the
        # resumed run redoes
        self.writer = SummaryWriter(str(path / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def log_scalars(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in _scalars(metrics).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_table(self, step: int, name: str, columns: list[str], rows: list[list]) -> None:
        def cell(v: Any) -> str:  # one markdown table cell
            return str(v).replace("|", "\\|").replace("\n", "<br>")

        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
        self.writer.add_text(name, "\n".join(lines), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_mode() -> Optional[str]:
    """None (wandb decides: online) when the user set WANDB_MODE or has an API key; else offline,
    so that a run never needs a network or an account unless asked to."""
    if os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"):
        return None
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0].split(":")[0]
    try:
        if netrc.netrc().authenticators(host):
            return None
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


class WandbLogger:
    def __init__(self, path: Path, state: dict, config: Optional[dict], quiet: bool):
        import wandb

        self.wandb = wandb
        state.setdefault("id", uuid.uuid4().hex[:12])
        self.run = wandb.init(dir=str(path), project=os.environ.get("WANDB_PROJECT", "posttrain"), name=path.name,
                              id=state["id"], resume="allow", config=config, mode=wandb_mode(),
                              settings=wandb.Settings(quiet=True, silent=True) if quiet else None)

    def log_scalars(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(_scalars(metrics), step=step)

    def log_table(self, step: int, name: str, columns: list[str], rows: list[list]) -> None:
        self.run.log({name: self.wandb.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioLogger:
    def __init__(self, path: Path, state: dict, config: Optional[dict], quiet: bool):
        import trackio
        from trackio.sqlite_storage import SQLiteStorage

        self.trackio = trackio
        project = os.environ.get("TRACKIO_PROJECT", "posttrain")
        resume = "name" in state
        if not resume:  # a fresh run never continues another one of the same directory name
            taken, name, i = set(SQLiteStorage.get_runs(project)), path.name, 1
            while name in taken:
                name, i = f"{path.name}-{i}", i + 1
            state.update(project=project, name=name)
        self.quiet = quiet
        with self._hushed():
            self.run = trackio.init(project=state["project"], name=state["name"], config=config,
                                    resume="allow" if resume else "never", embed=False, auto_log_gpu=False,
                                    auto_log_cpu=False)

    def _hushed(self):  # trackio prints where it logs on init and finish
        return contextlib.redirect_stdout(io.StringIO()) if self.quiet else contextlib.nullcontext()

    def log_scalars(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(_scalars(metrics), step=step)

    def log_table(self, step: int, name: str, columns: list[str], rows: list[list]) -> None:
        self.run.log({name: self.trackio.Table(columns=columns, data=rows)}, step=step)

    def close(self) -> None:
        with self._hushed():
            if self.trackio.context_vars.current_run.get() is self.run:
                self.trackio.finish()  # also forgets the run, which trackio would otherwise finish again at exit
            else:
                self.run.finish()


def open_loggers(names: list[str], path: Path, resume_step: int = 0, config: Optional[dict] = None,
                 quiet: bool = False) -> list[Logger]:
    """The loggers ``names`` for run directory ``path``; their ids live in RUN_DIR/loggers.json."""
    state_file = path / "loggers.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    loggers: list[Logger] = []
    for name in dict.fromkeys(names):  # each once, in order
        if name == "tensorboard":
            loggers.append(TensorBoardLogger(path, resume_step))
        elif name == "wandb":
            loggers.append(WandbLogger(path, state.setdefault("wandb", {}), config, quiet))
        elif name == "trackio":
            loggers.append(TrackioLogger(path, state.setdefault("trackio", {}), config, quiet))
    if state:
        state_file.write_text(json.dumps(state, indent=2) + "\n")
    return loggers


# ---------------------------------------------------------------------- completions table
def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):  # chat messages: the last user turn says what was asked
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1] if users else prompt[-1])
    return str(prompt)


def sample_completions(rollouts, k: int, step: int) -> list[dict]:
    """``k`` completions of a scored ``Rollouts`` batch, chosen with a seed of ``step`` (the
    training RNGs are not touched): step, prompt, completion, reward, answer, correct (None where
    the reward has no ``correct`` component)."""
    n = len(rollouts.texts)
    picks = sorted(random.Random(step).sample(range(n), min(k, n)))
    correct = rollouts.reward_components.get("correct")
    return [{
        "step": step,
        "prompt": _prompt_text(rollouts.problems[i].prompt),
        "completion": rollouts.texts[i],
        "reward": float(rollouts.rewards[i]),
        "answer": rollouts.problems[i].answer,
        "correct": None if correct is None else float(correct[i]),
    } for i in picks]


def _snippet(text: Any, limit: int, tail: bool = False) -> str:
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    return "…" + text[-limit + 1:] if tail else text[: limit - 1] + "…"


def completions_table(rows: list[dict]):
    """A rich Table of ``rows`` (snippets: a prompt's end, a completion's start)."""
    from rich.table import Table

    table = Table(title=f"step {rows[0]['step']}: sampled completions" if rows else "sampled completions")
    table.add_column("prompt", max_width=40)
    table.add_column("completion", max_width=60)
    table.add_column("reward", justify="right")
    table.add_column("answer")
    table.add_column("correct", justify="right")
    for r in rows:
        table.add_row(_snippet(r["prompt"], 80, tail=True), _snippet(r["completion"], 160), f"{r['reward']:.3f}",
                      _snippet(r["answer"] if r["answer"] is not None else "-", 30),
                      "-" if r["correct"] is None else f"{r['correct']:g}")
    return table
