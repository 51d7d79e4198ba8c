"""What the sandbox can use on this host: cgroups, namespaces, paths, and the probe of them.

Helpers for ``posttrain.rewards.sandbox`` (which runs the programs and holds
``detect_capabilities``): per-run cgroup v1 directories (creating the base, killing and removing
a run's cgroup, sweeping stale ones, reading OOM kills), the ``unshare`` command line, the
interpreter and installation paths exposed inside the mount namespace, rlimits, the candidate
sandbox modes (``_Plan``) in order of strength, the probe program run in each, and turning the
probe's report into the ``SANDBOX_CAPABILITIES`` entries.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional

# the sandbox's own logger, so that its log configuration keeps covering these messages
logger = logging.getLogger("posttrain.rewards.sandbox")

NOBODY = 65534
HIDDEN_PATHS = ("/root", "/home")
CGROUP_ROOT = "/sys/fs/cgroup"
CGROUP_PREFIX = "posttrain-sandbox-"
_MINIMAL_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
STALE_CGROUP_AGE_S = 3600.0


# ---------------------------------------------------------------------------- ownership


def run_prefix(pid: Optional[int] = None) -> str:
    """Name prefix of every per-run cgroup and host temporary directory of the sandbox runs of
    process ``pid`` (default: this one): ``posttrain-sandbox-<pid>-``.

    The owner's pid in the name is what lets several users of one machine (test runs of other
    people, a trainer scoring code) tell their runs apart, and stale ones of a dead owner be found.
    """
    return f"{CGROUP_PREFIX}{os.getpid() if pid is None else pid}-"


def _process_table() -> dict[int, tuple[int, list[bytes]]]:
    """{pid: (parent pid, argv)} of every process this one may inspect."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{name}/cmdline", "rb") as f:
                table[int(name)] = (ppid, f.read().split(b"\0"))
        except (OSError, ValueError, IndexError):
            continue  # exited while being read
    return table


def _launched_by(pid: int, table: dict[int, tuple[int, list[bytes]]]) -> Optional[int]:
    """The process that asked for the sandbox run ``pid`` belongs to: the first ancestor above
    the launcher that is not ``unshare`` (whose command line names the launcher too); None when
    no launcher is among ``pid`` and its ancestors."""
    launcher_seen = False
    for _ in range(256):
        if pid not in table:
            return None
        ppid, argv = table[pid]
        if launcher_seen and os.path.basename(argv[0]) != b"unshare":
            return pid
        launcher_seen = launcher_seen or any(a.endswith(b"_sandbox_launcher.py") for a in argv)
        pid = ppid
    return None


def leftovers(pid: Optional[int] = None) -> dict[str, Any]:
    """What the sandbox runs of process ``pid`` (default: this one) hold on this machine now:
    ``processes`` ({pid: command line}), ``cgroups`` (paths) and ``temp_dirs`` (paths).

    Between runs all three are empty; during a run they show it. Other processes' runs never
    count. A process counts when it is in one of the owner's per-run cgroups, descends from a
    launcher the owner started, or (no PID namespace, no cgroup: an orphan reparented to the
    host's init) still has its working directory in one of the owner's temporary directories.
    """
    owner = os.getpid() if pid is None else pid
    prefix = run_prefix(owner)
    temp_root = tempfile.gettempdir()
    temp_dirs = sorted(os.path.join(temp_root, n) for n in os.listdir(temp_root) if n.startswith(prefix))
    cgroups = []
    for controller in ("pids", "memory"):
        own = _own_cgroup(controller, owner)  # per-run cgroups live under their owner's
        base = os.path.join(CGROUP_ROOT, controller, (own or "").lstrip("/"))
        if own is not None and os.path.isdir(base):
            cgroups += sorted(os.path.join(base, n) for n in os.listdir(base) if n.startswith(prefix))
    table = _process_table()
    processes = {}
    for p, (_, argv) in table.items():
        if p == owner:
            continue
        try:
            with open(f"/proc/{p}/cgroup") as f:
                mine = f"/{prefix}" in f.read()
            mine = mine or _launched_by(p, table) == owner or os.readlink(f"/proc/{p}/cwd").startswith(
                os.path.join(temp_root, prefix))
        except OSError:
            continue  # exited while being read, or not ours to inspect
        if mine:
            processes[p] = b" ".join(argv).decode(errors="replace").strip()
    return {"processes": processes, "cgroups": cgroups, "temp_dirs": temp_dirs}


# ---------------------------------------------------------------------------- cgroups


def _own_cgroup(controller: str, pid: Optional[int] = None) -> Optional[str]:
    """The cgroup (v1 path) of this process, or of process ``pid``, for ``controller``."""
    try:
        with open(f"/proc/{'self' if pid is None else pid}/cgroup") as f:
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


def _probe_program() -> str:
    """The probe program with this host's paths and the caller's pid filled in."""
    return _PROBE.replace("PKG", repr(os.path.dirname(os.path.abspath(__file__)))).replace("HIDDEN", repr(list(HIDDEN_PATHS))).replace(
        "EXPOSE", repr(_expose_paths())
    ).replace("CALLER", str(os.getpid()))


def _candidate_plans() -> list[_Plan]:
    """Sandbox modes worth probing here, strongest first; sweeps stale per-run cgroups."""
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
    return candidates


def _capabilities(chosen: _Plan, report: dict, failures: list[str]) -> dict[str, Any]:
    """``SANDBOX_CAPABILITIES`` entries (without ``_plan``) from the probe report of ``chosen``."""
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
    return caps
