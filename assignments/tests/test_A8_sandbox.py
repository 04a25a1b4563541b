"""A8: sandbox._watch, the wall clock of a run: read both pipes under a byte cap, start the clock when setup reports
"R", and on timeout kill and reap the whole process tree.

Two kinds of checks. Direct ones fork a small child of this test process and call _watch on it. End-to-end ones run
snippets through sandbox.run (the launcher runs your _watch) and look for what they leave behind. Safety rule, as in
tests/test_sandbox.py: everything here only touches processes this test created (sleepers carrying a unique marker
in their command line), every sleeper ends by itself within 20 s, and a broken _watch makes a test fail, never
harms the machine."""
import os
import signal
import sys
import time
import uuid

import pytest

import sandbox
from checklib import blocked

pytestmark = pytest.mark.A8

if not sys.platform.startswith("linux") or not hasattr(os, "pidfd_open"):
    pytestmark = [pytest.mark.A8, pytest.mark.skip(reason="BLOCKED: the sandbox needs Linux >= 5.3 (os.pidfd_open)")]

LIMITS = dict(sandbox.DEFAULT_LIMITS)


# --------------------------------------------------------------------------- direct: _watch on a forked child
def watched(child, timeout=2.0, output_bytes=65536, features=None):
    """Fork a child running child(out_w, err_w, status_w) (it must os._exit), then _watch it."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    status_r, status_w = os.pipe()
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            for fd in (out_r, err_r, status_r):
                os.close(fd)
            child(out_w, err_w, status_w)
        finally:
            os._exit(99)
    for fd in (out_w, err_w, status_w):
        os.close(fd)
    limits = dict(LIMITS, timeout=timeout, output_bytes=output_bytes)
    # pid_ns: True, so _watch does not sweep this (pytest's) process's other children; the child is killed by pid
    result = sandbox._watch(pid, out_r, err_r, status_r, start, limits, features or {"pid_ns": True})
    assert isinstance(result, tuple) and len(result) == 6, (
        "_watch returns (verdict, stdout bytes, stderr bytes, status message, wait status, rusage)")
    return result, time.monotonic() - start, pid, (out_r, err_r, status_r)


def reaped(pid):
    try:
        return os.waitpid(pid, os.WNOHANG) is None
    except ChildProcessError:
        return True


def test_a_finished_run_returns_its_output_and_exit_status():
    """_watch: a child that writes to both pipes and exits 3: verdict None, the bytes, b"R", exit status 3"""
    def child(out, err, status):
        os.write(status, b"R")
        os.write(out, b"out")
        os.write(err, b"err")
        os._exit(3)
    (verdict, stdout, stderr, status_msg, wait_status, usage), elapsed, pid, fds = watched(child)
    assert verdict is None, f"the child ended by itself: no verdict, got {verdict!r}"
    assert bytes(stdout) == b"out" and bytes(stderr) == b"err", (stdout, stderr)
    assert bytes(status_msg).startswith(b"R"), f"the setup message the child wrote: b'R', got {status_msg!r}"
    assert os.waitstatus_to_exitcode(wait_status) == 3, f"wait status of exit(3), got {wait_status}"
    assert hasattr(usage, "ru_utime"), "the last value is the child's resource usage (os.wait4's rusage)"
    assert reaped(pid), "the child must be reaped (os.wait4), or it stays a zombie"
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)            # _watch closes the three pipe ends it was given


def test_the_clock_kills_a_child_that_runs_too_long():
    """_watch: after timeout seconds the child is killed (SIGKILL), reaped, and the verdict is "timeout\""""
    def child(out, err, status):
        os.write(status, b"R")
        os.write(out, b"started\n")
        time.sleep(5)
        os._exit(0)
    (verdict, stdout, _, _, wait_status, _), elapsed, pid, _ = watched(child, timeout=0.3)
    assert verdict == "timeout", f"a 5 s sleep under a 0.3 s clock: 'timeout', got {verdict!r}"
    assert 0.25 < elapsed < 2.0, f"killed after about 0.3 s, took {elapsed:.2f} s"
    assert os.waitstatus_to_exitcode(wait_status) == -signal.SIGKILL, f"killed by SIGKILL, wait status {wait_status}"
    assert bytes(stdout) == b"started\n", "what the child printed before the clock ran out is kept"
    assert reaped(pid)


def test_the_clock_starts_when_setup_reports_ready():
    """_watch: the snippet's clock starts at the b"R" on the status pipe, not at fork (setup is not the snippet's)"""
    def slow_setup(out, err, status):
        time.sleep(0.6)                  # our setup, slow today
        os.write(status, b"R")
        time.sleep(0.3)                  # the snippet: 0.3 s of a 0.5 s clock
        os._exit(0)
    (verdict, *_), elapsed, _, _ = watched(slow_setup, timeout=0.5)
    assert verdict is None, (f"setup took 0.6 s, the snippet 0.3 s under timeout 0.5: no timeout (start the clock at "
                             f"'R'), got {verdict!r} after {elapsed:.2f} s")

    def slow_snippet(out, err, status):
        os.write(status, b"R")
        time.sleep(3)
        os._exit(0)
    (verdict, *_), elapsed, _, _ = watched(slow_snippet, timeout=0.4)
    assert verdict == "timeout" and elapsed < 2.0, f"got {verdict!r} after {elapsed:.2f} s"


def test_output_beyond_the_cap_stops_the_run():
    """_watch: more than output_bytes on a pipe -> verdict "output_limit", the child killed, at most cap + 1 bytes"""
    def flood(out, err, status):
        os.write(status, b"R")
        while True:
            os.write(out, b"x" * 10_000)
    (verdict, stdout, _, _, wait_status, _), elapsed, pid, _ = watched(flood, timeout=5, output_bytes=1000)
    assert verdict == "output_limit", f"got {verdict!r}"
    assert 1000 < len(stdout) <= 1001, f"keep the head, at most one byte over the cap of 1000: kept {len(stdout)}"
    assert elapsed < 2.0 and reaped(pid), f"stopped at once, not at the clock (took {elapsed:.2f} s)"

    def flood_stderr(out, err, status):
        os.write(status, b"R")
        while True:
            os.write(err, b"e" * 10_000)
    (verdict, _, stderr, *_), _, _, _ = watched(flood_stderr, timeout=5, output_bytes=500)
    assert verdict == "output_limit" and 500 < len(stderr) <= 501, (verdict, len(stderr))


def test_both_pipes_are_read_as_data_arrives():
    """_watch: a child that fills stderr before writing stdout must not deadlock (read both pipes together)"""
    def chatty(out, err, status):
        os.write(status, b"R")
        for _ in range(20):
            os.write(err, b"e" * 10_000)            # 200 KB: three times a pipe's buffer
        os.write(out, b"done")
        os._exit(0)
    (verdict, stdout, stderr, *_), elapsed, _, _ = watched(chatty, timeout=3, output_bytes=1_000_000)
    assert verdict is None and len(stderr) == 200_000 and bytes(stdout) == b"done", (
        f"verdict {verdict!r}, {len(stderr)} bytes of stderr, stdout {bytes(stdout)[:20]!r} after {elapsed:.1f} s: "
        f"read whichever pipe has data (select), not one pipe to its end first")


def test_a_setup_failure_message_comes_back():
    """_watch: what the child wrote on the status pipe (here a setup failure, no b"R") is returned"""
    def broken_setup(out, err, status):
        os.write(status, b"setup failed: OSError('no tmpfs')")
        os._exit(111)
    (verdict, _, _, status_msg, wait_status, _), _, _, _ = watched(broken_setup)
    assert bytes(status_msg) == b"setup failed: OSError('no tmpfs')", status_msg
    assert os.waitstatus_to_exitcode(wait_status) == 111


# --------------------------------------------------------------------------- end to end: sandbox.run
MARKED_SLEEP = "import time; time.sleep(20)"


def run(code, **limits):
    """sandbox.run, with a blanked _watch (it raises inside the launcher, which reports a sandbox_error) turned back
    into its NotImplementedError, so check.py says "not implemented yet" instead of listing every symptom."""
    result = sandbox.run(code, **limits)
    if result.status == "sandbox_error" and "NotImplementedError: A" in result.error:
        raise NotImplementedError(result.error.split("NotImplementedError: ", 1)[1])
    return result


def marker():
    return f"tocode-a8-{uuid.uuid4().hex}"


def marked_processes(tag):
    """Host pids whose command line carries tag (processes in a run's PID namespace are visible from here)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if tag.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def survivors(tag, wait=1.5):
    """The marked processes still alive after up to `wait` s; kills them (they are this test's own)."""
    deadline = time.time() + wait
    while marked_processes(tag) and time.time() < deadline:
        time.sleep(0.05)
    alive = marked_processes(tag)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return alive


def sleeper(tag):
    """Python source that replaces the current process by a 20 s sleeper whose command line carries tag."""
    return f"os.execv(sys.executable, [sys.executable, '-c', {MARKED_SLEEP!r}, {tag!r}])"


def tree_snippet(tag, parent_sleeps):
    """A child that sleeps, and its setsid'ed grandchild that sleeps, both marked; then the parent sleeps or exits."""
    return ("import os, sys, time\n"
            "if os.fork() == 0:\n"
            "    if os.fork() == 0:\n"
            "        os.setsid()\n"
            f"        {sleeper(tag)}\n"
            f"    {sleeper(tag)}\n"
            "time.sleep(0.3)\n"
            "print('parent', flush=True)\n"
            + ("time.sleep(30)\n" if parent_sleeps else ""))


@pytest.fixture(scope="module", params=["pid_namespace", "no_pid_namespace"])
def isolation(request):
    """The sandbox as this machine runs it, and its fallback without PID namespaces (the subreaper sweeps).
    Module-scoped: one launcher start per variant."""
    sandbox.shutdown()
    disable = sandbox.DISABLE
    if request.param == "no_pid_namespace":
        sandbox.DISABLE = ("pid_ns", "mount_ns")
    try:
        try:
            launcher = sandbox._checkout()
        except Exception as error:                  # noqa: BLE001
            blocked(f"the sandbox's launcher does not start here: {type(error).__name__}: {error}")
        sandbox._idle.append(launcher)
        if request.param == "pid_namespace" and "pid_ns" not in launcher.hello["features"]:
            blocked("this kernel gives the sandbox no PID namespace (" + "; ".join(launcher.hello["notes"]) + ")")
        yield request.param
    finally:
        sandbox.shutdown()
        sandbox.DISABLE = disable


def test_ok_error_and_output(isolation):
    """sandbox.run: a normal run's status, stdout and stderr come back through your _watch"""
    result = run("print(6 * 7)")
    assert result.status == "ok" and result.stdout == "42\n", f"print(6 * 7): ok, '42\\n'; got {result}"
    result = run("import sys\nprint('out')\nprint('bad', file=sys.stderr)\nsys.exit(3)")
    assert result.status == "error" and result.stdout == "out\n" and "bad" in result.stderr, result
    result = run("print('y' * 60000)")
    assert result.status == "ok" and len(result.stdout) == 60001, "60 KB of output (several reads) arrives whole"


@pytest.mark.parametrize("code", ["while True: pass", "import time; time.sleep(60)"])
def test_busy_and_sleeping_snippets_time_out(isolation, code):
    """sandbox.run: a busy loop and a sleep are both stopped by the wall clock"""
    result = run(code, timeout=0.5)
    assert result.status == "timeout", f"{code!r} under a 0.5 s clock: 'timeout', got {result.status}: {result.error}"
    assert 0.4 < result.elapsed < 3.0, f"stopped after about 0.5 s, took {result.elapsed:.2f} s"
    result = run("import time; time.sleep(0.2); print('in time')", timeout=1.5)
    assert result.status == "ok" and result.stdout == "in time\n", f"a 0.2 s sleep under 1.5 s is not cut, {result}"


def test_a_timeout_kills_the_whole_tree(isolation):
    """sandbox.run: on timeout the snippet's children and setsid'ed grandchildren die with it"""
    tag = marker()
    try:
        result = run(tree_snippet(tag, parent_sleeps=True), timeout=0.8)
        assert result.status == "timeout", (f"the parent sleeps 30 s under a 0.8 s clock: timeout, got "
                                            f"{result.status!r} ({result.error})")
        assert result.stdout == "parent\n", "output printed before the timeout is kept"
        left = survivors(tag)
        assert not left, (f"{isolation}: {len(left)} of the snippet's processes outlived its timeout (a child and a "
                          f"setsid'ed grandchild must die too: without a PID namespace, sweep() them)")
    finally:
        survivors(tag, wait=0)


def test_children_left_behind_do_not_hold_the_run(isolation):
    """sandbox.run: a parent that exits leaving sleepers (holding its pipes) returns at once, sleepers killed"""
    tag = marker()
    try:
        result = run(tree_snippet(tag, parent_sleeps=False), timeout=5.0)
        assert result.status == "ok" and result.stdout == "parent\n", (
            f"{isolation}: the snippet prints 'parent' and exits: status ok, got {result.status!r} ({result.error}) "
            f"after {result.elapsed:.1f} s")
        assert result.elapsed < 3.0, (f"{isolation}: the run took {result.elapsed:.1f} s: when the snippet's process "
                                      f"exits its leftover children must be killed (they hold the pipes open), not "
                                      f"waited for until the clock runs out")
        assert not survivors(tag), f"{isolation}: the snippet's sleepers outlived it"
    finally:
        survivors(tag, wait=0)


def test_output_flood(isolation):
    """sandbox.run: printing in a loop stops at the output cap"""
    result = run("while True:\n    print('x' * 1000)", timeout=5, output_bytes=10_000)
    assert result.status == "output_limit" and result.truncated and len(result.stdout) <= 10_000, result.status
    assert result.elapsed < 3.0, f"stopped at the cap, not at the clock ({result.elapsed:.1f} s)"
