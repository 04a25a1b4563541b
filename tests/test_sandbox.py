"""
Tests of sandbox.py: one per property, with REAL attacks.

Safety rule for every attack below: it must be harmless even if the defence it tests is broken.
So each attack targets only something this test created (a canary file in tmp_path, a listener
the test opened, a marker process the test spawned), every fork loop is bounded (<= 200), and
every sleeper ends by itself. A broken sandbox makes a test FAIL; it never takes the machine down.
"""
import json
import os
import socket
import subprocess
import sys
import threading
import time

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
        time.sleep(0.2)
        assert our_survivors() == []
        sandbox.run("pass")
        warning = capsys.readouterr().err
        assert warning.count("WARNING") == 1 and "no PID namespace" in warning
    finally:
        sandbox.shutdown()
