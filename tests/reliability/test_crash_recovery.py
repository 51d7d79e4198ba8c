"""Crash recovery: SIGKILL a real ``posttrain rl`` process again and again, resume it with
``posttrain rl --resume DIR`` each time, and check the finished run is indistinguishable from
one that was never interrupted: the same final weights and optimizer state (bit for bit), the
same metrics rows for steps 1..N (none lost, none duplicated; timings aside) and the same
held-out evaluations.

Kills are of two kinds. Targeted ones use the ``POSTTRAIN_TEST_KILL_AT=POINT:STEP`` hook (see
``posttrain.runs``): in the middle of rollout generation (step 2), right after the optimizer
step changed the weights in memory (step 4), and while a checkpoint is being written - its
files are on disk, its ``COMPLETE`` marker is not (step 4, after that step's metrics row and
evaluation were logged, and the final step 8). Random ones SIGKILL the process from outside at
a seeded moment: during start-up, or a seeded delay after a seeded step was logged.

The default test makes 6 kills (4 targeted, 2 random) in about a minute; ``-m slow`` adds a
soak with 12. Each cycle's kills are listed in the reliability report.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.models.loading import latest_checkpoint
from posttrain.runs import KILL_ENV, load_trainer_state

STEPS = 8
# Small but not trivial: two prompts x four completions, a reward the random model sometimes
# earns (so losses and gradients are non-zero), two PPO epochs of two mini-batches (the
# sampler's permutations draw from the trainer's generator), a KL term (a reference model), a
# warm-up + cosine LR schedule (the step counter matters), one checkpoint per step.
OVERRIDES = [
    "model.name=tiny-random",
    "reward={type: format, pattern: '[0-9]', match: search}",
    "rollout.num_prompts=2",
    "rollout.num_completions=4",
    "rollout.max_new_tokens=8",
    "algorithm.kl.coef=0.05",
    f"trainer.steps={STEPS}",
    "trainer.lr=1e-2",
    "trainer.warmup_steps=2",
    "trainer.lr_schedule=cosine",
    "trainer.ppo_epochs=2",
    "trainer.mini_batches=2",
    "trainer.micro_batch_size=4",
    "trainer.checkpoint_every=1",
    "trainer.eval_every=4",
    "trainer.eval_problems=4",
    "trainer.threads=1",
    "trainer.seed=11",
]
NONDETERMINISTIC = ("time/", "perf/")  # wall-clock measurements differ from run to run
SEED = 20240611


def _env(kill_at: str | None) -> dict:
    env = dict(os.environ)
    env.pop(KILL_ENV, None)
    if kill_at:
        env[KILL_ENV] = kill_at
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    return env


LIVE: list["Proc"] = []


@pytest.fixture(autouse=True)
def _no_orphans():
    """A failing test must not leave training processes running."""
    yield
    while LIVE:
        proc = LIVE.pop()
        proc.kill()
        proc.popen.wait(timeout=30)


class Proc:
    """A ``posttrain rl`` child whose output lines are read by a thread (with arrival times)."""

    def __init__(self, args: list[str], cwd: Path, kill_at: str | None = None):
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "posttrain.cli", "rl", *args], cwd=cwd, env=_env(kill_at),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.started = time.monotonic()
        LIVE.append(self)
        self.lines: queue.Queue = queue.Queue()
        self.output: list[str] = []
        self.arrived: list[tuple[float, str]] = []  # (seconds since start, line)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.popen.stdout:
            self.arrived.append((time.monotonic() - self.started, line))
            self.output.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_for_line(self, prefix: str, timeout: float = 60.0) -> bool:
        """True once a line starting with ``prefix`` arrived; False if the process ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                return False
            if line.startswith(prefix):
                return True
        raise AssertionError(f"no line {prefix!r} within {timeout}s:\n{''.join(self.output)[-3000:]}")

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)

    def wait(self, timeout: float = 120.0) -> int:
        rc = self.popen.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return rc

    def text(self) -> str:
        return "".join(self.output)


def _config_file(tmp_path: Path) -> Path:
    path = tmp_path / "base.yaml"
    path.write_text("model:\n  name: tiny-random\ntask:\n  name: arithmetic\n")
    return path


def _fresh_args(config: Path, run: Path) -> list[str]:
    return [str(config), *OVERRIDES, "--output-dir", str(run)]


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(NONDETERMINISTIC)}


def _check_invariants(run: Path) -> dict:
    """What must hold on disk after *any* kill; returns a short description of the state."""
    ckpts = run / "checkpoints"
    for p in ckpts.glob("step_*") if ckpts.is_dir() else []:
        if p.name[5:].isdigit():  # a step_N directory is only ever created complete
            assert (p / "COMPLETE").exists() and (p / "model.safetensors").exists(), f"{p} is incomplete"
    latest = latest_checkpoint(run)
    assert latest is None or ".tmp" not in latest.name
    steps = [r["step"] for r in _rows(run / "metrics.jsonl")]
    assert steps == list(range(1, len(steps) + 1)), f"metrics steps lost or duplicated: {steps}"
    evals = [r["step"] for r in _rows(run / "eval.jsonl")]
    assert evals == sorted(set(evals)), f"eval rows duplicated: {evals}"
    return {
        "checkpoint": int(latest.name[5:]) if latest else None,
        "incomplete": sorted(p.name for p in ckpts.glob("step_*.tmp-*")) if ckpts.is_dir() else [],
        "metrics_rows": len(steps),
    }


def _resume(run: Path, cwd: Path, kill_at: str | None = None) -> Proc:
    assert (run / "config.yaml").exists()  # every kill here lands after the first start wrote it
    return Proc(["--resume", str(run)], cwd, kill_at)


def _compare_runs(a: Path, b: Path) -> None:
    ma, mb = _rows(a / "metrics.jsonl"), _rows(b / "metrics.jsonl")
    assert [r["step"] for r in ma] == list(range(1, STEPS + 1))
    assert [r["step"] for r in mb] == list(range(1, STEPS + 1)), [r["step"] for r in mb]
    for ra, rb in zip(ma, mb):
        assert _comparable(ra) == _comparable(rb), f"step {ra['step']} differs"
    assert any(r["reward/mean"] > 0 for r in ma) and any(r["loss/total"] != 0 for r in ma), "degenerate run"
    assert _rows(a / "eval.jsonl") == _rows(b / "eval.jsonl")
    assert [r["step"] for r in _rows(b / "eval.jsonl")] == [0, 4, 8]
    final_a, final_b = a / "checkpoints" / f"step_{STEPS}", b / "checkpoints" / f"step_{STEPS}"
    wa, wb = load_file(final_a / "model.safetensors"), load_file(final_b / "model.safetensors")
    assert wa.keys() == wb.keys() and len(wa) > 5
    for name in wa:
        assert torch.equal(wa[name], wb[name]), f"weights differ: {name}"
    sa, sb = load_trainer_state(final_a), load_trainer_state(final_b)
    for key in ("step", "sampler_position", "nonfinite_streak", "kl_coef", "entropy_coef"):
        assert sa[key] == sb[key], key
    assert torch.equal(sa["generator"], sb["generator"]) and torch.equal(sa["torch_rng"], sb["torch_rng"])
    oa, ob = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert oa.keys() == ob.keys()
    for i in oa:
        for k in oa[i]:
            assert torch.equal(torch.as_tensor(oa[i][k]), torch.as_tensor(ob[i][k])), f"optimizer state {i}.{k}"
    summary_a, summary_b = json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
    for key in ("eval_before", "eval_after", "steps", "model"):
        assert summary_a[key] == summary_b[key], key
    assert summary_b["steps"] == STEPS
    # nothing a killed process left behind survives a completed run
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == sorted(p.name for p in (a / "checkpoints").iterdir())
    assert not [p for p in b.rglob("*") if ".tmp" in p.name]


class Reference:
    """The uninterrupted run every interrupted one must reproduce (started in the background)."""

    def __init__(self, tmp: Path):
        self.run = tmp / "run"
        self.proc = Proc(_fresh_args(_config_file(tmp), self.run), tmp)

    def finished(self) -> Path:
        assert self.proc.wait() == 0, self.proc.text()
        return self.run


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    return Reference(tmp_path_factory.mktemp("reference"))


def _targeted(proc: Proc) -> int:
    rc = proc.wait()
    assert rc == -signal.SIGKILL, f"the kill hook did not fire (rc={rc}):\n{proc.text()[-3000:]}"
    return rc


def _first_step_s(proc: Proc) -> float | None:
    return next((t for t, line in proc.arrived if line.startswith("step ")), None)


def _random_kill(proc: Proc, rng: random.Random, done_steps: int, startup_s: float, during_startup: bool) -> str:
    """SIGKILL at a seeded random moment; returns what was aimed at. ``done_steps``: the step
    the run resumes from; ``startup_s``: how long a resumed run took to log its first step."""
    if during_startup or done_steps >= STEPS - 1:
        delay = rng.uniform(0.2, 0.9) * startup_s  # imports, model building, checkpoint loading
        time.sleep(max(0.0, delay - (time.monotonic() - proc.started)))
        aim = f"{delay:.2f} s after start"
    else:
        step = min(done_steps + rng.randint(1, 2), STEPS - 1)
        delay = rng.uniform(0.0, 0.15)  # logging, evaluation, checkpoint, the next step...
        if proc.wait_for_line(f"step {step}/{STEPS}"):
            time.sleep(delay)
        aim = f"{delay * 1000:.0f} ms after step {step} was logged"
    proc.kill()
    return aim


def _kill_and_resume(tmp_path: Path, reference: Reference, n_random: int, record, label: str) -> None:
    t0 = time.monotonic()
    rng = random.Random(SEED + n_random)
    run = tmp_path / "run"
    kills: list[str] = []

    # 1. mid-generation of step 2 (step 1 is checkpointed)
    proc = Proc(_fresh_args(_config_file(tmp_path), run), tmp_path, kill_at="generation:2")
    _targeted(proc)
    state = _check_invariants(run)
    assert state["checkpoint"] == 1 and state["metrics_rows"] == 1, state
    kills.append(f"targeted generation:2 -> resumable from step {state['checkpoint']}")

    # 2. right after step 4's optimizer step (weights changed in memory, nothing written)
    proc = _resume(run, tmp_path, kill_at="optimizer_step:4")
    _targeted(proc)
    startup_s = _first_step_s(proc)  # how long a resume takes to reach training, for random kills
    state = _check_invariants(run)
    assert state["checkpoint"] == 3 and state["metrics_rows"] == 3, state
    kills.append(f"targeted optimizer_step:4 -> resumable from step {state['checkpoint']}")

    # 3. while step 4's checkpoint is written: its files are there, COMPLETE is not; step 4's
    #    metrics row and the step-4 evaluation were already appended and must be redone.
    proc = _resume(run, tmp_path, kill_at="checkpoint_write:4")
    _targeted(proc)
    startup_s = min(startup_s, _first_step_s(proc))
    state = _check_invariants(run)
    assert state["checkpoint"] == 3, state
    assert len(state["incomplete"]) == 1 and state["incomplete"][0].startswith("step_4.tmp-"), state
    partial = run / "checkpoints" / state["incomplete"][0]
    assert (partial / "model.safetensors").exists() and not (partial / "COMPLETE").exists()
    assert latest_checkpoint(run).name == "step_3"  # the partial checkpoint is never picked
    assert [r["step"] for r in _rows(run / "eval.jsonl")] == [0, 4] and state["metrics_rows"] == 4
    kills.append(f"targeted checkpoint_write:4 -> resumable from step {state['checkpoint']}, "
                 f"left {state['incomplete'][0]} without COMPLETE")

    # 4. random kills, each followed by a resume
    completed = False
    for i in range(n_random):
        proc = _resume(run, tmp_path)
        during_startup = i % 2 == 1 and rng.random() < 0.5  # the first one always lands in training
        aim = _random_kill(proc, rng, state["checkpoint"] or 0, startup_s, during_startup)
        rc = proc.wait()
        if partial is not None and (rc == 0 or _first_step_s(proc) is not None):
            assert not partial.exists(), "the partial checkpoint survived a resume that reached training"
            partial = None
        if rc == 0:  # it finished before the kill landed
            completed = True
            kills.append(f"random ({aim}): missed, the run had finished")
            break
        assert rc == -signal.SIGKILL, proc.text()[-3000:]
        state = _check_invariants(run)
        kills.append(f"random ({aim}) -> resumable from step {state['checkpoint']}")

    # 5. while the final checkpoint is written (step 8 and the final evaluation are redone)
    if not completed and state["checkpoint"] < STEPS:
        _targeted(_resume(run, tmp_path, kill_at=f"checkpoint_write:{STEPS}"))
        state = _check_invariants(run)
        assert state["checkpoint"] == STEPS - 1 and state["incomplete"], state
        assert not (run / "summary.json").exists()
        kills.append(f"targeted checkpoint_write:{STEPS} -> resumable from step {state['checkpoint']}")

    # 6. resume to the end
    if not completed:
        proc = _resume(run, tmp_path)
        assert proc.wait() == 0, proc.text()[-3000:]
    _check_invariants(run)
    _compare_runs(reference.finished(), run)

    landed = [k for k in kills if "missed" not in k]
    elapsed = time.monotonic() - t0
    record("crash recovery", f"{label}: {len(landed)} kill-and-resume cycles, run identical to the "
                             f"uninterrupted one ({elapsed:.0f} s)")
    for k in kills:
        record("crash recovery", f"  {k}")
    assert len(landed) >= 3 + n_random  # a random kill may miss a run that just finished


def test_kill_and_resume_many_times_gives_the_uninterrupted_run(tmp_path, reference, record):
    """4 targeted + 2 random SIGKILLs: 6 kill-and-resume cycles (about a minute)."""
    _kill_and_resume(tmp_path, reference, n_random=2, record=record, label="default")


@pytest.mark.slow
def test_kill_and_resume_soak(tmp_path, reference, record):
    """4 targeted + 8 random SIGKILLs (``-m slow``)."""
    _kill_and_resume(tmp_path, reference, n_random=8, record=record, label="soak")
