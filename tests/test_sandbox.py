"""
Tests of sandbox.py: one per property, with REAL attacks.

Safety rule for every attack below: it must be harmless even if the defence it tests is broken.
So each attack targets only something this test created (a canary file in tmp_path, a listener
the test opened, a marker process the test spawned), every fork loop is bounded (<= 200), and
every sleeper ends by itself. A broken sandbox makes a test FAIL; it never takes the machine down.
"""
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import pytest

import sandbox


def our_survivors():
    """Processes still running under the uid of our launchers' runs (root mode only)."""
    uids = {launcher.hello["uid"] for launcher in sandbox._idle if launcher.hello["uid"]}
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                uid = int(next(line for line in f if line.startswith("Uid:")).split()[1])
        except (OSError, StopIteration):
            continue
        if uid in uids:
            found.append(int(pid))
    return found


@pytest.fixture
def marker_process():
    """A process of the test's own, to attack; it ends by itself after 30 s."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                            env={"TOCODE_SECRET": "hunter2-marker"})
    yield proc
    proc.kill()
    proc.wait()


def test_ok_and_teacher_output_format():
    result = sandbox.run("print(9315)")
    assert result.status == "ok" and result.stdout == "9315\n" and result.error == ""
    assert sandbox.format_output(result) == "9315"
    long = sandbox.run("print('y' * 2000)")
    text = sandbox.format_output(long, max_chars=100)
    assert text.startswith("y" * 100) and "more characters" in text and len(text) < 200


def test_error_reports_last_traceback_line():
    result = sandbox.run("x = 1\nprint('before')\nprint(undefined_name)")
    assert result.status == "error"
    assert result.error == "NameError: name 'undefined_name' is not defined"
    assert result.stdout == "before\n"
    assert sandbox.format_output(result) == "NameError: name 'undefined_name' is not defined"
    assert sandbox.run("def f(:\n  pass").error.startswith("SyntaxError")
    assert sandbox.run("import sys; sys.exit(0)").status == "ok"
    assert sandbox.run("import sys; sys.exit(3)").status == "error"


@pytest.mark.parametrize("code", ["while True: pass", "import time; time.sleep(60)"])
def test_busy_and_sleeping_code_time_out(code):
    result = sandbox.run(code, timeout=1)
    assert result.status == "timeout" and 0.9 < result.elapsed < 3
    assert sandbox.format_output(result).startswith("TimeoutError")


def test_memory_bomb():
    assert sandbox.run("x = bytearray(8 * 1024**3)").status == "memory"
    grow = "chunks = []\nfor _ in range(3_000):\n    chunks.append(b'x' * 10**6)"  # 3 GB, a MB at a time
    result = sandbox.run(grow, memory_mb=200, timeout=10)
    assert result.status == "memory" and "MemoryError" in result.error
    assert sandbox.run("import numpy as np; np.zeros((10**5, 10**5))").status == "memory"  # 80 GB, untouched


def test_memory_of_the_whole_process_tree_is_bounded():
    launcher = sandbox._checkout()
    sandbox._idle.append(launcher)
    if "cgroup" not in launcher.hello["features"]:
        pytest.skip("no memory cgroup here: memory is bounded per process only")
    # 4 processes x 200 MB: each under its own 256 MB address-space limit, together over the
    # tree's limit (256 MB + work dir + slack). Harmless if the defence is broken: 800 MB in all.
    code = ("import os, time\nkids = []\n"
            "for _ in range(4):\n    pid = os.fork()\n"
            "    if pid == 0:\n        chunks = [b'x' * 10**7 for _ in range(20)]\n        time.sleep(1)\n        os._exit(0)\n"
            "    kids.append(pid)\n"
            "for pid in kids:\n    os.waitpid(pid, 0)\nprint('done')")
    result = sandbox.run(code, memory_mb=256, timeout=10)
    assert result.status == "memory", result


def test_numpy_and_sympy_work_under_default_limits():
    code = ("import numpy as np, sympy as sp\n"
            "a = np.random.default_rng(0).normal(size=(200, 200))\n"
            "print(round(float(np.abs(np.linalg.inv(a) @ a - np.eye(200)).max()), 6))\n"
            "x = sp.symbols('x')\nprint(sp.solve(x**2 - 5*x + 6, x), sp.factorint(9315))")
    result = sandbox.run(code)
    assert result.status == "ok", result.stderr
    assert result.stdout.splitlines() == ["0.0", "[2, 3] {3: 4, 5: 1, 23: 1}"]


def test_fork_storm_is_bounded_and_cleaned_up():
    code = ("import os, time\nforks = 0\n"
            "for _ in range(200):\n"
            "    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
            "    if pid == 0:\n        time.sleep(20)\n        os._exit(0)\n"
            "    forks += 1\n"
            "print(forks)")
    result = sandbox.run(code, timeout=5, processes=16)
    assert result.status == "ok", result.stderr
    assert int(result.stdout) < 16  # RLIMIT_NPROC stopped the loop
    assert result.elapsed < 5       # the sleepers did not keep the run alive
    time.sleep(0.2)
    assert our_survivors() == []


def test_setsid_double_fork_escapee_is_killed():
    code = ("import os, time\n"
            "if os.fork() == 0:\n    os.setsid()\n"
            "    if os.fork() == 0:\n        time.sleep(20)\n        os._exit(0)\n"
            "    os._exit(0)\n"
            "print('parent done')")
    result = sandbox.run(code, timeout=5)
    assert result.status == "ok" and result.stdout == "parent done\n"
    assert result.elapsed < 3
    time.sleep(0.2)
    assert our_survivors() == []


def test_output_flood_is_capped():
    result = sandbox.run("while True:\n    print('x' * 1000)", timeout=5, output_bytes=10_000)
    assert result.status == "output_limit" and result.truncated
    assert len(result.stdout) <= 10_000 and result.elapsed < 4
    assert sandbox.format_output(result).endswith("more characters]\nOutputLimitError: output exceeded 10000 bytes")
    result = sandbox.run("import sys\nwhile True:\n    sys.stderr.write('e' * 1000)", timeout=5, output_bytes=10_000)
    assert result.status == "output_limit" and len(result.stderr) <= 10_000


def test_files_outside_the_work_dir_cannot_be_deleted_or_written(tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("alive")
    open_dir = tmp_path / "world_writable"  # file permissions would allow this; Landlock must not
    open_dir.mkdir()
    open_dir.chmod(0o777)
    code = (f"import os\nfor attack in (lambda: os.remove({str(canary)!r}),\n"
            f"               lambda: open({str(canary)!r}, 'w').write('dead'),\n"
            f"               lambda: open({str(open_dir / 'evil.txt')!r}, 'w').write('x'),\n"
            f"               lambda: os.rename({str(canary)!r}, {str(open_dir / 'moved')!r})):\n"
            "    try:\n        attack()\n        print('succeeded')\n"
            "    except OSError as e:\n        print(type(e).__name__)\n"
            "open('inside.txt', 'w').write('fine')\nprint(open('inside.txt').read())")
    result = sandbox.run(code)
    assert result.status == "ok", result.stderr
    assert "succeeded" not in result.stdout and result.stdout.endswith("fine\n")
    assert canary.read_text() == "alive"
    assert os.listdir(open_dir) == []


def test_private_files_are_not_readable(tmp_path):
    launcher = sandbox._checkout()
    sandbox._idle.append(launcher)
    if "landlock" not in launcher.hello["features"]:
        pytest.skip("no Landlock here: reading is governed by file permissions only")
    secret = tmp_path / "token"
    secret.write_text("hunter2-file")
    secret.chmod(0o600)
    result = sandbox.run(f"print(open({str(secret)!r}).read())")
    assert result.status == "error" and "PermissionError" in result.error and "hunter2" not in result.stdout


def test_disk_quota_and_file_size():
    many_files = "for i in range(10_000):\n    open(f'f{i}', 'w').write('x' * 10_000)"  # 100 MB in many files
    result = sandbox.run(many_files, disk_mb=4)
    assert result.status == "error" and "OSError" in result.error, result.error
    one_big = "open('big', 'wb').write(b'x' * (8 << 20))"
    result = sandbox.run(one_big, file_size_mb=1)
    assert result.status == "error" and "File too large" in result.error


def test_fresh_work_dir_per_run_removed_afterwards():
    first = sandbox.run("import os\nopen('left_behind.txt', 'w').write('x')\nprint(os.getcwd())")
    workdir = first.stdout.strip()
    assert first.status == "ok" and not os.path.exists(workdir)
    second = sandbox.run("import os\nprint(os.listdir('.'), os.path.exists('left_behind.txt'))")
    assert second.stdout == "[] False\n"


def test_no_network():
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(5)
    tcp.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    code = ("import socket\n"
            f"for attack in (lambda: socket.create_connection(('127.0.0.1', {tcp.getsockname()[1]}), timeout=1),\n"
            f"               lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {udp.getsockname()[1]})),\n"
            "               lambda: socket.socket().bind(('127.0.0.1', 0))):\n"
            "    try:\n        attack()\n        print('succeeded')\n"
            "    except OSError as e:\n        print(type(e).__name__)")
    try:
        result = sandbox.run(code, timeout=3)
        assert result.status == "ok" and "succeeded" not in result.stdout, result.stdout + result.stderr
        with pytest.raises(BlockingIOError):
            tcp.accept()
        with pytest.raises(BlockingIOError):
            udp.recv(10)
    finally:
        tcp.close()
        udp.close()


def test_no_unix_socket_elsewhere(tmp_path):
    path = str(tmp_path / "listener.sock")
    server = socket.socket(socket.AF_UNIX)
    server.bind(path)
    os.chmod(path, 0o777)
    server.listen(5)
    server.setblocking(False)
    code = (f"import socket\ntry:\n    socket.socket(socket.AF_UNIX).connect({path!r})\n    print('succeeded')\n"
            "except OSError as e:\n    print(type(e).__name__)")
    try:
        result = sandbox.run(code, timeout=3)
        assert result.status == "ok" and "succeeded" not in result.stdout
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()


def test_cannot_signal_processes_outside(marker_process):
    code = (f"import os, signal\ntry:\n    os.kill({marker_process.pid}, signal.SIGKILL)\n    print('succeeded')\n"
            "except OSError as e:\n    print(type(e).__name__)")
    result = sandbox.run(code)
    assert result.status == "ok" and "succeeded" not in result.stdout
    time.sleep(0.1)
    assert marker_process.poll() is None


def test_stdin_is_closed():
    result = sandbox.run("input()", timeout=3)
    assert result.status == "error" and result.error.startswith("EOFError")
    result = sandbox.run("import sys\nprint(repr(sys.stdin.read()))", timeout=3)
    assert result.stdout == "''\n" and result.elapsed < 2


def test_no_secret_leaks_through_env_or_proc(monkeypatch, marker_process):
    sandbox.shutdown()  # the next run starts a launcher that sees the secret in our environment
    monkeypatch.setenv("TOCODE_SECRET", "hunter2-parent")
    code = ("import os\nprint(sorted(os.environ))\nleaks = []\n"
            f"for pid in ['self', '1', '{os.getpid()}', '{os.getppid()}', '{marker_process.pid}'] + os.listdir('/proc'):\n"
            "    try:\n        data = open(f'/proc/{pid}/environ', 'rb').read()\n    except OSError:\n        continue\n"
            "    if b'hunter2' in data:\n        leaks.append(pid)\n"
            "print(leaks)")
    result = sandbox.run(code)
    assert result.status == "ok", result.stderr
    names, leaks = result.stdout.splitlines()
    assert "hunter2" not in result.stdout and leaks == "[]"
    assert set(eval(names)) <= set(sandbox.CHILD_ENV) | {"HOME", "TMPDIR"}


def test_multi_cell_state_and_tool():
    response = ("Let me compute.\n```python\nx = 6\nprint('setup')\n```\n```output\nsetup\n```\n"
                "Oops:\n```python\ny = 1 / 0\n```\n```output\nZeroDivisionError: division by zero\n```\n"
                "Now:\n```python\nprint(x * 7)\n```\n```output")
    cells = sandbox.extract_cells(response)
    assert cells == ["x = 6\nprint('setup')\n", "y = 1 / 0\n", "print(x * 7)\n"]
    result = sandbox.run(sandbox.program_for_cells(cells))
    assert result.status == "ok" and result.stdout == "42\n"  # earlier output silenced, error swallowed
    assert sandbox.program_for_cells(["print(9315)\n"]) == "print(9315)\n"
    outputs = sandbox.tool([response, "no code here\n```output", "```python\nprint(9315)\n```\n```output"])
    assert outputs == [("42", "ok"), ("SyntaxError: no python code block to run", "error"), ("9315", "ok")]


def test_run_many_keeps_order_and_runs_concurrently():
    sandbox.run_many(["pass"] * 3, workers=3)  # start the launchers first: we time the runs
    codes = [f"import time; time.sleep(0.5); print({i})" for i in range(6)]
    start = time.monotonic()
    results = sandbox.run_many(codes, workers=3)
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(6)]
    assert time.monotonic() - start < 6 * 0.5 * 0.8  # not serial


def test_never_raises_and_sandbox_errors_are_ours():
    for code in ["\0", "\udcff", "raise SystemExit('bye')", "import os; os._exit(7)", "import ctypes; ctypes.string_at(0)"]:
        result = sandbox.run(code)
        assert result.status == "error", (code, result)
    # A launcher that dies mid-run is our failure: status sandbox_error, counted, and the next run recovers.
    before = sandbox.sandbox_errors
    launcher = sandbox._checkout()
    sandbox._idle.append(launcher)
    threading.Timer(0.5, launcher.proc.kill).start()
    result = sandbox.run("import time; time.sleep(3)")
    assert result.status == "sandbox_error" and sandbox.sandbox_errors == before + 1
    assert sandbox.format_output(result).startswith("SandboxError")
    assert sandbox.run("print(1)").status == "ok"


def test_cli_runs_a_file(tmp_path):
    script = tmp_path / "snippet.py"
    script.write_text("print(6 * 7)")
    out = subprocess.run([sys.executable, sandbox.__file__, str(script)], capture_output=True, text=True, timeout=120)
    assert json.loads(out.stdout)["stdout"] == "42\n"


# -----------------------------------------------------------------------------
# Capabilities, launcher death, Ctrl-C, missing kernel features, soak

def test_a_run_has_no_capability_and_dies_with_its_parent():
    code = ("import ctypes\nsignal_number = ctypes.c_int()\n"
            "ctypes.CDLL(None).prctl(2, ctypes.byref(signal_number))\n"  # PR_GET_PDEATHSIG
            "print(signal_number.value)\n"
            "print([line.split() for line in open('/proc/self/status') if line.startswith('Cap')])")
    result = sandbox.run(code)
    assert result.status == "ok", result.stderr
    pdeathsig, caps = result.stdout.splitlines()
    assert pdeathsig == str(int(signal.SIGKILL))  # set after the uid switch, which clears it
    caps = eval(caps)
    assert len(caps) == 5 and all(int(value, 16) == 0 for _, value in caps), caps  # Inh, Prm, Eff, Bnd, Amb


@pytest.fixture
def launcher_with(tmp_path, monkeypatch):
    """start(patch, disable): a fresh launcher whose interpreter first runs `patch` (as a sitecustomize on its
    PYTHONPATH), with sandbox.DISABLE = disable and nothing preloaded (faster); the pool holds only it until the
    test ends."""
    def start(patch="", disable=()):
        sandbox.shutdown()
        (tmp_path / "sitecustomize.py").write_text(patch)
        monkeypatch.setitem(sandbox.LAUNCHER_ENV, "PYTHONPATH", str(tmp_path))
        monkeypatch.setattr(sandbox, "DISABLE", disable)
        monkeypatch.setattr(sandbox, "PRELOAD", ())
        monkeypatch.setattr(sandbox, "_warned", True)
        launcher = sandbox._checkout()
        sandbox._idle.append(launcher)
        return launcher
    yield start
    sandbox.shutdown()


def launcher_state(launcher):
    """fds of the serving launcher process, and the work dirs in its base dir (seen through its mount namespace)."""
    pid = launcher.hello["pid"]
    return len(os.listdir(f"/proc/{pid}/fd")), os.listdir(f"/proc/{pid}/root{launcher.hello['base']}")


def test_an_unknown_architecture_drops_seccomp_only(launcher_with):
    usual = sandbox._checkout()
    sandbox._idle.append(usual)
    launcher = launcher_with("import os\n_uname = os.uname\n"
                             "os.uname = lambda: type(_uname())(tuple(_uname())[:4] + ('riscv64',))\n")
    features, notes = launcher.hello["features"], launcher.hello["notes"]
    assert set(features) == set(usual.hello["features"]) - {"seccomp"}, notes
    (new_note,) = [note for note in notes if note not in usual.hello["notes"]]  # nothing else is blamed
    assert "riscv64" in new_note and "seccomp" in new_note
    result = sandbox.run("print([line.split()[1] for line in open('/proc/self/status') if line.startswith('Cap')])")
    assert result.status == "ok" and set(eval(result.stdout)) == {"0000000000000000"}, result


def test_without_landlock_a_root_run_reads_only_what_file_permissions_allow(launcher_with):
    if os.geteuid() != 0:
        pytest.skip("the uid switch and the capability drop are what root runs get")
    launcher = launcher_with(disable=("landlock",))
    assert "landlock" not in launcher.hello["features"] and "read_search" not in launcher.hello["features"]
    folder = tempfile.mkdtemp(prefix="tocode-test-permissions-")  # our own, in /tmp, which others may enter
    try:
        os.chmod(folder, 0o755)
        for name, mode in (("closed", 0o000), ("private", 0o600), ("public", 0o644)):
            path = os.path.join(folder, name)
            with open(path, "w") as f:
                f.write(f"hunter2-{name}")
            os.chmod(path, mode)
        code = (f"for name in ('closed', 'private', 'public'):\n"
                f"    try:\n        print(name, open({folder!r} + '/' + name).read())\n"
                "    except OSError as e:\n        print(name, type(e).__name__)")
        result = sandbox.run(code)
        assert result.status == "ok", result.stderr
        assert result.stdout.splitlines() == ["closed PermissionError", "private PermissionError",
                                              "public hunter2-public"]
    finally:
        shutil.rmtree(folder)


PIDFD_FAILS = '''import errno, os
def pidfd_open(pid, flags=0):
    with open(os.path.join(os.path.dirname(__file__), "pidfd_calls"), "a") as f:
        f.write("x")
    raise OSError(errno.EMFILE, "Too many open files (a test)")
os.pidfd_open = pidfd_open
'''


def test_without_pidfd_runs_are_still_watched_and_nothing_leaks(launcher_with, tmp_path):
    launcher = launcher_with(PIDFD_FAILS)
    fds, workdirs = launcher_state(launcher)
    result = sandbox.run("import time; time.sleep(30)", timeout=0.5)
    assert result.status == "timeout" and 0.4 < result.elapsed < 2.5, result
    result = sandbox.run("print(1)")
    assert result.status == "ok" and result.stdout == "1\n" and result.elapsed < 2, result
    result = sandbox.run("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(20)\n    os._exit(0)\n"
                         "print('parent done')", timeout=5)
    assert result.status == "ok" and result.elapsed < 3, result
    assert len((tmp_path / "pidfd_calls").read_text()) >= 3  # the failing pidfd_open was the one used
    time.sleep(0.2)
    assert launcher_state(launcher) == (fds, workdirs) and workdirs == []
    assert our_survivors() == []
    sandbox.shutdown()
    assert launcher.proc.returncode == 0
    assert not os.path.exists(launcher.hello["base"])
    if "cgroup" in launcher.hello["features"]:
        assert not os.path.exists(launcher.hello["features"]["cgroup"][0])


# A trainer of its own, in a subprocess: prints its launchers' hello (with popen_pid, the process it started), then
# runs the code in code.py on each launcher at once, prints the first result's status, and, with `again`, one more run
# (on a new launcher, which removes what a killed one left) and that launcher's hello. Nothing preloaded: faster.
TRAINER = '''
import json, signal, sys
# Ctrl-C as in a terminal, even when this test runs in a background job, which starts with SIGINT ignored
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, {repo!r})
import sandbox
sandbox.PRELOAD = ()
code, workers, again = open("code.py").read(), int(sys.argv[1]), sys.argv[2] == "again"
sandbox.run_many(["pass"] * workers, workers=workers)  # starts the launchers, together
launchers = list(sandbox._idle)
print(json.dumps([dict(launcher.hello, popen_pid=launcher.proc.pid) for launcher in launchers]), flush=True)
results = sandbox.run_many([code] * workers, workers=workers, timeout=30)
print(json.dumps(results[0].status), flush=True)
if again:
    result = sandbox.run("print('next')")
    print(json.dumps([result.stdout, sandbox._idle[-1].hello]), flush=True)
'''


def sleeping_snippet(tag):
    """A run whose first process sleeps 20 s and whose child, carrying tag in its command line, does too."""
    return ("import subprocess, sys, time\n"
            f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(20)', {tag!r}])\n"
            "time.sleep(20)")


def marked(tag):
    """Pids of processes whose command line carries tag (a run's processes are visible from here)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if tag.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def wait_for(condition, limit):
    deadline = time.monotonic() + limit
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def read_line(proc, limit):
    """The trainer's next line (JSON), waiting at most `limit` s for it."""
    deadline = time.monotonic() + limit
    while b"\n" not in proc.pending:
        if not select.select([proc.stdout], [], [], max(0, deadline - time.monotonic()))[0]:
            raise AssertionError(f"the trainer said nothing for {limit} s")
        chunk = os.read(proc.stdout.fileno(), 65536)
        assert chunk, f"the trainer ended: {proc.stderr.read()[-3000:]}"
        proc.pending += chunk
    line, proc.pending = proc.pending.split(b"\n", 1)
    return json.loads(line)


def is_launcher(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"--launcher" in f.read()
    except OSError:
        return False


def start_trainer(folder, code, workers, again, user=None, **popen):
    script = os.path.join(folder, "trainer.py")
    with open(script, "w") as f:
        f.write(TRAINER.format(repo=os.path.dirname(os.path.abspath(sandbox.__file__))))
    with open(os.path.join(folder, "code.py"), "w") as f:  # not in the trainer's argv, where `marked` would see it
        f.write(code)
    os.chmod(script, 0o644)
    os.chmod(os.path.join(folder, "code.py"), 0o644)
    python = "/usr/bin/python3" if user else sys.executable
    proc = subprocess.Popen([python, "-s", script, str(workers), "again" if again else "once"], cwd=folder,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0, user=user, group=user,
                            extra_groups=[] if user else None, env={"PATH": "/usr/bin:/bin"}, **popen)
    proc.pending = b""  # read_line's buffer
    return proc


def trainer_folder(user):
    """A folder of our own for the trainer's script; as another user, skip where that user cannot run the sandbox."""
    if user is not None:
        if os.geteuid() != 0:
            pytest.skip("switching to another user needs root")
        probe = subprocess.run(["/usr/bin/python3", "-c", "import sys; print(sys.version_info >= (3, 10))"],
                               capture_output=True, text=True, user=user, group=user, extra_groups=[])
        if probe.stdout.strip() != "True" or sandbox._closed_on_the_way(os.path.dirname(os.path.abspath(sandbox.__file__))):
            pytest.skip("no /usr/bin/python3 >= 3.10, or sandbox.py, that user nobody could run here")
    folder = tempfile.mkdtemp(prefix="tocode-test-trainer-")
    os.chmod(folder, 0o755)
    return folder


def end_trainer(proc, tag, folder):
    """Our own processes only: the trainer, and the snippet's marked processes should they have survived."""
    proc.kill()
    proc.communicate()
    for pid in marked(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("user", [None, 65534], ids=["as_root_or_self", "as_nobody"])
def test_launcher_killed_mid_run_takes_its_run_along_and_the_next_one_cleans_up(user):
    folder = trainer_folder(user)
    tag = f"tocode-test-{uuid.uuid4().hex}"
    trainer = start_trainer(folder, sleeping_snippet(tag), 1, again=True, user=user)
    try:
        (hello,) = read_line(trainer, 60)
        if "pid_ns" not in hello["features"] and "cgroup" not in hello["features"]:
            pytest.skip("without a PID namespace or a cgroup, a run's own children outlive a SIGKILLed launcher")
        assert wait_for(lambda: marked(tag), 15), "the snippet did not start"
        os.kill(hello["popen_pid"], signal.SIGKILL)  # the launcher our trainer started
        assert wait_for(lambda: not marked(tag), 5), "the run outlived its launcher"
        assert read_line(trainer, 30) == "sandbox_error"
        stdout, next_hello = read_line(trainer, 60)
        assert stdout == "next\n"
        assert next_hello["base"] != hello["base"] and not os.path.exists(hello["base"])
        if "cgroup" in hello["features"]:
            assert not os.path.exists(hello["features"]["cgroup"][0])
    finally:
        end_trainer(trainer, tag, folder)


@pytest.mark.parametrize("whom,workers,user", [("process_group", 1, None), ("trainer_only", 2, None),
                                               ("process_group", 2, 65534)],
                         ids=["process_group", "trainer_only", "process_group_as_nobody"])
def test_ctrl_c_kills_the_runs_and_leaves_nothing_behind(whom, workers, user):
    """Ctrl-C: SIGINT to the trainer's process group (its launchers too, not the runs: they are setsid'ed), or to
    the trainer alone, whose run_many must then stop the launchers its worker threads use."""
    folder = trainer_folder(user)
    tag = f"tocode-test-{uuid.uuid4().hex}"
    trainer = start_trainer(folder, sleeping_snippet(tag), workers, again=False, user=user, start_new_session=True)
    try:
        hellos = read_line(trainer, 60)
        assert wait_for(lambda: len(marked(tag)) == workers, 15), "the snippets did not start"
        if whom == "process_group":
            os.killpg(trainer.pid, signal.SIGINT)  # our trainer's own session: it, its launchers (not the runs)
        else:
            trainer.send_signal(signal.SIGINT)
        stderr = trainer.communicate(timeout=20)[1].decode(errors="replace")
        assert "KeyboardInterrupt" in stderr and trainer.returncode != 0, stderr[-3000:]
        assert "sandbox_error" not in stderr, stderr[-3000:]
        assert wait_for(lambda: not marked(tag), 5), "runs outlived the Ctrl-C"
        for hello in hellos:
            assert not is_launcher(hello["popen_pid"]) and not is_launcher(hello["pid"])
            assert not os.path.exists(hello["base"])
            if "cgroup" in hello["features"]:
                assert not os.path.exists(hello["features"]["cgroup"][0])
    finally:
        end_trainer(trainer, tag, folder)


def test_soak_leaks_nothing(monkeypatch):
    monkeypatch.setattr(sandbox, "PRELOAD", ())  # faster launchers; `python sandbox.py --soak=N` has the real ones
    report, problems = sandbox.soak(20, workers=2, batch=10)
    assert not problems, "\n".join(report)


def test_fallback_without_namespaces_warns_once_and_still_contains(monkeypatch, capsys, tmp_path):
    """Where the kernel refuses namespaces (e.g. a default Docker container), the launcher falls
    back to a child subreaper that sweeps escaped processes, and says so once."""
    sandbox.shutdown()
    monkeypatch.setattr(sandbox, "DISABLE", ("pid_ns", "mount_ns"))
    monkeypatch.setattr(sandbox, "_warned", False)
    try:
        escapee = ("import os, time\n"
                   "if os.fork() == 0:\n    os.setsid()\n"
                   "    if os.fork() == 0:\n        time.sleep(20)\n        os._exit(0)\n"
                   "    os._exit(0)\n"
                   "open('x.txt', 'w').write('x')\nprint(os.getcwd())")
        result = sandbox.run(escapee, timeout=5)
        assert result.status == "ok" and result.elapsed < 3
        assert not os.path.exists(result.stdout.strip())
        assert sandbox.run("import time; time.sleep(60)", timeout=1).status == "timeout"
        canary = tmp_path / "canary.txt"
        canary.write_text("alive")
        assert sandbox.run(f"import os; os.remove({str(canary)!r})").status == "error"
        assert canary.read_text() == "alive"
        # No tmpfs of the run's own: its work dir is on the launcher's, which must get the run's disk budget
        two_mb = sandbox.run("open('two_mb', 'wb').write(b'x' * (2 << 20))\nprint('written')")
        assert two_mb.status == "ok" and two_mb.stdout == "written\n", two_mb
        assert sandbox.run("open('eight_mb', 'wb').write(b'x' * (8 << 20))", disk_mb=4).status == "error"
        time.sleep(0.2)
        assert our_survivors() == []
        sandbox.run("pass")
        warning = capsys.readouterr().err
        assert warning.count("WARNING") == 1 and "no PID namespace" in warning
    finally:
        sandbox.shutdown()
