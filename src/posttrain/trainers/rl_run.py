"""Run an RL config end to end: validate, prepare the run directory, train, evaluate, summarise.

Everything that can be checked without loading weights is checked first (config, model
source, task, reward, run directory), so bad input fails in a second with nothing written.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from posttrain.config import ConfigError, RLConfig, dump_config, load_config
from posttrain.models.loading import describe_source, latest_checkpoint, load_model_and_tokenizer
from posttrain.rewards.base import Reward, problem_issue
from posttrain.rewards.registry import build_reward
from posttrain.rollout.engine import cpu_computes_bf16
from posttrain.runs import KILL_ENV, RunDir, RunDirError, check_writable, maybe_kill, new_run_dir
from posttrain.tasks.registry import build_task
from posttrain.trainers.learner import resolve_device
from posttrain.trainers.rl import NonFiniteLossError, RLTrainer
from posttrain.trainers.learner_group import LearnerCrashError


def prepare(cfg: RLConfig, output_dir: Optional[str], resume: bool, task=None, python_reward: bool = False,
            python_env: bool = False):
    """Validate cheap things and return (task, run_path). ``task`` (a TaskSource), a Python reward
    or environment (posttrain.api) stand in for the config's sections, which are then not built."""
    describe_source(cfg.model.name)
    resolve_device(cfg.trainer.device)
    if cfg.rollout.engine == "vllm":
        from posttrain.rollout.vllm_engine import import_vllm

        import_vllm()  # not installed or broken: say how to install it, before anything loads
    task = task or build_task(cfg.task)
    for split in ("train", "test"):
        if not task.problems(split):
            raise ValueError(f"task {cfg.task.get('name')!r} has an empty {split} split; check the task options")
    # The specs are validated here (rebuilt with the tokenizer later); without an environment the
    # reward scores the task's answers directly, so every problem is checked against it.
    reward = None if python_reward else build_reward(cfg.reward)
    if cfg.algorithm.turn_credit and cfg.environment is None and not python_env:  # here: a Python env counts
        raise ConfigError("algorithm.turn_credit credits the step rewards of multi-turn episodes: it needs an "
                          "environment (environment: {type: ...}, or posttrain.api.train(..., environment=...))")
    if cfg.environment is not None and not python_env:
        from posttrain.environments.registry import build_environment

        build_environment(cfg.environment, None)  # unknown type or option: fails before any model loads
    eval_reward = build_reward(cfg.eval_reward) if cfg.eval_reward is not None else reward
    if cfg.environment is None:
        check_answers(task, {"train": ("reward", reward), "test": ("eval_reward" if cfg.eval_reward else "reward",
                                                                  eval_reward)})
    path = run_path(output_dir or cfg.output_dir, resume)
    if resume:
        check_resume(path, cfg, ("critic.safetensors",) if cfg.algorithm.uses_critic else ())
    return task, path


def check_answers(task, rewards: dict[str, tuple[str, Optional[Reward]]]) -> None:
    """Refuse a task whose answers its reward cannot score (``rewards``: split -> (config key,
    reward)), naming the first such problem and how many there are."""
    for split, (key, reward) in rewards.items():
        if reward is None:
            continue
        problems = task.problems(split)
        issues = [issue for p in problems if (issue := problem_issue(reward, p))]
        if issues:
            raise ValueError(f"{key}: {len(issues)} of {len(problems)} {split} problems cannot be scored; the first: "
                             f"{issues[0]}")


class ResumeError(ValueError):
    """A run cannot continue from its checkpoint with this config (nothing was changed)."""


# What a checkpoint holds depends on these keys: changing one on --resume could not load it, or
# would silently load state of another shape (the split-master optimizer's layout differs).
STATE_KEYS = ("model.name", "selection.name", "trainer.split_master_weights", "trainer.autocast")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resume(path: Path, cfg, extra_files: tuple[str, ...] = ()) -> None:
    """Before anything loads or is written: the run has a complete checkpoint with its files,
    and the overrides leave what it holds alone (``STATE_KEYS``; a critic must stay a critic)."""
    import yaml

    from posttrain.config import to_dict

    checkpoint = latest_checkpoint(path)
    if checkpoint is None:
        return  # nothing saved yet: the run starts again from step 0
    if cfg.trainer.steps < int(checkpoint.name[5:]):  # it would log an evaluation of step N's weights as step `steps`
        raise ResumeError(f"cannot resume {path} with trainer.steps={cfg.trainer.steps}: its latest checkpoint is "
                          f"{checkpoint.name}; give trainer.steps >= {checkpoint.name[5:]} ({path / 'config.yaml'} is "
                          "unchanged)")
    from posttrain.models.lora import checkpoint_weights_file, resume_problem

    saved = yaml.safe_load((path / "config.yaml").read_text()) or {}
    lora = resume_problem((saved.get("model") or {}).get("lora"), to_dict(cfg.model)["lora"])
    if lora is not None:  # an adapter checkpoint and a full one do not stand in for each other
        raise ResumeError(f"cannot resume {path} with {lora}. Drop the override (config.yaml is unchanged) or start a "
                          f"new run from it with model.name={path}")
    weights = checkpoint_weights_file(cfg.model.lora)  # adapter_model.safetensors under model.lora
    missing = [f for f in (weights, "trainer_state.pt", *extra_files) if not (checkpoint / f).is_file()]
    if missing:
        raise ResumeError(f"cannot resume {path}: {checkpoint} lacks {', '.join(missing)}"
                          + (" (a critic is saved only by runs with advantage_estimator: gae; the overrides ask for "
                             "one)" if "critic.safetensors" in missing else "")
                          + f"; {path / 'config.yaml'} is unchanged")
    old, new = _flat(yaml.safe_load((path / "config.yaml").read_text()) or {}), _flat(to_dict(cfg))
    changed = [k for k in STATE_KEYS if k in old and old.get(k) != new.get(k)]
    if changed:
        raise ResumeError(f"cannot resume {path} with {', '.join(f'{k}={new.get(k)!r}' for k in changed)}: the "
                          f"checkpoint was trained with {', '.join(f'{k}={old.get(k)!r}' for k in changed)}, and its "
                          f"state would not fit. Drop the override (config.yaml is unchanged) or start a new run "
                          f"from it with model.name={path}")


def run_path(output_dir: Optional[str], resume: bool, kind: str = "rl") -> Path:
    """The run directory: new and empty (or absent), or an existing run when resuming; writable."""
    path = Path(output_dir or new_run_dir(name=kind))
    if resume:
        if not (path / "config.yaml").exists():
            raise RunDirError(f"--resume {path}: no config.yaml there, so it is not a run directory")
    elif path.exists() and any(path.iterdir()):
        raise RunDirError(f"run directory {path} already exists and is not empty; use --resume {path} to continue it "
                          "or choose another --output-dir")
    check_writable(path)
    return path


def _progress(total: int, start: int, enabled: bool, title: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn(f"[bold]{title}[/]"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"), disable=not enabled, transient=False,
    )
    task_id = progress.add_task("train", total=total, completed=start, info="")
    return progress, task_id


def _step_info(m: dict) -> str:
    kl = f" kl {m['kl/mean']:.4f}" if "kl/mean" in m else ""
    entropy = m.get("entropy/mean", m.get("entropy/learner", float("nan")))
    return (f"reward {m['reward/mean']:.3f} len {m['response_length/mean']:.1f}{kl} "
            f"ent {entropy:.2f} {m['time/step_s']:.1f}s/step")


def train_rl(cfg: RLConfig, output_dir: Optional[str] = None, resume: bool = False,
             stop_after: Optional[int] = None, quiet: bool = False, task=None, reward=None, environment=None,
             python_api: Optional[dict] = None) -> dict:
    """Train per ``cfg``; returns the summary. ``stop_after`` ends this call after that many
    steps (the run stays resumable), which tests use to simulate an interruption. ``task``,
    ``reward`` and ``environment`` objects replace the config's sections (posttrain.api.train);
    ``python_api`` records which, in RUN_DIR/python_api.json."""
    task, path = prepare(cfg, output_dir, resume, task, reward is not None, environment is not None)
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        run = RunDir(path)
        if python_api is not None:
            run.write_json("python_api.json", python_api)
        model, tokenizer = load_model_and_tokenizer(cfg.model.name)
        if reward is not None and getattr(reward, "tokenizer", False) is None:
            reward.tokenizer = tokenizer  # a Python function gets completion_ids, as under TRL
        reward = reward or build_reward(cfg.reward, tokenizer=tokenizer)
        eval_reward = build_reward(cfg.eval_reward, tokenizer=tokenizer) if cfg.eval_reward is not None else None
        trainer = RLTrainer(cfg, model, tokenizer, task, reward, run, eval_reward=eval_reward, env=environment)
    except BaseException:
        if created and path.exists():
            shutil.rmtree(path)  # nothing half-written is left behind
        raise
    try:
        return run_loop(trainer, cfg, run, path, resume, stop_after, quiet, _step_info)
    finally:
        trainer.close()


def launch(cfg, output_dir: Optional[str], resume: bool, stop_after: Optional[int], quiet: bool, kind: str,
           build: Callable, step_info: Callable[[dict], str], samples: bool = False) -> dict:
    """What sft, dpo and ei share after their own cheap checks: the run directory (new, or a run
    to resume, checked by ``check_resume``), the model, ``build(model, tokenizer, run)`` -> the
    trainer, then ``run_loop``. A failure before training removes a directory it created.
    ``samples``: the trainer samples scored completions each step (``last_rollouts``)."""
    if cfg.trainer.log_completions_every and not samples:
        raise ConfigError(f"trainer.log_completions_every: posttrain {kind} samples no completions to show "
                          "(rl and dpo with data.path=online do); set it to 0")
    path = run_path(output_dir or cfg.output_dir, resume, kind)
    if resume:
        check_resume(path, cfg)
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        run = RunDir(path)
        model, tokenizer = load_model_and_tokenizer(cfg.model.name)
        trainer = build(model, tokenizer, run)
    except BaseException:
        if created and path.exists():
            shutil.rmtree(path)  # nothing half-written is left behind
        raise
    try:
        return run_loop(trainer, cfg, run, path, resume, stop_after, quiet, step_info, kind)
    finally:
        trainer.close()


def run_loop(trainer, cfg, run: RunDir, path: Path, resume: bool, stop_after: Optional[int], quiet: bool,
             step_info: Callable[[dict], str], kind: str = "rl") -> dict:
    """The loop every trainer shares: resume, evaluate before, train_step / log / evaluate /
    checkpoint, evaluate after, summary. ``trainer`` has step, eval_problems, train_step(),
    evaluate() -> .as_dict() with "accuracy", load_state(), save_checkpoint(), learner, engine."""
    # A resume is transactional: the checkpoint is loaded before anything in the run directory
    # changes, so a refused or failed resume leaves config.yaml (and the rest) as it was.
    checkpoint = run.latest_checkpoint() if resume else None
    if checkpoint is not None:
        try:
            trainer.load_state(checkpoint)
        except Exception as exc:  # noqa: BLE001 - re-raised as one clear error naming the checkpoint
            raise ResumeError(f"cannot resume {path} from {checkpoint.name}: {type(exc).__name__}: "
                              f"{' '.join(str(exc).split())}. {path / 'config.yaml'} is unchanged; resume "
                              "without the overrides that change the model or its state, or from another "
                              "checkpoint") from exc
    if resume:
        run.clean_stale()  # half-written checkpoints of a killed process (never loaded)
    # On resume too (overrides such as trainer.steps are kept); atomic, since a torn config.yaml
    # would silently resume with defaults for the keys it lost.
    tmp_config = path / f"config.yaml.tmp{os.getpid()}"
    dump_config(cfg, tmp_config)
    os.replace(tmp_config, path / "config.yaml")
    _install_kill_hooks(trainer)
    # Rows written after the checkpoint belong to steps that will be redone.
    for name in ("metrics.jsonl", "eval.jsonl", "reward_errors.jsonl", "completions.jsonl"):
        if name in ("metrics.jsonl", "eval.jsonl") or (path / name).exists():
            run.truncate_jsonl(name, trainer.step)
    say = (lambda *a: None) if quiet else print
    tc = cfg.trainer
    run.use_loggers(tc.report_to, trainer.step, quiet)  # trainer.report_to (posttrain.loggers)
    # Results of evaluations logged before a restart (without their "step" key, as if fresh).
    evals = {r["step"]: {k: v for k, v in r.items() if k != "step"} for r in run.read_jsonl("eval.jsonl")}
    learner = getattr(trainer, "learner", None)
    if learner is not None:
        say(precision_line(learner.dtype, learner.device, tc.autocast))
    lora = getattr(learner, "lora", None)
    if lora is not None:
        say(lora.describe())
    if 0 not in evals:
        say(f"run directory: {path}\nevaluating on {len(trainer.eval_problems)} held-out problems before training ...")
        before = trainer.evaluate().as_dict()
        run.append("eval.jsonl", {"step": 0, **before})
        evals[0] = before
        say(f"  accuracy before: {before['accuracy']:.3f}")
    wall_start = time.perf_counter()
    done_rows = run.read_jsonl("metrics.jsonl")
    prior_wall = float(done_rows[-1].get("time/train_wall_s", 0.0)) if done_rows else 0.0
    progress, bar = _progress(tc.steps, trainer.step, not quiet and sys.stdout.isatty(), kind.upper())
    end = tc.steps if stop_after is None else min(tc.steps, trainer.step + stop_after)
    with progress:
        while trainer.step < end:
            try:
                metrics = trainer.train_step()
            except (NonFiniteLossError, LearnerCrashError) as exc:
                run.close()
                last = run.latest_checkpoint()
                where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
                raise type(exc)(f"{exc} ({where})") from exc
            metrics["time/train_wall_s"] = prior_wall + time.perf_counter() - wall_start
            run.log_metrics(trainer.step, metrics)
            if tc.log_completions_every and trainer.step % tc.log_completions_every == 0:
                _log_completions(run, trainer, tc.log_completions, None if quiet else progress.console)
            progress.update(bar, completed=trainer.step, info=step_info(metrics))
            if not progress.live.is_started and not quiet:
                print(f"step {trainer.step}/{tc.steps} {step_info(metrics)}", flush=True)
            last = trainer.step == tc.steps
            if tc.eval_every and trainer.step % tc.eval_every == 0 and not last:
                result = trainer.evaluate().as_dict()
                run.append("eval.jsonl", {"step": trainer.step, **result})
                evals[trainer.step] = result
                progress.console.print(f"step {trainer.step}: held-out accuracy {result['accuracy']:.3f}")
            if last or (tc.checkpoint_every and trainer.step % tc.checkpoint_every == 0):
                trainer.save_checkpoint()
    train_wall = prior_wall + time.perf_counter() - wall_start
    if trainer.step < tc.steps:
        run.close()
        return {"steps": trainer.step, "stopped_early": True}
    if tc.steps not in evals:
        after = trainer.evaluate().as_dict()
        run.append("eval.jsonl", {"step": tc.steps, **after})
        evals[tc.steps] = after
    import psutil

    summary = {
        "eval_before": evals[0],
        "eval_after": evals[tc.steps],
        "train_wall_s": train_wall,
        "steps": trainer.step,
        "peak_rss_mb": _peak_rss_mb(),
        "model": cfg.model.name,
        "run_dir": str(path),
    }
    lora = getattr(getattr(trainer, "learner", None), "lora", None)
    if lora is not None:  # what trained and what the sampler used (models/lora.py)
        summary["lora"] = lora.summary()
    run.write_json("summary.json", summary)
    run.close()
    if not quiet:
        _print_summary(summary, kind)
    return summary


def precision_line(dtype, device, autocast: str) -> str:
    """What the learner computes in, and why when ``auto`` passed over an emulated bf16."""
    line = f"learner computes in {str(dtype).removeprefix('torch.')}"
    if autocast == "auto" and device.type == "cpu" and dtype == torch.float32 and cpu_computes_bf16():
        line += (" (auto: this CPU has no bf16 instructions, AVX512_BF16 or AMX, so bf16 would be emulated and "
                 "slower; trainer.autocast=bfloat16 rollout.dtype=bfloat16 forces it)")
    return line


def _log_completions(run: RunDir, trainer, k: int, console) -> None:
    """``k`` of this step's sampled completions to completions.jsonl, the loggers and ``console``."""
    from posttrain.loggers import completions_table, sample_completions

    rows = sample_completions(trainer.last_rollouts, k, trainer.step)
    run.log_completions(trainer.step, rows)
    if console is not None:
        console.print(completions_table(rows))


def _install_kill_hooks(trainer: RLTrainer) -> None:
    """Crash tests only (``POSTTRAIN_TEST_KILL_AT=generation:N|optimizer_step:N``, see
    ``posttrain.runs``): SIGKILL this process in the middle of step N's rollout generation (the
    second generation forward pass of the rollout model), or right after step N's optimizer step
    has changed the weights in memory. Installs nothing when the variable is unset."""
    point = os.environ.get(KILL_ENV, "").partition(":")[0]
    if point == "optimizer_step":
        optimizer_step = trainer.learner.optimizer.step

        def killing_step(*args, **kwargs):
            out = optimizer_step(*args, **kwargs)
            maybe_kill("optimizer_step", trainer.step + 1)
            return out

        trainer.learner.optimizer.step = killing_step
    elif point == "generation":
        train_step, forwards = trainer.train_step, [-1]  # -1: not inside train_step

        def counting_train_step():
            forwards[0] = 0
            try:
                return train_step()
            finally:
                forwards[0] = -1

        engine_forward = trainer.engine._forward

        def counting_forward(*args, **kwargs):
            if forwards[0] >= 0:
                forwards[0] += 1
                if forwards[0] == 2:
                    maybe_kill("generation", trainer.step + 1)
            return engine_forward(*args, **kwargs)

        trainer.train_step = counting_train_step
        trainer.engine._forward = counting_forward


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _print_summary(s: dict, kind: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"posttrain {kind}: summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("held-out accuracy before", f"{s['eval_before']['accuracy']:.3f}")
    table.add_row("held-out accuracy after", f"{s['eval_after']['accuracy']:.3f}")
    table.add_row("change (points)", f"{100 * (s['eval_after']['accuracy'] - s['eval_before']['accuracy']):+.1f}")
    table.add_row("steps", str(s["steps"]))
    table.add_row("training wall-clock (s)", f"{s['train_wall_s']:.1f}")
    table.add_row("peak RSS (MB)", f"{s['peak_rss_mb']:.0f}")
    table.add_row("run directory", s["run_dir"])
    Console().print(table)


def load_for_resume(run_dir: str, overrides: list[str]) -> RLConfig:
    return load_config(Path(run_dir) / "config.yaml", overrides)
