"""Run untrusted Python in a confined child process.

``run_python(code)`` runs ``code`` with the current interpreter in isolated mode
(``python -I -S``: standard library only, no site-packages, no ``PYTHON*`` variables) and
returns a ``SandboxResult``. What confines it depends on what the machine allows; it is
probed once (``detect_capabilities``) and written to ``SANDBOX_CAPABILITIES``, whose
``not_enforced`` list names every protection that could not be had here.

Layers, strongest first:

* namespaces, via util-linux ``unshare`` (net, pid, mount, ipc, uts): a new network namespace (only a loopback that is
  down: no connection to anything, the host's loopback included), a new PID namespace with
  its own ``/proc`` (the program cannot see, signal or read ``/proc/<pid>/environ`` of any
  host process; when the launcher, its PID 1, dies, every process in it dies), and a new
  mount namespace in which every mount is read-only except a private, size-capped tmpfs on
  ``/tmp`` (the working directory) and ``/dev/shm``, and ``/root``, ``/home`` are hidden;
* an unprivileged user (uid/gid 65534, no groups, no_new_privs) when running as root;
* cgroups v1, one per run: ``pids.max`` (fork bombs; RLIMIT_NPROC does not bind root) and
  ``memory.limit_in_bytes`` (all processes of the run together), removed after the run;
* rlimits: CPU seconds, address space, file size, open files, no core dumps;
* a fresh session, killed as a whole (SIGKILL) at the wall-clock timeout, with the cgroup
  swept as well;
* an empty environment (PATH, LANG, HOME, TMPDIR only) and stdout/stderr read through
  bounded buffers: past ``max_output_bytes`` the run is killed (``killed_reason="output_limit"``).

Infrastructure failures (the launcher could not set up) raise ``SandboxError``; everything the
program does, including crashing or being killed, is a result.

Not enforced even in the strongest mode: the program can *read* world-readable host files
outside the hidden directories; it can use several cores until the wall-clock timeout (no CPU
cgroup; RLIMIT_CPU is per process); there is no seccomp filter, so the kernel's whole syscall
surface is reachable by the unprivileged user; disk I/O bandwidth is not limited.

A run's host traces (its temporary directory under ``/tmp`` and its cgroups) are named
``posttrain-sandbox-<owner pid>-...``; ``leftovers()`` lists what the runs of one process hold on
the machine, never counting other processes' runs.

This module runs programs and decides the mode; what the host offers (cgroups, ``unshare``,
exposed paths, the probe program and its interpretation) lives in ``sandbox_host``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

# host inspection lives in sandbox_host; its constants stay importable from here as before
from posttrain.rewards.sandbox_host import (  # noqa: F401 - CGROUP_PREFIX, CGROUP_ROOT, STALE_CGROUP_AGE_S re-exported
    CGROUP_PREFIX,
    CGROUP_ROOT,
    HIDDEN_PATHS,
    NOBODY,
    STALE_CGROUP_AGE_S,
    _MINIMAL_ENV,
    _candidate_plans,
    _capabilities,
    _cgroup_kill_all,
    _cgroup_remove,
    _expose_paths,
    _oom_killed,
    _Plan,
    _probe_program,
    _python,
    _rlimits,
    _unshare_cmd,
    leftovers,
    run_prefix,
)

__all__ = [
    "SANDBOX_CAPABILITIES",
    "SandboxError",
    "SandboxResult",
    "detect_capabilities",
    "leftovers",
    "run_many",
    "run_python",
]

logger = logging.getLogger(__name__)

LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_launcher.py")

#: What this machine lets the sandbox enforce; filled by ``detect_capabilities()`` (called by
#: the first ``run_python``). ``not_enforced`` lists the protections that are missing.
SANDBOX_CAPABILITIES: dict[str, Any] = {}

_detect_lock = threading.Lock()
_run_counter = itertools.count()


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program it ran)."""


@dataclass
class SandboxResult:
    ok: bool  # exit code 0, not timed out, not killed
    timed_out: bool
    exit_code: Optional[int]  # negative: killed by that signal; None: never reported
    stdout: str
    stderr: str
    wall_s: float
    killed_reason: Optional[str]  # timeout | output_limit | cpu_time | memory | file_size | signal
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    mode: str = ""  # root_ns | user_ns | none
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- running


def _execute(
    plan: _Plan,
    code: str,
    timeout_s: float,
    memory_mb: int,
    stdin: str,
    max_output_bytes: int,
    pids_max: int,
    tmpfs_mb: int,
    max_file_mb: int,
    nofile: int,
) -> SandboxResult:
    namespaced = plan.mode != "none"
    uid = NOBODY if plan.drop_uid else None
    # named after the owner, as the cgroups are: a machine's /tmp is shared with other users of
    # the sandbox, and the owner's pid is how a run's leftovers are told apart (``leftovers``)
    host_dir = tempfile.mkdtemp(prefix=run_prefix())
    cgroups: dict[str, str] = {}
    notes: list[str] = []
    status_fds: list[int] = []
    proc = None
    try:
        run_name = f"{run_prefix()}{next(_run_counter)}-{secrets.token_hex(3)}"
        if plan.pids_base:
            cgroups["pids"] = os.path.join(plan.pids_base, run_name)
            os.mkdir(cgroups["pids"])
            with open(os.path.join(cgroups["pids"], "pids.max"), "w") as f:
                f.write(str(pids_max))
        if plan.memory_base:
            cgroups["memory"] = os.path.join(plan.memory_base, run_name)
            os.mkdir(cgroups["memory"])
            limit = (memory_mb + tmpfs_mb + 64) << 20  # program + tmpfs + launcher
            with open(os.path.join(cgroups["memory"], "memory.limit_in_bytes"), "w") as f:
                f.write(str(limit))
            memsw = os.path.join(cgroups["memory"], "memory.memsw.limit_in_bytes")
            if os.path.exists(memsw):
                try:
                    with open(memsw, "w") as f:
                        f.write(str(limit))
                except OSError:
                    pass

        program_path = os.path.join(host_dir, "main.py")
        with open(program_path, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(code)
        stdin_path = os.path.join(host_dir, "stdin")
        with open(stdin_path, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(stdin)
        if uid is not None and not namespaced:
            os.chown(host_dir, uid, uid)
            os.chown(program_path, uid, uid)
        workdir = "/tmp/work" if namespaced else host_dir
        env = dict(_MINIMAL_ENV, HOME=workdir, TMPDIR=workdir if not namespaced else "/tmp")
        nproc = pids_max if (uid is not None and "pids" not in cgroups) else None
        cfg = {
            "program_path": program_path,
            "stdin_path": stdin_path,
            "status_fd": None,  # set below
            "workdir": host_dir,
            "isolate_mounts": namespaced,
            "pid_namespace": namespaced,
            "tmpfs_mb": tmpfs_mb,
            "shm_mb": min(64, tmpfs_mb),
            "hide": list(HIDDEN_PATHS),
            "expose": _expose_paths(),
            "cgroup_procs": [os.path.join(p, "cgroup.procs") for p in cgroups.values()],
            "uid": uid,
            "gid": uid,
            "rlimits": _rlimits(timeout_s, memory_mb, max_file_mb, nofile, nproc),
            "no_new_privs": True,
            "python": _python(),
            "env": env,
        }
        status_r, status_w = os.pipe()
        status_fds += [status_r, status_w]
        cfg["status_fd"] = status_w
        cfg_path = os.path.join(host_dir, "config.json")
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        cmd = [_python(), "-I", "-S", LAUNCHER, cfg_path]
        if namespaced:
            cmd = _unshare_cmd(plan.mode) + cmd

        start = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(_MINIMAL_ENV),
            cwd=host_dir,
            start_new_session=True,
            close_fds=True,
            pass_fds=(status_w,),
        )
        os.close(status_w)
        status_fds.remove(status_w)
        status_buf = bytearray()
        out, err, reason, wall = _collect(
            proc, status_r, status_buf, start, timeout_s, max_output_bytes, lambda: _kill(proc, cgroups, status_buf, namespaced)
        )
        status = _parse_status(status_buf)
        if status.get("stage") == "setup_error":
            raise SandboxError(f"sandbox setup failed: {status.get('error')}; launcher stderr: {err[1][-500:].decode(errors='replace')}")
        if status.get("ro_failed"):
            notes.append("not read-only: " + "; ".join(status["ro_failed"]))
        exit_code = status.get("exit_code")
        if status.get("stage") != "done" and reason is None:
            raise SandboxError(
                f"sandbox launcher died (rc={proc.returncode}, stage={status.get('stage')}): "
                + err[1][-500:].decode(errors="replace")
            )
        if reason is None and exit_code is not None and exit_code < 0:
            sig = -exit_code
            if sig == signal.SIGXCPU:
                reason = "cpu_time"
            elif sig == signal.SIGXFSZ:
                reason = "file_size"
            elif sig == signal.SIGKILL and _oom_killed(cgroups.get("memory")):
                reason = "memory"
            else:
                reason = "signal"
        if reason is None and _oom_killed(cgroups.get("memory")):
            notes.append("the memory cgroup OOM-killed a process of this run")
        return SandboxResult(
            ok=(reason is None and exit_code == 0),
            timed_out=(reason == "timeout"),
            exit_code=exit_code,
            stdout=out[1].decode("utf-8", errors="replace"),
            stderr=err[1].decode("utf-8", errors="replace"),
            wall_s=wall,
            killed_reason=reason,
            stdout_truncated=out[0],
            stderr_truncated=err[0],
            mode=plan.mode,
            notes=notes,
        )
    finally:
        if proc is not None and proc.poll() is None:
            _kill(proc, cgroups, bytearray(), namespaced)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                logger.warning("sandbox: launcher %d did not exit after SIGKILL", proc.pid)
        for fd in status_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        for path in cgroups.values():
            _cgroup_remove(path)
        shutil.rmtree(host_dir, ignore_errors=True)


def _parse_status(buf: bytes) -> dict:
    """The launcher writes its whole status as one JSON line per update; the last full one wins."""
    for line in reversed(bytes(buf).split(b"\n")):
        if line.strip():
            try:
                return json.loads(line)
            except ValueError:
                continue
    return {}


def _kill(proc: subprocess.Popen, cgroups: dict[str, str], status_buf: bytes, namespaced: bool) -> None:
    """SIGKILL the launcher's process group (unshare + launcher: PID namespace init, whose
    death kills the namespace), the program's own session when there is no PID namespace,
    and every process left in the run's cgroups."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    child = _parse_status(status_buf).get("child_pid")  # a host pid only without a PID namespace
    if child and not namespaced:
        try:
            os.killpg(int(child), signal.SIGKILL)
        except OSError:
            pass
    for path in cgroups.values():
        _cgroup_kill_all(path)


def _collect(proc, status_fd, status_buf, start, timeout_s, cap, kill):
    """Read stdout/stderr within ``cap`` bytes each (and the launcher's status pipe into
    ``status_buf``) until EOF or the deadline.

    Returns ((truncated, bytes) for stdout, same for stderr, killed_reason, wall seconds)."""
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    truncated = {fd: False for fd in bufs}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        sel.register(fd, selectors.EVENT_READ)
    sel.register(status_fd, selectors.EVENT_READ)
    deadline = start + timeout_s
    reason = None
    end = None
    exited_at = None
    try:
        while sel.get_map():
            now = time.monotonic()
            if reason is None and now >= deadline:
                reason = "timeout"
                end = now
                kill()
                deadline = now + 2.0  # drain what is left, briefly
            elif reason is not None and now >= deadline:
                break
            if exited_at is None and proc.poll() is not None:
                exited_at = now
                end = end or now
            if exited_at is not None and now - exited_at > 0.5:
                kill()  # something outside a PID namespace still holds the pipes
                break
            for key, _ in sel.select(timeout=min(0.1, max(0.0, deadline - now))):
                fd = key.fd
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(fd)
                    continue
                if fd == status_fd:
                    if len(status_buf) < (1 << 20):
                        status_buf += data
                    continue
                room = cap - len(bufs[fd])
                if room > 0:
                    bufs[fd] += data[:room]
                if len(data) > room:
                    truncated[fd] = True
                    if reason is None:
                        reason = "output_limit"
                        end = time.monotonic()
                        kill()
                        deadline = end + 2.0
    finally:
        sel.close()
        for stream in (proc.stdout, proc.stderr):
            try:
                stream.close()
            except OSError:
                pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        kill()
        proc.wait(timeout=5)
    wall = (end or time.monotonic()) - start
    fds = list(bufs)
    return (truncated[fds[0]], bytes(bufs[fds[0]])), (truncated[fds[1]], bytes(bufs[fds[1]])), reason, wall


# ---------------------------------------------------------------------------- detection


def _probe(plan: _Plan) -> tuple[Optional[dict], str]:
    code = _probe_program()
    try:
        res = _execute(plan, code, 10.0, 256, "", 65536, 16, 8, 1, 64)
    except (SandboxError, OSError, subprocess.SubprocessError) as e:
        return None, repr(e)[:300]
    if not res.ok:
        return None, f"exit {res.exit_code} ({res.killed_reason}): {res.stderr[-300:]}"
    try:
        return json.loads(res.stdout.strip().splitlines()[-1]), ""
    except (ValueError, IndexError):
        return None, f"unreadable probe output: {res.stdout[-200:]!r}"


def detect_capabilities(force: bool = False) -> dict[str, Any]:
    """Probe once what confinement works here; fills and returns ``SANDBOX_CAPABILITIES``."""
    with _detect_lock:
        if SANDBOX_CAPABILITIES.get("detected") and not force:
            return SANDBOX_CAPABILITIES
        failures: list[str] = []
        chosen, report = None, None
        for plan in _candidate_plans():
            report, why = _probe(plan)
            if report is not None:
                chosen = plan
                break
            failures.append(f"{plan.mode}{'+uid' if plan.drop_uid else ''}: {why}")
        if chosen is None:
            raise SandboxError("no sandbox mode works on this machine: " + " | ".join(failures))
        caps = _capabilities(chosen, report, failures)
        missing = caps["not_enforced"]
        SANDBOX_CAPABILITIES.clear()
        SANDBOX_CAPABILITIES.update(caps)
        SANDBOX_CAPABILITIES["_plan"] = chosen
        if missing:
            logger.warning("sandbox cannot enforce: %s", "; ".join(missing))
        return SANDBOX_CAPABILITIES


# ---------------------------------------------------------------------------- public API


def run_python(
    code: str,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    *,
    stdin: str = "",
    max_output_bytes: int = 65536,
    pids_max: int = 64,
    tmpfs_mb: int = 64,
    max_file_mb: int = 16,
    max_open_files: int = 128,
) -> SandboxResult:
    """Run ``code`` as ``main.py`` in a confined ``python -I -S`` (see the module docstring).

    ``timeout_s`` is wall-clock (RLIMIT_CPU is set one second above it as a backstop);
    ``memory_mb`` bounds each process's address space and, with a memory cgroup, all of the
    run's processes together (plus ``tmpfs_mb`` for files in ``/tmp``).
    """
    if timeout_s <= 0 or memory_mb <= 0 or max_output_bytes <= 0 or pids_max <= 0:
        raise ValueError("timeout_s, memory_mb, max_output_bytes and pids_max must be > 0")
    plan = detect_capabilities()["_plan"]
    return _execute(plan, code, timeout_s, memory_mb, stdin, max_output_bytes, pids_max, tmpfs_mb, max_file_mb, max_open_files)


def run_many(programs: Sequence[str], max_workers: int = 1, **kwargs) -> list[SandboxResult]:
    """``run_python`` over several programs, ``max_workers`` at a time; results in order."""
    detect_capabilities()
    if max_workers <= 1 or len(programs) <= 1:
        return [run_python(p, **kwargs) for p in programs]
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        return list(pool.map(lambda p: run_python(p, **kwargs), programs))
