"""Sandbox containment. Each attack shows three things: it is contained (``run_python``), the
code reward it would earn is 0 (``CodeReward`` with a correct solution around the attack),
and the machine is left as it was (``machine_guard``: no leftover processes, cgroups or
temporary directories; this test process alive and its environment intact).

Checks that need a protection this machine cannot give are skipped, naming what is missing
(see ``SANDBOX_CAPABILITIES``).
"""

import os
import socket
import tempfile
import threading
import time
import uuid

import pytest

from posttrain.rewards import sandbox
from posttrain.rewards.code_reward import CodeReward, extract_code, instrument_asserts
from posttrain.rewards.sandbox import SANDBOX_CAPABILITIES, detect_capabilities, run_python
from posttrain.tasks.base import Problem

CAPS = detect_capabilities()

# A correct solution: any reward below 1 comes from the attack placed before it.
SOLUTION = "def add(a, b):\n    return a + b\n"
PROBLEM = Problem(id="add", prompt="Write add(a, b).", tests="assert add(1, 2) == 3\nassert add(-1, 1) == 0\n")


def requires(*caps):
    missing = [c for c in caps if not CAPS.get(c)]
    return pytest.mark.skipif(bool(missing), reason=f"sandbox cannot enforce {missing} here: {CAPS.get('not_enforced')}")


def code_reward(attack: str, timeout_s: float = 3.0, mode: str = "all", **kw) -> tuple[float, dict]:
    out = CodeReward(mode=mode, timeout_s=timeout_s, **kw)(PROBLEM, [f"```python\n{attack}\n{SOLUTION}```"])
    return out.rewards[0], out.info[0]


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}


def _left() -> dict:
    """This test process's sandbox leftovers (``sandbox.leftovers``: processes in its per-run
    cgroups or below a launcher it started, its cgroups and temporary directories, all named
    after its pid). Sandbox runs of other processes on the machine never count."""
    return sandbox.leftovers()


@pytest.fixture
def machine_guard():
    before, env = _left(), _env()
    yield
    deadline = time.monotonic() + 5
    while True:
        now = _left()
        procs = {p: c for p, c in now["processes"].items() if p not in before["processes"]}
        if not procs or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    assert procs == {}, f"sandboxed processes outlived their run: {procs}"
    assert set(now["cgroups"]) - set(before["cgroups"]) == set(), f"per-run cgroups left behind: {now['cgroups']}"
    assert set(now["temp_dirs"]) - set(before["temp_dirs"]) == set(), f"temporary directories left behind: {now['temp_dirs']}"
    assert _env() == env, {k: (env.get(k), v) for k, v in _env().items() if env.get(k) != v}
    os.kill(os.getpid(), 0)  # still here


def test_run_traces_are_named_after_their_owner(machine_guard):
    """A run's temporary directory and cgroups carry the caller's pid (``run_prefix``), so
    ``leftovers`` shows a run in flight as this process's, and as no other process's: on a
    machine shared with other users of the sandbox, nobody's check counts someone else's run
    (issue 22 item 7)."""
    seen = {}

    def watch():
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(c.endswith("main.py") for c in seen.get("processes", {}).values()):
            seen.update(sandbox.leftovers())
            time.sleep(0.02)
        seen["parent's"] = sandbox.leftovers(os.getppid())

    watcher = threading.Thread(target=watch)
    watcher.start()
    res = run_python("import time\ntime.sleep(1.5)")
    watcher.join()
    assert res.ok, res.stderr
    prefix = f"posttrain-sandbox-{os.getpid()}-"
    assert sandbox.run_prefix() == prefix
    assert [os.path.dirname(d) for d in seen["temp_dirs"]] == [tempfile.gettempdir()]
    assert all(os.path.basename(d).startswith(prefix) for d in seen["temp_dirs"])
    assert any(c.endswith("main.py") for c in seen["processes"].values()), seen
    n_cgroups = sum(bool(CAPS.get(k)) for k in ("pids_cgroup", "memory_cgroup"))
    assert len(seen["cgroups"]) == n_cgroups and all(os.path.basename(c).startswith(prefix) for c in seen["cgroups"])
    assert seen["parent's"] == {"processes": {}, "cgroups": [], "temp_dirs": []}
    assert sandbox.leftovers() == {"processes": {}, "cgroups": [], "temp_dirs": []}


# ---------------------------------------------------------------------------- basics


def test_capabilities_are_reported():
    for key in ("mode", "net_namespace", "pid_namespace", "readonly_root", "uid_dropped", "pids_cgroup", "memory_cgroup", "not_enforced"):
        assert key in SANDBOX_CAPABILITIES
    assert isinstance(SANDBOX_CAPABILITIES["not_enforced"], list)


def test_runs_code_with_stdin_and_minimal_env(machine_guard):
    res = run_python("import os, sys\nprint(sys.stdin.read().upper())\nprint(sorted(os.environ))", stdin="hello")
    assert res.ok and res.exit_code == 0 and not res.timed_out and res.killed_reason is None
    lines = res.stdout.splitlines()
    assert lines[0] == "HELLO"
    assert set(eval(lines[1])) <= {"PATH", "LANG", "HOME", "TMPDIR"}


def test_failing_program_is_a_result_not_an_error(machine_guard):
    res = run_python("raise SystemExit(3)")
    assert not res.ok and res.exit_code == 3 and res.killed_reason is None
    res = run_python("1/0")
    assert res.exit_code == 1 and "ZeroDivisionError" in res.stderr


def test_correct_solution_scores_one_and_harness_catches_early_exit(machine_guard):
    reward, info = code_reward("")
    assert reward == 1.0 and info["error"] is None and info["exit_code"] == 0
    assert code_reward("import sys\nsys.exit(0)")[0] == 0.0
    assert code_reward("import os\nos._exit(0)")[0] == 0.0  # no report -> 0, although exit code 0


def test_code_reward_fraction_mode(machine_guard):
    p = Problem(id="f", prompt="", tests="assert f(1) == 1\nassert f(2) == 4\nfor i in range(3):\n    assert f(i) == i\n")
    out = CodeReward(mode="fraction")(p, ["def f(x):\n    return x", "def f(x):\n    return 1", "syntax error("])
    assert out.rewards == [pytest.approx(2 / 3), pytest.approx(1 / 3), 0.0]
    assert out.info[0]["n_asserts"] == 3 and out.info[0]["n_passed"] == 2
    src, n = instrument_asserts("assert a\nif x:\n    assert b, 'msg'\n")
    assert n == 2 and "assert" not in src


def test_extract_code():
    assert extract_code("text\n```python\nA\n```\nmore\n```python\nB\n```") == "B\n"
    assert extract_code("```python\nA\n```\n```python\nB\n```", block="all") == "A\n\n\nB\n"
    assert extract_code("```\nC\n```") == "C\n"
    assert extract_code("```python\ntruncated") == "truncated"
    assert extract_code("raw = 1") == "raw = 1"


def test_humaneval_style_check_call_is_appended(machine_guard):
    p = Problem(
        id="he",
        prompt="def inc(x):\n",
        tests="def check(candidate):\n    assert candidate(1) == 2\n",
        metadata={"entry_point": "inc"},
    )
    out = CodeReward(include_prompt=True)(p, ["    return x + 1\n", "    return x\n"])
    assert out.rewards == [1.0, 0.0]


# ---------------------------------------------------------------------------- attacks


def test_infinite_loop(machine_guard):
    t0 = time.monotonic()
    res = run_python("while True:\n    pass", timeout_s=1.5)
    assert res.timed_out and res.killed_reason == "timeout" and not res.ok
    assert 1.4 < res.wall_s < 3.5 and time.monotonic() - t0 < 6
    reward, info = code_reward("while True:\n    pass", timeout_s=1.5)
    assert reward == 0.0 and info["killed_reason"] == "timeout"


@requires("pids_cgroup")
def test_fork_bomb(machine_guard):
    bomb = "import os\nwhile True:\n    os.fork()"
    res = run_python(bomb, timeout_s=2)
    assert not res.ok
    reward, _ = code_reward(bomb, timeout_s=2)
    assert reward == 0.0


@requires("pids_cgroup")
def test_fork_in_a_loop_is_capped_by_pids_max(machine_guard):
    code = (
        "import os, time\n"
        "n = 0\n"
        "try:\n"
        "    for i in range(10_000):\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(60)\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "finally:\n"
        "    print('forked', n, flush=True)\n"
    )
    res = run_python(code, timeout_s=5, pids_max=32)
    assert not res.ok and "BlockingIOError" in res.stderr
    forked = int(res.stdout.split()[-1])
    assert forked < 32
    reward, _ = code_reward(code, timeout_s=5)
    assert reward == 0.0


@requires("pid_namespace")
def test_orphaned_daemons_die_with_the_run(machine_guard):
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(120)\n"
        "    os._exit(0)\n"
        "print('parent done')\n"
    )
    t0 = time.monotonic()
    res = run_python(code, timeout_s=5)
    assert res.ok and "parent done" in res.stdout
    assert time.monotonic() - t0 < 3  # did not wait for the daemon
    # machine_guard checks that the sleeping daemon is gone


def test_memory_bomb_single_process(machine_guard):
    res = run_python("x = bytearray(4 << 30)", memory_mb=256)
    assert not res.ok and "MemoryError" in res.stderr
    reward, _ = code_reward("x = b'x' * (4 << 30)", memory_mb=256)
    assert reward == 0.0


@requires("memory_cgroup")
def test_memory_bomb_many_processes(machine_guard):
    # each child stays under RLIMIT_AS, together they exceed the run's memory cgroup
    code = (
        "import os, time\n"
        "kids = []\n"
        "for i in range(6):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        buf = b'x' * (150 << 20)\n"
        "        time.sleep(1)\n"
        "        os._exit(0)\n"
        "    kids.append(pid)\n"
        "bad = 0\n"
        "for pid in kids:\n"
        "    _, st = os.waitpid(pid, 0)\n"
        "    bad += st != 0\n"
        "print('killed children:', bad)\n"
        "assert bad == 0\n"
    )
    res = run_python(code, timeout_s=10, memory_mb=200, tmpfs_mb=16)
    assert not res.ok
    assert "killed children:" in res.stdout and int(res.stdout.split()[-1]) > 0
    reward, _ = code_reward(code, timeout_s=10, memory_mb=200)
    assert reward == 0.0


def test_output_flood(machine_guard):
    res = run_python("while True:\n    print('x' * 10000)", timeout_s=10, max_output_bytes=100_000)
    assert res.killed_reason == "output_limit" and res.stdout_truncated and not res.ok
    assert len(res.stdout) <= 100_000 and res.wall_s < 5
    res = run_python("import sys\nwhile True:\n    sys.stderr.write('e' * 10000)", timeout_s=10, max_output_bytes=50_000)
    assert res.killed_reason == "output_limit" and len(res.stderr) <= 50_000
    reward, info = code_reward("import os\nwhile True:\n    os.write(1, b'y' * 65536)", timeout_s=5)
    assert reward == 0.0 and info["killed_reason"] == "output_limit"


def test_big_file_is_stopped(machine_guard):
    res = run_python("f = open('big', 'wb')\nwhile True:\n    f.write(b'z' * (1 << 20))", timeout_s=5, max_file_mb=4)
    # Python ignores SIGXFSZ, so RLIMIT_FSIZE shows up as EFBIG ("File too large")
    assert not res.ok and (res.killed_reason == "file_size" or "File too large" in res.stderr)
    assert code_reward("f = open('big', 'wb')\nwhile True:\n    f.write(b'z' * (1 << 20))")[0] == 0.0


@requires("mount_namespace", "readonly_package_dir")
def test_writes_outside_the_working_directory(machine_guard):
    name = f"posttrain-sandbox-escape-{uuid.uuid4().hex}"
    pkg_dir = os.path.dirname(sandbox.__file__)
    targets = [f"/tmp/{name}", os.path.join(pkg_dir, name), f"/var/tmp/{name}", f"/dev/shm/{name}", os.path.join(os.getcwd(), name)]
    code = (
        "import os\n"
        f"for path in {targets!r}:\n"
        "    try:\n"
        "        with open(path, 'w') as f:\n"
        "            f.write('pwned')\n"
        "        print('wrote', path)\n"
        "    except OSError as e:\n"
        "        print('blocked', path, e.errno)\n"
        "open('inside.txt', 'w').write('fine')\n"
        "print('cwd ok')\n"
    )
    res = run_python(code)
    assert res.ok and "cwd ok" in res.stdout
    for path in targets:
        assert not os.path.exists(path), f"sandbox wrote {path} on the host"
    # writes under the package dir fail outright; /tmp and /dev/shm are private to the run
    assert f"blocked {targets[1]}" in res.stdout
    reward, _ = code_reward(f"open({targets[1]!r}, 'w').write('pwned')")
    assert reward == 0.0 and not os.path.exists(targets[1])


@requires("pid_namespace")
def test_cannot_read_the_parent_environment(machine_guard, monkeypatch):
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("POSTTRAIN_TEST_SECRET", secret)
    code = (
        "import os\n"
        "print(dict(os.environ))\n"
        f"for pid in (os.getppid(), 1, {os.getpid()}, {os.getppid()}):\n"
        "    try:\n"
        "        print(pid, open(f'/proc/{pid}/environ', 'rb').read())\n"
        "    except OSError as e:\n"
        "        print(pid, type(e).__name__)\n"
        "print(sorted(p for p in os.listdir('/proc') if p.isdigit()))\n"
    )
    res = run_python(code)
    assert res.ok
    assert secret not in res.stdout and secret not in res.stderr
    assert "POSTTRAIN_TEST_SECRET" not in res.stdout
    visible = eval(res.stdout.splitlines()[-1])
    assert len(visible) <= 3  # launcher + program (+ listing) only: host processes are invisible
    reward, info = code_reward("import os\nopen(f'/proc/{os.getppid()}/environ').read()")
    assert reward == 0.0 and secret not in str(info)


@requires("net_namespace")
def test_no_network_even_to_host_loopback(machine_guard):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    listener.settimeout(0.3)
    port = listener.getsockname()[1]
    abstract = f"\0posttrain-test-{uuid.uuid4().hex}"
    unix_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix_listener.bind(abstract)
    unix_listener.listen(1)
    unix_listener.settimeout(0.3)
    try:
        code = (
            "import socket\n"
            "for addr in [('127.0.0.1', %d), ('1.1.1.1', 80)]:\n"
            "    s = socket.socket(); s.settimeout(2)\n"
            "    try:\n"
            "        s.connect(addr); print('CONNECTED', addr)\n"
            "    except OSError as e:\n"
            "        print('refused', addr, e.errno)\n"
            "u = socket.socket(socket.AF_UNIX)\n"
            "try:\n"
            "    u.connect(%r); print('CONNECTED unix')\n"
            "except OSError as e:\n"
            "    print('refused unix', e.errno)\n"
        ) % (port, abstract)
        res = run_python(code)
        assert res.ok and "CONNECTED" not in res.stdout, res.stdout
        reward, _ = code_reward(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)")
        assert reward == 0.0
        for sock in (listener, unix_listener):
            with pytest.raises(socket.timeout):
                sock.accept()
    finally:
        listener.close()
        unix_listener.close()


def test_cannot_kill_the_parent(machine_guard):
    me = os.getpid()
    code = (
        "import os, signal\n"
        f"for pid in (os.getppid(), 1, {me}, {os.getppid()}):\n"
        "    try:\n"
        "        os.kill(pid, signal.SIGKILL); print('sent', pid)\n"
        "    except OSError as e:\n"
        "        print('denied', pid, type(e).__name__)\n"
    )
    res = run_python(code)
    assert res.ok
    if CAPS.get("pid_namespace") and CAPS.get("uid_dropped"):
        assert "sent" not in res.stdout, res.stdout
    reward, _ = code_reward("import os\nos.kill(os.getppid(), 9)")
    assert reward == 0.0
    # killing its own process group / everything it may signal only kills itself
    res = run_python("import os\nos.killpg(os.getpgid(0), 9)")
    assert res.exit_code == -9 and not res.ok
    res = run_python("import os\nos.kill(-1, 9)\nprint('alive')")
    assert not res.ok
    assert code_reward("import os\nos.killpg(os.getpgid(0), 9)")[0] == 0.0
    assert code_reward("import os\nos.kill(-1, 9)")[0] == 0.0


@requires("uid_dropped")
def test_ctypes_cannot_regain_privileges(machine_guard):
    code = (
        "import ctypes, os\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "print('setuid', libc.setuid(0), os.getuid())\n"
        "print('mount', libc.mount(b'none', b'/mnt', b'tmpfs', 0, None))\n"
        "print('unshare', libc.unshare(0x20000000))\n"  # CLONE_NEWUSER... would need privileges inside
        f"print('kill', libc.kill({os.getpid()}, 9))\n"
        "print('getuid', libc.getuid())\n"
    )
    res = run_python(code)
    assert res.ok, res.stderr
    out = dict(line.split(" ", 1) for line in res.stdout.splitlines())
    assert out["setuid"].startswith("-1") and out["mount"] == "-1" and out["kill"] == "-1"
    assert out["getuid"] == str(sandbox.NOBODY)
    res = run_python("import ctypes\nctypes.string_at(0)")  # segfault
    assert res.exit_code == -11 and res.killed_reason == "signal"
    assert code_reward("import ctypes\nctypes.string_at(0)")[0] == 0.0


def test_signal_games_do_not_stop_the_timeout(machine_guard):
    code = (
        "import signal\n"
        "for s in (signal.SIGTERM, signal.SIGALRM, signal.SIGINT, signal.SIGHUP, signal.SIGXCPU):\n"
        "    signal.signal(s, signal.SIG_IGN)\n"
        "signal.alarm(0)\n"
        "while True:\n"
        "    pass\n"
    )
    res = run_python(code, timeout_s=1.5)
    assert res.timed_out and res.wall_s < 3.5
    reward, _ = code_reward(code, timeout_s=1.5)
    assert reward == 0.0


def test_rlimits_cannot_be_raised(machine_guard):
    code = (
        "import resource\n"
        "for name in ('RLIMIT_AS', 'RLIMIT_CPU', 'RLIMIT_NOFILE', 'RLIMIT_FSIZE'):\n"
        "    r = getattr(resource, name)\n"
        "    soft, hard = resource.getrlimit(r)\n"
        "    try:\n"
        "        resource.setrlimit(r, (resource.RLIM_INFINITY, resource.RLIM_INFINITY)); print('raised', name)\n"
        "    except (ValueError, OSError) as e:\n"
        "        print('denied', name)\n"
    )
    res = run_python(code)
    assert res.ok and "raised" not in res.stdout, res.stdout
    reward, _ = code_reward("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))")
    assert reward == 0.0


def test_very_deep_recursion(machine_guard):
    # Python frames live on the heap (3.11): the address-space limit ends it
    code = "import sys\nsys.setrecursionlimit(10**7)\ndef f(n):\n    return f(n + 1) + 1\nf(0)\n"
    res = run_python(code, timeout_s=10, memory_mb=128)
    assert not res.ok and res.exit_code != 0
    assert code_reward(code, timeout_s=10, memory_mb=128)[0] == 0.0
    # recursion through C (repr) overflows the C stack: a segfault, in the child only
    code = "import sys\nsys.setrecursionlimit(10**7)\nclass A:\n    def __repr__(self):\n        return repr(self)\nrepr(A())\n"
    res = run_python(code, timeout_s=10)
    assert res.exit_code == -11 and res.killed_reason == "signal"
    assert code_reward(code, timeout_s=10)[0] == 0.0


def test_huge_integer_arithmetic(machine_guard):
    res = run_python("x = 10**10**8\nprint(len(str(x)))", timeout_s=2)
    assert not res.ok and (res.timed_out or res.killed_reason is not None or "Error" in res.stderr)
    assert res.wall_s < 4
    assert code_reward("x = 10**10**8", timeout_s=2)[0] == 0.0


# ---------------------------------------------------------------------------- weaker modes


def _plans():
    """The fallback modes a machine without root or without namespaces would use."""
    plans = [sandbox._Plan("none", False, CAPS.get("pids_cgroup"), CAPS.get("memory_cgroup"))]
    if CAPS.get("mode") in ("root_ns", "user_ns"):
        plans.append(sandbox._Plan("user_ns", False, None, None))
    return plans


@pytest.mark.parametrize("plan", _plans(), ids=lambda p: p.mode)
def test_fallback_modes_still_time_out_and_clean_up(plan, machine_guard):
    run = lambda code, timeout=5.0: sandbox._execute(plan, code, timeout, 256, "", 65536, 32, 8, 4, 64)  # noqa: E731
    res = run("print('hi')")
    assert res.ok and res.stdout == "hi\n" and res.mode == plan.mode
    res = run("while True:\n    pass", timeout=1.0)
    assert res.timed_out and res.wall_s < 3
    # a daemon that left its session must still be killed when the run ends
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(120)\n"
        "    os._exit(0)\n"
        "print('parent done')\n"
    )
    t0 = time.monotonic()
    res = run(code)
    assert res.ok and time.monotonic() - t0 < 4
    if plan.mode == "none":
        assert os.environ.get("PATH") and "PATH" in run("import os\nprint(dict(os.environ))").stdout
    else:
        assert run("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)").exit_code == 1
