"""Sandbox launcher: sets up confinement, then runs the untrusted program as its child.

Run by ``posttrain.rewards.sandbox`` as ``python -I -S _sandbox_launcher.py CONFIG.json``,
normally as PID 1 of fresh PID, mount and network namespaces (``unshare``). Standard library
only; it must not import ``posttrain``.

Steps (each one only when the config asks for it):

1. join the per-run cgroups (pids, memory) before anything else forks;
2. read the program and open stdin from the host temporary directory (the status goes up a
   pipe inherited as ``status_fd``);
3. mount namespace: a private tmpfs on ``/tmp`` (the working directory lives in it) and on
   ``/dev/shm``; empty tmpfs over the hidden directories (``/root``, ``/home``), with the
   Python installation bound back at its own path if it lived there; then every other mount
   is remounted read-only and nosuid;
4. fork; the child starts a new session, applies the rlimits, drops to the unprivileged
   uid/gid with no supplementary groups, sets no_new_privs and execs ``python -I -S main.py``
   with a minimal environment;
5. wait for that child (reaping orphans meanwhile, as an init must) and write its exit status
   to the status file. When the launcher exits as PID 1, the kernel kills whatever the
   program left running in the namespace.
"""

import json
import os
import sys

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_MOVE = 8192
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36

_OPT_FLAGS = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": MS_NOATIME,
    "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
    "strictatime": MS_STRICTATIME,
}

_libc = None


def libc():
    global _libc
    if _libc is None:
        import ctypes

        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return _libc


def _b(s):
    return None if s is None else s.encode()


def mount(source, target, fstype, flags, data=None):
    import ctypes

    if libc().mount(_b(source), _b(target), _b(fstype), flags, _b(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "mount %s on %s: %s" % (source or fstype, target, os.strerror(err)))


def prctl(option, arg):
    import ctypes

    if libc().prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "prctl(%d): %s" % (option, os.strerror(err)))


def _unescape(path):
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(path):
        if path[i] == "\\" and i + 4 <= len(path) and path[i + 1 : i + 4].isdigit():
            out.append(chr(int(path[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(path[i])
            i += 1
    return "".join(out)


def mountinfo():
    """(mount point, per-mount option flags) of every mount, top-most last, each point once."""
    seen = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = _unescape(fields[4])
            flags = 0
            for opt in fields[5].split(","):
                flags |= _OPT_FLAGS.get(opt, 0)
            seen[point] = flags
    return list(seen.items())


def _under(path, root):
    root = root.rstrip("/") or "/"
    return path == root or path.startswith(root + "/")


def setup_mounts(cfg, program, uid, gid):
    """Returns (working directory, list of mounts that could not be made read-only)."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "size=%dm,mode=1777" % cfg["tmpfs_mb"])
    hidden = [h for h in cfg["hide"] if os.path.isdir(h) and not os.path.islink(h)]
    staged = []
    os.mkdir("/tmp/.stage", 0o700)
    for i, path in enumerate(cfg["expose"]):
        if any(_under(path, h) for h in hidden) and os.path.isdir(path):
            stage = "/tmp/.stage/%d" % i
            os.mkdir(stage)
            mount(path, stage, None, MS_BIND | MS_REC)
            staged.append((stage, path))
    for h in hidden:
        mount("tmpfs", h, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for stage, path in staged:
        os.makedirs(path, mode=0o755, exist_ok=True)
        mount(stage, path, None, MS_MOVE)
        os.rmdir(stage)
    os.rmdir("/tmp/.stage")
    if os.path.isdir("/dev/shm"):
        mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "size=%dm,mode=1777" % cfg["shm_mb"])
    work = "/tmp/work"
    os.mkdir(work, 0o755)
    with open(work + "/main.py", "wb") as f:
        f.write(program)
    if uid is not None:
        os.chown(work, uid, gid)
        os.chown(work + "/main.py", uid, gid)
    failed = []
    writable = {"/tmp", "/dev/shm"}
    for point, flags in mountinfo():
        if point in writable:
            continue
        try:
            mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | flags)
        except OSError as e:
            failed.append("%s: %s" % (point, e.strerror))
    return work, failed


def run_child(cfg, workdir, stdin_fd, uid, gid):
    try:
        os.dup2(stdin_fd, 0)
        os.close(stdin_fd)
        os.setsid()
        os.chdir(workdir)
        import resource

        for name, (soft, hard) in cfg["rlimits"].items():
            resource.setrlimit(getattr(resource, name), (soft, hard))
        if uid is not None:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        if cfg["no_new_privs"]:
            prctl(PR_SET_NO_NEW_PRIVS, 1)
        os.umask(0o077)
        python = cfg["python"]
        os.execve(python, [python, "-I", "-S", "main.py"], cfg["env"])
    except BaseException as e:  # noqa: BLE001
        try:
            os.write(2, ("sandbox launcher: child setup failed: %r\n" % (e,)).encode())
        finally:
            os._exit(125)


def kill_descendants():
    """Without a PID namespace: SIGKILL the orphans that were reparented to us (we are a
    child subreaper), until none is left."""
    me = str(os.getpid())
    for _ in range(50):
        found = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open("/proc/%s/stat" % pid) as f:
                    stat = f.read()
            except OSError:
                continue
            if stat.rsplit(")", 1)[1].split()[1] == me:
                found.append(int(pid))
        if not found:
            return
        for pid in found:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
        for pid in found:
            try:
                os.waitpid(pid, 0)
            except OSError:
                pass


def main():
    os.umask(0o022)
    with open(sys.argv[1]) as f:
        cfg = json.load(f)
    # The status goes up a pipe, not into a file: an open-for-writing file on the root mount
    # would stop it from being remounted read-only (EBUSY).
    status_fd = cfg["status_fd"]
    os.set_inheritable(status_fd, False)
    status = {"stage": "setup"}

    def report(**kw):
        status.update(kw)
        os.write(status_fd, json.dumps(status).encode() + b"\n")

    uid, gid = cfg["uid"], cfg["gid"]
    try:
        for procs in cfg["cgroup_procs"]:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))
        with open(cfg["program_path"], "rb") as f:
            program = f.read()
        stdin_fd = os.open(cfg["stdin_path"], os.O_RDONLY)
        if cfg["isolate_mounts"]:
            workdir, ro_failed = setup_mounts(cfg, program, uid, gid)
        else:
            workdir, ro_failed = cfg["workdir"], []
            if not cfg["pid_namespace"]:
                prctl(PR_SET_CHILD_SUBREAPER, 1)
        report(ro_failed=ro_failed)
    except BaseException as e:  # noqa: BLE001
        report(stage="setup_error", error=repr(e))
        os._exit(126)

    pid = os.fork()
    if pid == 0:
        os.close(status_fd)
        run_child(cfg, workdir, stdin_fd, uid, gid)
    os.close(stdin_fd)
    report(stage="running", child_pid=pid)
    status_code = None
    while True:
        try:
            wpid, st = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        if wpid == pid:
            status_code = st
            break
    exit_code = os.waitstatus_to_exitcode(status_code) if status_code is not None else None
    report(stage="done", exit_code=exit_code)
    if not cfg["pid_namespace"]:
        kill_descendants()
    os._exit(0)


if __name__ == "__main__":
    main()
