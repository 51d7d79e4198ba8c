"""Run directories: resolved config, metrics (JSONL + the chosen loggers), atomic checkpoints.

Layout::

    RUN_DIR/config.yaml            resolved config
    RUN_DIR/metrics.jsonl          one JSON object per training step
    RUN_DIR/eval.jsonl             one JSON object per held-out evaluation
    RUN_DIR/completions.jsonl      sampled completions every trainer.log_completions_every RL steps
    RUN_DIR/tb/                    TensorBoard event files (trainer.report_to: [tensorboard], the default)
    RUN_DIR/wandb/                 wandb's offline run (report_to: [wandb]; ``wandb sync`` uploads it)
    RUN_DIR/loggers.json           the wandb run id and trackio run name a resume continues
    RUN_DIR/checkpoints/step_N/    Hugging Face model + tokenizer + trainer_state.pt + COMPLETE
    RUN_DIR/summary.json           written at the end

A checkpoint is written to ``step_N.tmp-PID``, flushed to disk and renamed; ``COMPLETE`` is
written last inside it, so a directory without ``COMPLETE`` is never loaded. Checkpoints are
deleted by renaming them to ``step_N.tmp-del-PID`` first, so a kill mid-delete never leaves a
half-deleted ``step_N`` behind; ``clean_stale`` (on resume, and after each save) removes such
leftovers.

Metrics go to metrics.jsonl always and to each logger of ``trainer.report_to`` (tensorboard,
wandb, trackio: ``posttrain.loggers``), opened on the first step logged; ``use_loggers`` picks them
(``RunDir`` alone logs to TensorBoard, as before ``report_to`` existed).

Crash tests set ``POSTTRAIN_TEST_KILL_AT=POINT:STEP`` to SIGKILL the process at a chosen point
(``maybe_kill``): ``checkpoint_write`` (step STEP's files are on disk, ``COMPLETE`` is not), and,
hooked in by ``trainers/rl_run.py``, ``generation`` and ``optimizer_step``. Unset, it does nothing.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import struct
import time
from pathlib import Path
from typing import Any, Optional

import torch

from posttrain.models.loading import CorruptFileError, checkpoint_fix, latest_checkpoint, safetensors_problem


class RunDirError(ValueError):
    """The run directory cannot be used (exists, unwritable, disk full...)."""


KILL_ENV = "POSTTRAIN_TEST_KILL_AT"


def maybe_kill(point: str, step: int) -> None:
    """Crash-test hook: SIGKILL this process when ``$POSTTRAIN_TEST_KILL_AT == f"{point}:{step}"``."""
    if os.environ.get(KILL_ENV) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def new_run_dir(base: Path = Path("runs"), name: str = "rl") -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = base / f"{name}-{stamp}"
    i = 1
    while path.exists():
        path = base / f"{name}-{stamp}-{i}"
        i += 1
    return path


def check_writable(path: Path, min_free_mb: int = 200) -> None:
    """Fail early (before any training) if ``path`` cannot hold a run."""
    probe_dir = path
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise RunDirError(f"run directory {path}: {probe_dir} is not a directory")
    if not os.access(probe_dir, os.W_OK | os.X_OK):
        raise RunDirError(f"run directory {path} is not writable ({probe_dir} denies writes); pick another --output-dir")
    free_mb = shutil.disk_usage(probe_dir).free / 2**20
    if free_mb < min_free_mb:
        raise RunDirError(f"only {free_mb:.0f} MB free under {probe_dir}; a run needs at least {min_free_mb} MB")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.report_to: list[str] = ["tensorboard"]
        self._logger_args: dict[str, Any] = {}
        self._loggers: Optional[list] = None

    # ------------------------------------------------------------------ metrics
    def append(self, name: str, row: dict[str, Any]) -> None:
        with open(self.path / name, "a") as f:
            f.write(json.dumps(row, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def use_loggers(self, report_to: list[str], resume_step: int = 0, quiet: bool = False) -> None:
        """Log to ``report_to`` (``posttrain.loggers``) from now on; a resume continues the
        loggers' runs from ``resume_step``; ``quiet`` silences their console output."""
        self.close()
        self.report_to, self._logger_args = list(report_to), {"resume_step": resume_step, "quiet": quiet}

    def loggers(self) -> list:
        if self._loggers is None:
            import yaml

            from posttrain.loggers import open_loggers

            config_file = self.path / "config.yaml"  # the resolved config, shown next to the run's metrics
            config = yaml.safe_load(config_file.read_text()) if config_file.exists() else None
            self._loggers = open_loggers(self.report_to, self.path, config=config, **self._logger_args)
        return self._loggers

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.append("metrics.jsonl", {"step": step, **metrics})
        for logger in self.loggers():
            logger.log_scalars(step, metrics)

    def log_completions(self, step: int, rows: list[dict]) -> None:
        """Sampled completions (``posttrain.loggers.sample_completions``): appended in full to
        completions.jsonl and logged as a table "completions" to every logger."""
        from posttrain.loggers import COMPLETION_COLUMNS

        with open(self.path / "completions.jsonl", "a") as f:
            f.write("".join(json.dumps(row, default=float) + "\n" for row in rows))
            f.flush()
            os.fsync(f.fileno())
        table = [[row.get(c) for c in COMPLETION_COLUMNS] for row in rows]
        for logger in self.loggers():
            logger.log_table(step, "completions", COMPLETION_COLUMNS, table)

    def read_jsonl(self, name: str) -> list[dict]:
        path = self.path / name
        if not path.exists():
            return []
        rows = []
        for raw in path.read_bytes().splitlines():
            if raw.strip():
                try:
                    row = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
                    row = None
                step = row.get("step", 0) if isinstance(row, dict) else None
                if not isinstance(step, (int, float)) or isinstance(step, bool):
                    break  # a torn last line from a crash (or a damaged one): everything after it is dropped
                rows.append(row)
        return rows

    def truncate_jsonl(self, name: str, max_step: int) -> None:
        """Keep rows with step <= max_step (rows past the checkpoint are redone on resume)."""
        rows = [r for r in self.read_jsonl(name) if r.get("step", 0) <= max_step]
        _write_atomic(self.path / name, "".join(json.dumps(r) + "\n" for r in rows))

    def write_json(self, name: str, data: dict) -> None:
        _write_atomic(self.path / name, json.dumps(data, indent=2, default=float) + "\n")

    def close(self) -> None:
        loggers, self._loggers = self._loggers or [], None
        errors = []
        for logger in loggers:  # each one, even after another failed
            try:
                logger.close()
            except Exception as exc:  # noqa: BLE001 - re-raised below, after the others closed
                errors.append(exc)
        if errors:
            raise errors[0]

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int, model, tokenizer, state: dict[str, Any], keep: int,
                        extra_weights: Optional[dict[str, dict[str, torch.Tensor]]] = None) -> Path:
        """``extra_weights`` maps a file stem to a state dict saved as ``<stem>.safetensors``."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        final = self.checkpoints / f"step_{step}"
        tmp = self.checkpoints / f"step_{step}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        torch.save(state, tmp / "trainer_state.pt")
        if extra_weights:
            from safetensors.torch import save_file

            for stem, tensors in extra_weights.items():
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / f"{stem}.safetensors"))
        meta = {"step": step, "torch": torch.__version__, "time": time.time()}
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        maybe_kill("checkpoint_write", step)
        with open(tmp / "COMPLETE", "w") as fh:
            fh.write(json.dumps(meta) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():
            _discard(final)
        os.replace(tmp, final)
        _fsync_dir(self.checkpoints)
        self._prune(keep)
        return final

    def _prune(self, keep: int) -> None:
        done = sorted(
            (p for p in self.checkpoints.glob("step_*") if (p / "COMPLETE").exists() and p.name[5:].isdigit()),
            key=lambda p: int(p.name[5:]),
        )
        for old in done[:-keep]:
            _discard(old)
        self.clean_stale()

    def clean_stale(self) -> list[Path]:
        """Remove what a killed process left: ``step_N.tmp-*`` (a writer or a delete killed
        midway), ``step_N`` without ``COMPLETE`` and torn ``*.tmpPID`` files of atomic writes.
        None of them is ever loaded. Returns the removed paths."""
        removed = []
        if self.checkpoints.is_dir():
            for p in self.checkpoints.glob("step_*"):
                if ".tmp-" in p.name or (p.name[5:].isdigit() and not (p / "COMPLETE").exists()):
                    if p.is_dir():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)
                    removed.append(p)
        if self.path.is_dir():
            for p in self.path.glob("*.tmp[0-9]*"):
                if p.is_file():
                    p.unlink(missing_ok=True)
                    removed.append(p)
        return removed

    def latest_checkpoint(self) -> Optional[Path]:
        return latest_checkpoint(self.path)


def _discard(checkpoint: Path) -> None:
    """Delete a checkpoint directory; renamed out of the ``step_N`` namespace first, so a kill
    mid-delete cannot leave a ``step_N`` that still has ``COMPLETE`` but lacks its weights."""
    doomed = checkpoint.with_name(f"{checkpoint.name}.tmp-del-{os.getpid()}")
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    os.replace(checkpoint, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


class CheckpointFileError(CorruptFileError):
    """A file of a run checkpoint is missing, truncated or damaged; the message names it and says
    which other checkpoints the run has."""


class UnsafeCheckpointError(CheckpointFileError, pickle.UnpicklingError):
    """``trainer_state.pt`` is no plain pickle of tensors and built-in types (damaged, or it would
    run code when loaded): refused by ``torch.load(weights_only=True)``."""


def check_checkpoint_files(checkpoint: Path) -> None:
    """Every ``*.safetensors`` file of ``checkpoint`` has a sound header and the size it states
    (no tensor is read), else ``CheckpointFileError`` naming the file and the fix."""
    for f in sorted(Path(checkpoint).glob("*.safetensors")):
        problem = safetensors_problem(f)
        if problem is not None:
            raise CheckpointFileError(f, problem, checkpoint_fix(Path(checkpoint)))


def _refusal(exc: BaseException) -> str:
    """The specific part of torch's weights-only refusal, without its generic advice (which
    suggests weights_only=False: never right for a damaged or foreign file)."""
    keep = []
    for part in (p.strip() for p in str(exc).splitlines()):
        if not part or part.startswith(("Weights only load failed", "Check the documentation")):
            continue
        if part.startswith("Please file an issue"):
            part = part.rsplit(":", 2)[-2].strip() + ":" if part.rstrip().endswith(":") else part
        keep.append(part)
    return " ".join(keep)[:300] or type(exc).__name__


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The trainer state of ``checkpoint``, after checking its weight files (so a truncated
    ``model.safetensors`` is named here, before the learner reads it).

    ``trainer_state.pt`` is loaded with ``weights_only=True``: tensors and built-in types only.
    A missing, truncated or foreign file is a ``CheckpointFileError`` (a ``ValueError``) naming
    the file and the checkpoints to fall back on; a refused pickle an ``UnsafeCheckpointError``
    (also a ``pickle.UnpicklingError``).
    """
    checkpoint = Path(checkpoint)
    check_checkpoint_files(checkpoint)
    path = checkpoint / "trainer_state.pt"
    fix = checkpoint_fix(checkpoint)
    if not path.is_file():
        raise CheckpointFileError(path, "missing", fix)
    try:
        state = torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(path, "truncated, damaged or not a trainer state (which holds only tensors and "
                                          f"plain data): torch.load(weights_only=True) refused it ({_refusal(exc)})",
                                    fix) from exc
    except (RuntimeError, EOFError, OSError, ValueError, struct.error, UnicodeDecodeError, KeyError) as exc:
        # a cut zip archive: RuntimeError "failed finding central directory"; garbage: EOFError, ...
        detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        raise CheckpointFileError(path, f"truncated or not a trainer state saved by torch.save ({detail})",
                                  fix) from exc
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointFileError(path, f"not a posttrain trainer state (a {type(state).__name__} without 'step')",
                                  fix)
    return state
