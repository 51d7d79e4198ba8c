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
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

__all__ = [
    "SANDBOX_CAPABILITIES",
    "SandboxError",
    "SandboxResult",
    "detect_capabilities",
    "run_many",
    "run_python",
]

logger = logging.getLogger(__name__)

LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_launcher.py")
NOBODY = 65534
HIDDEN_PATHS = ("/root", "/home")
CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP_PREFIX = "posttrain-sandbox-"
_MINIMAL_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}

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


# ---------------------------------------------------------------------------- cgroups


def _own_cgroup(controller: str) -> Optional[str]:
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if controller in controllers.split(","):
                    return path
    except OSError:
        return None
    return None


def _cgroup_base(controller: str) -> Optional[str]:
    """Directory under which this process may create per-run cgroups, or None."""
    mount_dir = os.path.join(CGROUP_ROOT, controller)
    own = _own_cgroup(controller)
    if own is None or not os.path.isdir(mount_dir):
        return None
    base = os.path.join(mount_dir, own.lstrip("/"))
    probe = os.path.join(base, f"{CGROUP_PREFIX}probe-{os.getpid()}-{secrets.token_hex(3)}")
    try:
        os.mkdir(probe)
    except OSError:
        return None
    try:
        limit_file = {"pids": "pids.max", "memory": "memory.limit_in_bytes"}[controller]
        with open(os.path.join(probe, limit_file), "w") as f:
            f.write("64" if controller == "pids" else str(256 << 20))
    except OSError:
        return None
    finally:
        try:
            os.rmdir(probe)
        except OSError:
            pass
    return base


def _cgroup_pids(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []


def _cgroup_kill_all(path: str, rounds: int = 200) -> bool:
    """SIGKILL every process in the cgroup until it is empty."""
    for _ in range(rounds):
        pids = _cgroup_pids(path)
        if not pids:
            return True
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.005)
    return not _cgroup_pids(path)


def _cgroup_remove(path: str) -> None:
    for _ in range(200):
        _cgroup_kill_all(path, rounds=5)
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)
    logger.warning("sandbox: could not remove cgroup %s", path)


STALE_CGROUP_AGE_S = 3600.0


def _remove_stale_cgroups(base: str) -> None:
    """Remove empty per-run cgroups that an owner which died left behind.

    Conservative on purpose, since the hierarchy may be shared with other PID namespaces
    (another container running this code): a cgroup is removed only if its owner pid is not
    alive here, it is older than ``STALE_CGROUP_AGE_S`` and it holds no process. Nothing is
    killed.
    """
    try:
        names = os.listdir(base)
    except OSError:
        return
    now = time.time()
    for name in names:
        if not name.startswith(CGROUP_PREFIX):
            continue
        parts = name[len(CGROUP_PREFIX) :].split("-")
        if parts and parts[0] == "probe":
            parts = parts[1:]
        try:
            owner = int(parts[0])
        except (IndexError, ValueError):
            continue
        try:
            os.kill(owner, 0)
            continue  # owner alive
        except ProcessLookupError:
            pass
        except OSError:
            continue
        path = os.path.join(base, name)
        try:
            if now - os.stat(path).st_mtime < STALE_CGROUP_AGE_S or _cgroup_pids(path):
                continue
            os.rmdir(path)
        except OSError:
            continue


# ---------------------------------------------------------------------------- launching


def _python() -> str:
    return os.path.realpath(sys.executable)


def _expose_paths() -> list[str]:
    paths = [os.path.realpath(sys.base_prefix)]
    exe_dir = os.path.dirname(_python())
    if not any(exe_dir == p or exe_dir.startswith(p.rstrip("/") + "/") for p in paths):
        paths.append(exe_dir)
    return paths


def _unshare_cmd(mode: str) -> list[str]:
    unshare = shutil.which("unshare", path=_MINIMAL_ENV["PATH"] + ":/usr/sbin:/sbin")
    base = [unshare or "unshare"]
    if mode == "user_ns":
        base += ["--user", "--map-root-user"]
    return base + ["--net", "--pid", "--ipc", "--uts", "--fork", "--mount-proc", "--mount", "--kill-child", "--"]


def _rlimits(timeout_s: float, memory_mb: int, max_file_mb: int, nofile: int, nproc: Optional[int]) -> dict:
    cpu = int(math.ceil(timeout_s)) + 1
    limits = {
        "RLIMIT_CPU": (cpu, cpu + 1),
        "RLIMIT_AS": (memory_mb << 20, memory_mb << 20),
        "RLIMIT_FSIZE": (max_file_mb << 20, max_file_mb << 20),
        "RLIMIT_NOFILE": (nofile, nofile),
        "RLIMIT_CORE": (0, 0),
    }
    if nproc is not None:
        limits["RLIMIT_NPROC"] = (nproc, nproc)
    return limits


@dataclass
class _Plan:
    mode: str  # root_ns | user_ns | none
    drop_uid: bool
    pids_base: Optional[str]
    memory_base: Optional[str]


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
    host_dir = tempfile.mkdtemp(prefix="posttrain-sandbox-")
    cgroups: dict[str, str] = {}
    notes: list[str] = []
    status_fds: list[int] = []
    proc = None
    try:
        run_name = f"{CGROUP_PREFIX}{os.getpid()}-{next(_run_counter)}-{secrets.token_hex(3)}"
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


def _oom_killed(memory_cgroup: Optional[str]) -> bool:
    if not memory_cgroup:
        return False
    try:
        with open(os.path.join(memory_cgroup, "memory.oom_control")) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
    except (OSError, ValueError):
        return False
    return False


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

_PROBE = r"""
import json, os, socket, errno
r = {"uid": os.getuid(), "pid": os.getpid()}
# read-only mounts, not merely permissions: an unprivileged uid cannot write "/" anyway
r["root_writable"] = not (os.statvfs("/").f_flag & os.ST_RDONLY)
r["pkg_writable"] = os.access(PKG, os.W_OK)
def _hidden(p):
    # hidden: gone, unreadable, or holding nothing but the path down to the exposed Python
    try:
        names = os.listdir(p)
    except OSError:
        return True
    return all(any(e.startswith(os.path.join(p, n) + "/") or e == os.path.join(p, n) for e in EXPOSE) for n in names)
r["hidden"] = {p: _hidden(p) for p in HIDDEN}
s = socket.socket()
s.settimeout(1.0)
try:
    s.connect(("127.0.0.1", 9))
    r["net"] = "connected"
except OSError as e:
    r["net"] = errno.errorcode.get(e.errno, str(e.errno))
finally:
    s.close()
try:  # the process that asked for the sandbox, by its host pid
    open("/proc/%d/environ" % CALLER, "rb").read()
    r["parent_environ"] = "readable"
except OSError as e:
    r["parent_environ"] = type(e).__name__
print(json.dumps(r))
"""


def _probe(plan: _Plan) -> tuple[Optional[dict], str]:
    code = _PROBE.replace("PKG", repr(os.path.dirname(os.path.abspath(__file__)))).replace("HIDDEN", repr(list(HIDDEN_PATHS))).replace(
        "EXPOSE", repr(_expose_paths())
    ).replace("CALLER", str(os.getpid()))
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
        is_root = os.geteuid() == 0
        pids_base = _cgroup_base("pids")
        memory_base = _cgroup_base("memory")
        for base in (pids_base, memory_base):
            if base:
                _remove_stale_cgroups(base)
        has_unshare = shutil.which("unshare", path=_MINIMAL_ENV["PATH"] + ":/usr/sbin:/sbin") is not None
        candidates = []
        if has_unshare and is_root:
            candidates += [_Plan("root_ns", True, pids_base, memory_base), _Plan("root_ns", False, pids_base, memory_base)]
        if has_unshare:
            candidates.append(_Plan("user_ns", False, pids_base, memory_base))
        if is_root:
            candidates.append(_Plan("none", True, pids_base, memory_base))
        candidates.append(_Plan("none", False, pids_base, memory_base))
        failures: list[str] = []
        chosen, report = None, None
        for plan in candidates:
            report, why = _probe(plan)
            if report is not None:
                chosen = plan
                break
            failures.append(f"{plan.mode}{'+uid' if plan.drop_uid else ''}: {why}")
        if chosen is None:
            raise SandboxError("no sandbox mode works on this machine: " + " | ".join(failures))
        caps: dict[str, Any] = {
            "detected": True,
            "mode": chosen.mode,
            "python": _python(),
            "uid": report["uid"],
            "uid_dropped": report["uid"] != 0 and chosen.drop_uid,
            "net_namespace": report["net"] in ("ENETUNREACH", "EADDRNOTAVAIL"),
            "pid_namespace": chosen.mode != "none" and report["pid"] <= 3,
            "mount_namespace": chosen.mode != "none",
            "readonly_root": not report["root_writable"],
            "readonly_package_dir": not report["pkg_writable"],
            "hidden_paths": [p for p, hidden in report["hidden"].items() if hidden],
            "parent_environ": report["parent_environ"],
            "pids_cgroup": chosen.pids_base,
            "memory_cgroup": chosen.memory_base,
            "rlimits": ["RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_FSIZE", "RLIMIT_NOFILE", "RLIMIT_CORE"],
            "probe_failures": failures,
        }
        missing = []
        if not caps["net_namespace"]:
            missing.append(f"network isolation (probe connect gave {report['net']})")
        if not caps["pid_namespace"]:
            missing.append("PID namespace (program can see host processes; orphans are killed by reaper scan)")
        if not caps["readonly_root"] or not caps["readonly_package_dir"]:
            missing.append("read-only filesystem outside the working directory")
        if not caps["uid_dropped"]:
            missing.append("unprivileged uid (program keeps the caller's uid)")
        if report["parent_environ"] == "readable":
            missing.append("hiding the calling process's /proc/<pid>/environ")
        if not chosen.pids_base:
            missing.append("pids cgroup (fork bombs limited only by RLIMIT_NPROC, which does not bind root)")
        if not chosen.memory_base:
            missing.append("memory cgroup (memory limited per process by RLIMIT_AS only)")
        caps["not_enforced"] = missing
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
