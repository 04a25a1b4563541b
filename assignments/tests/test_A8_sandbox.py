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
def wait_until_exited(pid, limit=5.0):
    """Until the child is a zombie (exited, not reaped), at most `limit` s."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return
        time.sleep(0.01)


def watched(child, timeout=2.0, output_bytes=65536, features=None, stdout_pipe_size=None, exited_first=False,
            started_ago=0.0, setup_timeout=sandbox.SETUP_TIMEOUT):
    """Fork a child running child(out_w, err_w, status_w) (it must os._exit), then _watch it. stdout_pipe_size: that
    pipe's buffer in bytes; exited_first: call _watch only once the child has exited (a zombie, not reaped);
    started_ago: pass a `start` this many seconds before the fork."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    status_r, status_w = os.pipe()
    if stdout_pipe_size:
        import fcntl
        fcntl.fcntl(out_w, fcntl.F_SETPIPE_SZ, stdout_pipe_size)
    start = time.monotonic() - started_ago
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
    if exited_first:
        wait_until_exited(pid)
    limits = dict(LIMITS, timeout=timeout, output_bytes=output_bytes, setup_timeout=setup_timeout)
    # pid_ns: True, so _watch does not sweep this (pytest's) process's other children; the child is killed by pid
    result = sandbox._watch(pid, out_r, err_r, status_r, start, limits, features or {"pid_ns": True})
    assert isinstance(result, tuple) and len(result) == 6, (
        "_watch returns (verdict, stdout bytes, stderr bytes, status message, wait status, rusage)")
    return result, time.monotonic() - start, pid, (out_r, err_r, status_r)


def ready_then_exit(out, err, status):
    """A child whose setup reports ready and whose snippet ends at once."""
    os.write(status, b"R")
    os._exit(0)


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
    assert 0.25 < elapsed < 0.8, f"killed after about 0.3 s (the clock is not rounded to seconds), took {elapsed:.2f} s"
    assert os.waitstatus_to_exitcode(wait_status) == -signal.SIGKILL, f"killed by SIGKILL, wait status {wait_status}"
    assert bytes(stdout) == b"started\n", "what the child printed before the clock ran out is kept"
    assert reaped(pid)


def test_the_clock_is_kept_while_output_arrives():
    """_watch: select waits for the time LEFT, so output just before the deadline does not push the kill back"""
    def late_line(out, err, status):
        os.write(status, b"R")
        time.sleep(0.7)
        os.write(out, b"late\n")
        time.sleep(5)
        os._exit(0)
    (verdict, stdout, *_), elapsed, _, _ = watched(late_line, timeout=1.0)
    assert verdict == "timeout" and bytes(stdout) == b"late\n", (verdict, stdout)
    assert elapsed < 1.5, (f"a line at 0.7 s of a 1 s clock, then silence: killed at about 1 s, took {elapsed:.2f} s "
                           f"(wait in select for the time that remains, not for the whole timeout again)")


def test_a_child_that_closes_its_pipes_is_watched_until_it_exits():
    """_watch: both output pipes at EOF is not the end: the child may still be running (the pidfd says when it ends)"""
    def closes_early(out, err, status):
        os.write(status, b"R")
        os.write(out, b"hi")
        os.close(out)
        os.close(err)
        time.sleep(0.3)
        os._exit(5)
    (verdict, stdout, _, _, wait_status, _), elapsed, pid, _ = watched(closes_early)
    assert verdict is None and bytes(stdout) == b"hi", (verdict, stdout)
    assert os.waitstatus_to_exitcode(wait_status) == 5, (
        f"the child closed stdout and stderr, then exited 5 after 0.3 s: its own exit status 5, not a kill; got "
        f"{os.waitstatus_to_exitcode(wait_status)} after {elapsed:.2f} s")


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


def test_the_cap_is_per_pipe_and_keeps_the_head():
    """_watch: the cap counts each pipe on its own, exactly cap bytes is not over it, and what is kept is the first
    bytes written (cap + 1 of them), however the writes are split"""
    def exactly_the_cap(out, err, status):
        os.write(status, b"R")
        os.write(out, b"o" * 600)
        os.write(err, b"e" * 1000)
        os.write(out, b"o" * 400)
        os._exit(0)
    (verdict, stdout, stderr, *_), _, _, _ = watched(exactly_the_cap, output_bytes=1000)
    assert verdict is None and len(stdout) == 1000 and len(stderr) == 1000, (
        f"1,000 bytes on stdout and 1,000 on stderr under a cap of 1,000: within the cap on each pipe (it is per pipe, "
        f"and 'over' means more than cap), so no verdict; got {verdict!r} with {len(stdout)} and {len(stderr)} bytes")

    def counted(out, err, status):
        os.write(status, b"R")
        os.write(out, bytes(range(48, 58)) * 60)    # 600 bytes: 0123456789...
        time.sleep(0.2)                             # two separate reads
        os.write(out, b"abcdefghij" * 60)           # 600 more
        time.sleep(3)
        os._exit(0)
    (verdict, stdout, *_), elapsed, _, _ = watched(counted, timeout=5, output_bytes=1000)
    expected = (bytes(range(48, 58)) * 60 + b"abcdefghij" * 60)[:1001]
    assert verdict == "output_limit" and bytes(stdout) == expected, (
        f"600 bytes, then 600 more, under a cap of 1,000: 'output_limit' and the first 1,001 bytes (the head, counting "
        f"what was already kept); got {verdict!r} with {len(stdout)} bytes, starting {bytes(stdout)[:12]!r}, ending "
        f"{bytes(stdout)[-12:]!r}")
    assert elapsed < 2.0, f"stopped when the cap was passed, not at the clock ({elapsed:.1f} s)"


def test_setup_has_its_own_budget():
    """_watch: before b"R" the deadline is setup's own (limits["setup_timeout"], 10 s), not the snippet's timeout"""
    def slow_setup(out, err, status):
        time.sleep(1.5)                  # setup slower than the snippet's whole clock
        os.write(status, b"R")
        os.write(out, b"hi")
        os._exit(0)
    (verdict, stdout, *_), elapsed, _, _ = watched(slow_setup, timeout=1.0)
    assert verdict is None and bytes(stdout) == b"hi", (
        f"setup took 1.5 s (within its 10 s), then the snippet printed at once under a 1 s clock: no timeout and "
        f"b'hi'; got {verdict!r}, {bytes(stdout)!r} after {elapsed:.1f} s")


def test_a_setup_that_overruns_its_budget_is_stopped():
    """_watch: a setup that never reports b"R" within limits["setup_timeout"] is killed then, with verdict "timeout"
    (the launcher reports it as its own failure), however long the snippet's clock would be"""
    def stuck_setup(out, err, status):
        time.sleep(3)                    # setup hangs past its 0.5 s
        os.write(status, b"R")
        os._exit(0)
    (verdict, _, _, status_msg, wait_status, _), elapsed, _, _ = watched(stuck_setup, timeout=5.0, setup_timeout=0.5)
    assert verdict == "timeout" and elapsed < 2.0, (
        f"setup's budget is limits['setup_timeout'] (0.5 s here) from `start`, whether or not b'R' ever comes: "
        f"'timeout' after about 0.5 s; got {verdict!r} after {elapsed:.1f} s")
    assert os.waitstatus_to_exitcode(wait_status) == -signal.SIGKILL and bytes(status_msg) == b"", (
        f"killed before its setup finished: SIGKILL and no b'R'; got exit {os.waitstatus_to_exitcode(wait_status)}, "
        f"{bytes(status_msg)!r}")


def test_the_snippet_gets_its_whole_clock_after_setup():
    """_watch: once b"R" comes, the deadline is limits["timeout"] from then, even where that is later than setup's"""
    def late_print(out, err, status):
        os.write(status, b"R")           # setup done at once
        time.sleep(1.0)                  # past setup's 0.5 s, within the snippet's 1.5 s
        os.write(out, b"late")
        os._exit(0)
    (verdict, stdout, *_), elapsed, _, _ = watched(late_print, timeout=1.5, setup_timeout=0.5)
    assert verdict is None and bytes(stdout) == b"late", (
        f"setup reported ready at once, the snippet printed after 1.0 s under a 1.5 s clock: no timeout and b'late' "
        f"(the snippet's deadline replaces setup's, it is not capped by it); got {verdict!r}, {bytes(stdout)!r} after "
        f"{elapsed:.1f} s")


def test_output_written_before_the_child_exits_is_read_to_the_end():
    """_watch: the child exiting does not end the reading: what is still in the pipes is read to EOF"""
    payload = bytes(range(256)) * 1200                  # 307,200 bytes, more than one read

    def write_all_and_exit(out, err, status):
        os.write(status, b"R")
        view = memoryview(payload)
        while view:
            view = view[os.write(out, view):]
        os._exit(0)
    # a pipe with room for all of it, so the child never blocks, and already gone when _watch starts
    (verdict, stdout, *_), _, _, _ = watched(write_all_and_exit, timeout=3.0, output_bytes=1_000_000,
                                             stdout_pipe_size=1 << 20, exited_first=True)
    assert verdict is None and bytes(stdout) == payload, (
        f"the child wrote {len(payload)} bytes and exited before _watch began: all of them come back (keep reading "
        f"the pipes until EOF after the pidfd says it exited); got {len(stdout)} bytes, verdict {verdict!r}")


def test_output_over_the_cap_from_a_child_that_already_exited():
    """_watch: the cap passed and the child's exit seen in the same select: the verdict stands, and the child, already
    reaped, is not killed again (its pid may belong to another process by then)"""
    def flood_and_exit(out, err, status):
        os.write(status, b"R")
        os.write(out, b"x" * 1100)
        os._exit(0)
    (verdict, stdout, _, _, wait_status, _), _, pid, _ = watched(flood_and_exit, output_bytes=1000, exited_first=True)
    assert verdict == "output_limit" and len(stdout) == 1001, (verdict, len(stdout))
    assert os.waitstatus_to_exitcode(wait_status) == 0 and reaped(pid), "its own exit status, reaped once"


def test_the_status_pipe_is_read_to_the_end():
    """_watch: what is left on the status pipe is read before returning, even when the loop never selected it (here
    setup's budget was already spent when _watch began: a timeout at once, and the b"R" still comes back)"""
    (verdict, _, _, status_msg, *_), _, _, _ = watched(ready_then_exit, exited_first=True, started_ago=1.0,
                                                       setup_timeout=0.5)
    assert verdict == "timeout" and bytes(status_msg) == b"R", (
        f"setup's deadline had passed: 'timeout' at once; the b'R' the child wrote is still returned (read what is "
        f"left with _read_nonblocking at the end); got {verdict!r}, {bytes(status_msg)!r}")


def test_every_descriptor_is_closed():
    """_watch: the three pipe ends and the pidfd are all closed when it returns (a launcher runs thousands)"""
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        watched(ready_then_exit)
    leaked = len(os.listdir("/proc/self/fd")) - before
    assert leaked <= 0, (f"{leaked} more open file descriptors after 5 runs: close the pidfd as well as the three "
                         f"pipe ends")


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
