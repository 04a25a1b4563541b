"""
Run model-written Python under resource limits, fast.

Every stage of the EM loop executes code a language model wrote: thousands of snippets per
iteration, on the user's own training machine. This file is the guard between the two.

What it is, honestly: a guard against ACCIDENTS by model-written code (an infinite loop, a
10**10-element list, `rm -rf` of the wrong dir, a fork in a loop, a print in a loop), not a
container for hostile code. It uses what the Linux kernel offers (Linux only) and says once,
loudly, what is not available.

How one snippet runs:

    trainer --(pipe: code + limits)--> launcher --fork--> child = PID 1 of a fresh PID namespace
                                          |                  own mount namespace, tmpfs work dir,
                                          |                  fresh /proc, memory cgroup, rlimits,
                                          |                  own uid, Landlock, seccomp -> exec(code)
                                          +-- reads stdout/stderr with a byte cap, enforces the
                                              wall clock, SIGKILLs the child and reaps it

The launcher is started once (per worker) and pre-imports numpy and sympy, so a run costs a fork,
not an interpreter start plus imports: this is where the throughput comes from.

Reading order: the interface first (the limits, Result, run, run_many, and the tool-integrated
reasoning helpers extract_cells, program_for_cells, format_output, tool). Then the machinery in the
order a run goes through it: the trainer's pool of launchers; the launcher, which sets up once what
all its runs share; one run as the launcher sees it (fork, read, clock, kill, reap, classify); the
child, between fork() and the snippet's first line; the kernel interfaces, through ctypes; the CLI.

The isolation layers, in the order they are applied:

1. Once per launcher: its own network namespace (no interface is up: no TCP, no UDP, abstract unix
   sockets are private). As non-root, first an unprivileged user namespace, which is what permits
   making the others. The launcher is also a child subreaper: orphans of a run come back to it.
2. Per run, the child is PID 1 of its own PID namespace: when it dies the kernel kills every
   process it left behind (setsid'ed, double-forked or not), and it cannot see, hence not signal,
   anything outside. Where PID namespaces are not permitted, the launcher sweeps the orphans.
3. Its own mount namespace: the work dir is a private tmpfs (bytes and files bounded, gone with the
   run), and so is /dev/shm; /proc shows only the run's PID namespace (no other process's environ).
4. As root, a memory cgroup bounds the whole tree (RLIMIT_AS bounds each process only).
5. rlimits: CPU time, file size, open files, processes, no core dumps.
6. As root, the child switches to a uid of its own (so RLIMIT_NPROC counts and file permissions
   apply) and keeps no capability, not even in its bounding set; as root of a user namespace it
   drops every capability too. Then no_new_privs. An interpreter below a dir other users may not
   enter (a pyenv under a 0700 /root) stays importable: in the launcher's own mount namespace, that
   dir is covered by one that holds just the interpreter's dirs.
7. Landlock, by ABI version. ABI >= 1 (files): writing only inside the work dir (and /dev/null, the
   private /dev/shm), reading and executing only below the system's and Python's own dirs
   (truncate(2) is covered from ABI 3 on). ABI >= 4 (TCP): no bind or connect on any port.
   ABI >= 6 (scopes): no signal and no abstract unix socket connection leaves the run's Landlock
   domain.
8. seccomp refuses socket(2), which covers unix socket files elsewhere on the machine.
9. Last, RLIMIT_AS: relative to what the forked interpreter already maps.

Where the kernel refuses a layer, the launcher runs without it, and the trainer warns once.

Nothing outlives its owner. A run dies with its launcher, whatever kills the launcher (the run's
PR_SET_PDEATHSIG, set after its uid switch, which clears it). A launcher ends with its trainer (EOF
on its pipe, seen between runs) and on SIGINT, SIGTERM or SIGHUP: it kills its run, removes its dirs
and cgroup, then dies of that signal, so Ctrl-C leaves nothing behind and the trainer gets its
KeyboardInterrupt. After a SIGKILL (or the OOM killer) the next launcher removes what it left: the
names carry the owner's pid and start time, so a dead owner is told from a reused pid.

CLI:  python sandbox.py FILE.py          run a file, print the Result as JSON
      python sandbox.py --bench          throughput vs naive `subprocess.run([python, "-c", code])`
      python sandbox.py --soak N         N mixed runs (ok, errors, timeouts, memory and fork bombs,
                                         floods), then: nothing leaked, launcher RSS flat
"""

import argparse
import atexit
import collections
import ctypes
import dataclasses
import errno
import gc
import json
import os
import re
import select
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

# -----------------------------------------------------------------------------
# Default limits (each overridable per call: run(code, timeout=..., memory_mb=..., disk_mb=...))
TIMEOUT = 5.0          # wall-clock seconds per run; sleeping code is stopped too
SETUP_TIMEOUT = 10.0   # wall-clock seconds our own setup of a run (namespaces, mounts, Landlock) may take before the
                       # snippet's clock starts; a setup that overruns it is our failure (sandbox_error), not the code's
MEMORY_MB = 1024       # address space the snippet may add on top of the pre-loaded interpreter (RLIMIT_AS)
OUTPUT_BYTES = 65536   # stdout (and separately stderr) beyond this -> killed, status "output_limit"
FILE_SIZE_MB = 16      # largest single file (RLIMIT_FSIZE)
DISK_MB = 64           # total size of the work dir (a private tmpfs): many small files count too
MAX_FILES = 2048       # files + dirs in the work dir (tmpfs inodes)
OPEN_FILES = 256       # RLIMIT_NOFILE
PROCESSES = 32         # processes + threads of the run (RLIMIT_NPROC on the run's own uid)
PRELOAD = ("numpy", "sympy")  # imported once by the launcher so `import sympy` is free in a run
UID_BASE = 1_700_000_000     # a launcher's runs get uid UID_BASE + the launcher's pid: no other process has it
DISABLE = ()  # protections not to attempt, e.g. ("pid_ns", "landlock"): to test the fallbacks
# With Landlock, a run may read only these (plus the interpreter's prefixes, sys.path, its work
# dir): the system, not the users' homes, /tmp or the trainer's working files with their tokens.
READABLE = ("/usr", "/lib", "/lib32", "/lib64", "/bin", "/sbin", "/etc", "/opt", "/dev", "/proc", "/sys",
            "/var/lib", "/nix", "/snap")

LIMIT_NAMES = ("timeout", "setup_timeout", "memory_mb", "output_bytes", "file_size_mb", "disk_mb", "max_files",
               "open_files", "processes")
DEFAULT_LIMITS = dict(timeout=TIMEOUT, setup_timeout=SETUP_TIMEOUT, memory_mb=MEMORY_MB, output_bytes=OUTPUT_BYTES,
                      file_size_mb=FILE_SIZE_MB, disk_mb=DISK_MB, max_files=MAX_FILES,
                      open_files=OPEN_FILES, processes=PROCESSES)

# The only environment a run sees; nothing of the trainer's (tokens, keys, paths) gets through.
# One BLAS thread: threads count against PROCESSES and each reserves address space.
CHILD_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
    "PYTHONIOENCODING": "utf-8", "PYTHONDONTWRITEBYTECODE": "1", "MPLBACKEND": "Agg",
    "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1", "VECLIB_MAXIMUM_THREADS": "1",
}


@dataclasses.dataclass
class Result:
    status: str          # ok | error | timeout | memory | output_limit | sandbox_error
    stdout: str = ""
    stderr: str = ""
    elapsed: float = 0.0  # seconds, wall clock, as seen by the launcher
    truncated: bool = False
    error: str = ""      # last traceback line ("NameError: name 'x' is not defined") or ""


# Our own failures (a launcher that died, a namespace that could not be made) are never blamed on
# the model: they get status "sandbox_error" and are counted here so a trainer can report them.
sandbox_errors = 0


# -----------------------------------------------------------------------------
# Running code: what a trainer calls

def run(code: str, timeout: float = TIMEOUT, memory_mb: int = MEMORY_MB, **other_limits) -> Result:
    """Run `code` in a fresh limited process and work dir. Never raises for any code string
    (an unknown limit name is a caller's bug and raises TypeError)."""
    global sandbox_errors
    unknown = set(other_limits) - set(LIMIT_NAMES)
    if unknown:
        raise TypeError(f"unknown sandbox limits: {sorted(unknown)}; known: {LIMIT_NAMES}")
    limits = dict(DEFAULT_LIMITS, **other_limits, timeout=float(timeout), memory_mb=int(memory_mb))
    launcher = None
    try:
        launcher = _checkout()
        with _pool_lock:
            _busy.add(launcher)
        _send(launcher.proc.stdin.fileno(), {"code": str(code), "limits": limits})
        answer = launcher.receive(timeout=limits["setup_timeout"] + limits["timeout"] + 20)
        result = Result(**answer)
    except BaseException as e:
        if launcher:
            launcher.close(graceful=False)  # it kills the run and removes its dirs before it exits
        if isinstance(e, KeyboardInterrupt):
            raise
        result = Result(status="sandbox_error", error=f"SandboxError: {type(e).__name__}: {e}")
        if launcher and launcher.stopped_by_signal():  # Ctrl-C, or run_many stopping it: not a failure
            result.error = "SandboxError: interrupted"
            return result
    finally:
        if launcher:
            _release(launcher)
    if result.status == "sandbox_error":
        with _pool_lock:
            sandbox_errors += 1
        print(f"sandbox.py: sandbox_error #{sandbox_errors}: {result.error}", file=sys.stderr)
    return result


def run_many(codes: list, workers: int | None = None, **limits) -> list:
    """run() each code, `workers` at a time (default: one per CPU); results in input order."""
    return _run_all([(code, limits) for code in codes], workers)


def _run_all(jobs, workers=None):
    """run(code, **limits) for each (code, limits) of jobs, `workers` at a time; results in input order. On Ctrl-C
    the worker threads, which never see the KeyboardInterrupt, are stopped too: their launchers get SIGTERM."""
    jobs = list(jobs)
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs) or 1))
    if workers == 1:
        return [run(code, **limits) for code, limits in jobs]
    pool = ThreadPoolExecutor(workers)
    try:
        return list(pool.map(lambda job: run(job[0], **job[1]), jobs))
    except KeyboardInterrupt:
        with _pool_lock:
            for launcher in _busy:
                launcher.stop()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# -----------------------------------------------------------------------------
# Tool-integrated reasoning: cells of a response -> a program -> what the model reads back

CELL = re.compile(r"```python[ \t]*\n(.*?)```", re.DOTALL)


def extract_cells(text: str) -> list:
    """The ```python blocks of a response, in order."""
    return [cell.rstrip("\n") + "\n" if cell.strip() else cell for cell in CELL.findall(text)]


def program_for_cells(cells: list) -> str:
    """The program run for the LAST cell: earlier cells are replayed first, silenced, their
    exceptions swallowed (as in a notebook where they already ran), so their variables exist."""
    if not cells:
        return ""
    if len(cells) == 1:
        return cells[0]
    replay = (
        "import contextlib as _tocode_contextlib, io as _tocode_io\n"
        f"for _tocode_cell in {list(cells[:-1])!r}:\n"
        "    try:\n"
        "        with _tocode_contextlib.redirect_stdout(_tocode_io.StringIO()), "
        "_tocode_contextlib.redirect_stderr(_tocode_io.StringIO()):\n"
        "            exec(compile(_tocode_cell, '<earlier cell>', 'exec'), globals())\n"
        "    except BaseException:\n"
        "        pass\n"
        "del _tocode_cell, _tocode_contextlib, _tocode_io\n"
    )
    return replay + cells[-1]


def format_output(result: Result, max_chars: int = 512) -> str:
    """What the model reads inside its ```output block."""
    if result.status in ("ok", "output_limit"):
        text = result.stdout.rstrip()
    elif result.status == "sandbox_error":
        text = "SandboxError: the code could not be run"
    else:
        text = result.error or result.status
    if len(text) > max_chars:
        text = text[:max_chars] + f"\n... [{len(text) - max_chars} more characters]"
    if result.status == "output_limit":
        text += "\n" + result.error
    return text


def tool(responses: list, timeout: float = TIMEOUT, memory_mb: int = MEMORY_MB, workers=None) -> list:
    """The sampler's callback: each response text ends right after "```output"; run its cells."""
    programs = [program_for_cells(extract_cells(text)) for text in responses]
    runnable = [i for i, program in enumerate(programs) if program.strip()]
    results = dict(zip(runnable, run_many([programs[i] for i in runnable], workers=workers,
                                          timeout=timeout, memory_mb=memory_mb)))
    no_code = Result(status="error", error="SyntaxError: no python code block to run")
    return [(format_output(results.get(i, no_code)), results.get(i, no_code).status) for i in range(len(responses))]


# -----------------------------------------------------------------------------
# The trainer's side: a pool of launchers, one per concurrent run

# The launcher's own environment: CHILD_ENV, plus a memory layout that makes fork() cheaper. A
# fork copies one page-table entry per 4 KiB page of the ~45 MB the pre-loaded modules occupy;
# with all Python objects in glibc's heap (PYTHONMALLOC=malloc) and that heap on transparent huge
# pages, it copies one entry per 2 MiB instead (a child's write still copies only 4 KiB).
LAUNCHER_ENV = dict(CHILD_ENV, PYTHONMALLOC="malloc", GLIBC_TUNABLES="glibc.malloc.hugetlb=1")


class Launcher:
    """One launcher process. hello: what it reported once set up: features (the protections it has), notes (those it
    lacks), uid (its runs' uid, 0 as non-root), pid (the process that serves, as this machine's /proc shows it) and
    base (the dir its runs' work dirs are made in)."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-s", os.path.abspath(__file__), "--launcher"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=LAUNCHER_ENV, close_fds=True)
        try:
            _send(self.proc.stdin.fileno(), {"sys_path": [p for p in sys.path if p], "disable": list(DISABLE),
                                             "preload": list(PRELOAD)})
            self.hello = self.receive(timeout=120)
        except BaseException:
            self.close(graceful=False)
            raise

    def receive(self, timeout):
        fd = self.proc.stdout.fileno()
        if not select.select([fd], [], [], timeout)[0]:
            raise TimeoutError("launcher did not answer")
        return _recv(fd)

    def stop(self):
        """SIGTERM: the launcher kills its run, removes its work dirs and cgroup, and exits (not waited for here)."""
        if self.proc.poll() is None:
            self.proc.terminate()

    def close(self, graceful=True):
        """Graceful: EOF on its stdin, which an idle launcher answers by removing its work dirs and cgroup and
        exiting. Otherwise (a run cut short) SIGTERM first. SIGKILL if either takes more than 2 s."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        if not graceful:
            self.stop()
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()

    def stopped_by_signal(self):
        return self.proc.poll() in [-s for s in STOP_SIGNALS]


_idle = []   # launchers waiting for a run
_busy = set()  # launchers running one
_pool_lock = threading.Lock()
_pool_pid = None
_warned = False


def _checkout():
    global _pool_pid, _warned
    with _pool_lock:
        if _pool_pid != os.getpid():  # after a fork of the trainer, the launchers are not ours
            _idle.clear()
            _busy.clear()
            _pool_pid = os.getpid()
        while _idle:
            launcher = _idle.pop()
            if launcher.proc.poll() is None:
                return launcher
    launcher = Launcher()
    if launcher.hello["notes"] and not _warned:
        _warned = True
        print("sandbox.py: WARNING, weaker isolation on this machine:\n  " + "\n  ".join(launcher.hello["notes"]),
              file=sys.stderr)
    return launcher


def _release(launcher):
    with _pool_lock:
        _busy.discard(launcher)
        if launcher.proc.returncode is None and not launcher.proc.stdin.closed:
            _idle.append(launcher)


@atexit.register
def shutdown():
    """Stop the idle launchers (they also exit by themselves when the trainer dies: EOF)."""
    with _pool_lock:
        while _idle:
            _idle.pop().close()


# Trainer and launcher talk over pipes in length-prefixed JSON messages.
def _send(fd, obj):
    data = json.dumps(obj).encode()
    data = struct.pack("I", len(data)) + data
    while data:
        data = data[os.write(fd, data):]


def _recv(fd):
    def exactly(n):
        buf = b""
        while len(buf) < n:
            chunk = os.read(fd, n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf
    (n,) = struct.unpack("I", exactly(4))
    return json.loads(exactly(n))


# -----------------------------------------------------------------------------
# The launcher: a pre-started interpreter that sets up once what its runs share, then forks one
# limited child per request

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Stopped(BaseException):
    """Raised in the launcher by a stop signal: the `finally`s on the way out kill the run and remove what we made."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _stop(signum, frame):
    _ignore_stop_signals()  # once: a second Ctrl-C must not cut the cleanup short
    raise _Stopped(signum)


def _ignore_stop_signals():
    for sig in STOP_SIGNALS:  # a handler that does nothing, not SIG_IGN: one already on its way still finds a handler
        signal.signal(sig, lambda signum, frame: None)


_owner = ""     # "pid-starttime" of this launcher, in the names of what it makes
_made = {}      # what it made, removed on its way out: "base" (a dir), "base_mounted", "cgroup"
_lifeline = ()  # a pipe whose write end only the launcher holds: at EOF in a child, the launcher is gone


def launcher_main():
    """Entry point of `python sandbox.py --launcher`. It exits when the trainer closes the pipe or dies (EOF), or on
    a stop signal (then it dies of that signal), removing its dirs and cgroup either way. Not PR_SET_PDEATHSIG for
    the launcher: that fires when the trainer's *thread* that started us ends, e.g. a run_many worker thread."""
    global _owner, _lifeline
    for sig in STOP_SIGNALS:  # what nohup or a shell's `&` ignores stays ignored, except SIGTERM, our own stop
        if sig == signal.SIGTERM or signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _stop)
    atexit.register(_remove_what_we_made)
    try:
        _owner = _owner_tag(os.getpid())  # before any namespace: the pid all of the machine sees
        _remove_stale_dirs()
        hello = _recv(0)
        sys.path[:] = hello["sys_path"]
        disable = set(hello["disable"])
        notes = []  # what could not be set up, reported once to the trainer
        features = {}
        is_root = os.geteuid() == 0  # asked before the user namespace, inside which we are root
        _enter_namespaces(features, notes, disable, is_root)
        _lifeline = os.pipe()
        python_paths = sorted({os.path.realpath(p) for p in (
            sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable)),
            *sys.path) if os.path.exists(p)})
        _find_protections(features, notes, disable, is_root, python_paths)
        run_uid = UID_BASE + os.getpid() if is_root else 0
        _preload(hello["preload"])
        base, own_mount_ns = _make_base_dir()
        if run_uid:
            _open_to_runs(features, notes, [*python_paths, base], own_mount_ns)
        _keep_protections_that_work(features, notes, disable, base, run_uid)
        _send(1, {"features": features, "notes": notes, "uid": run_uid, "pid": int(os.readlink("/proc/self")),
                  "base": base})
        _serve(base, features, run_uid)
    except _Stopped as stop:
        _remove_what_we_made()
        signal.signal(stop.signum, signal.SIG_DFL)
        os.kill(os.getpid(), stop.signum)  # die of it, as its sender (a shell, a process manager) expects
        os._exit(128 + stop.signum)  # PID 1 of a namespace cannot: the process above it will (see below)
    finally:
        _remove_what_we_made()


def _remove_what_we_made():
    """Our work dirs and cgroup (a run, if any, is already dead: execute's `finally` saw to it). Idempotent."""
    _ignore_stop_signals()
    if "base" in _made:
        if _made.get("base_mounted"):
            libc.umount2(_made["base"].encode(), 2)  # MNT_DETACH
        shutil.rmtree(_made["base"], ignore_errors=True)
    if "cgroup" in _made:
        remove_cgroup(_made["cgroup"])
    _made.clear()


def _owner_tag(pid):
    """'pid-starttime' of a process: a pid alone may since have been given to another process."""
    return f"{pid}-{_stat_fields(pid)[19]}"  # field 22, starttime


def _stat_fields(pid):
    """/proc/PID/stat from its third field (state) on."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def _owner_gone(tag):
    """Whether the launcher named by `tag` ('pid-starttime', or a bare pid in older names) has ended."""
    pid, _, start = tag.partition("-")
    try:
        fields = _stat_fields(int(pid))
    except FileNotFoundError:
        return True
    except OSError:  # cannot tell (e.g. /proc mounted hidepid): leave it
        return False
    return fields[0] in "ZX" or bool(start) and fields[19] != start  # a zombie runs no code; or the pid was reused


def _remove_stale_dirs():
    """The base dirs of our own launchers that were killed (SIGKILL, the OOM killer) before they could remove them."""
    tmp = tempfile.gettempdir()
    for name in os.listdir(tmp):
        match = re.fullmatch(r"tocode-sandbox-(\d+(?:-\d+)?)-\w{8}", name)
        if not match:
            continue
        path = os.path.join(tmp, name)
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and _owner_gone(match[1]):
            shutil.rmtree(path, ignore_errors=True)


def _enter_namespaces(features, notes, disable, is_root):
    """The namespaces the launcher lives in for its whole life (as non-root, a user namespace
    first, then a network namespace), and a check that runs can get PID namespaces. Records in
    `features` what worked and in `notes` what did not."""
    if not is_root:  # an unprivileged user namespace gives us the rights to make the others
        try:
            uid, gid = os.geteuid(), os.getegid()
            unshare(CLONE_NEWUSER)
            for path, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
                with open(f"/proc/self/{path}", "w") as f:
                    f.write(text)
        except OSError as e:
            notes.append(f"no user namespace ({e.strerror}), so no other namespace either")
    try:  # a network namespace for the launcher's life: its runs see no interface at all
        if "net_ns" in disable:
            raise OSError(0, "disabled")
        unshare(CLONE_NEWNET)
        features["net_ns"] = True
    except OSError as e:
        notes.append(f"no network namespace ({e.strerror}): network blocked only by Landlock/seccomp")
    try:
        if "pid_ns" in disable:
            raise OSError(0, "disabled")
        if not is_root:
            # We may only return (setns) to a PID namespace our user namespace owns: so the
            # launcher proper becomes PID 1 of one of its own, and this process just waits.
            unshare(CLONE_NEWPID)
            _become_pid1_of_own_namespace()
            _own_pid_ns()
        unshare(CLONE_NEWPID)
        setns(_own_pid_ns(), CLONE_NEWPID)
        features["pid_ns"] = features["proc"] = True
    except OSError as e:
        notes.append(f"no PID namespace ({e.strerror}): escaped processes are swept by a subreaper instead")


def _become_pid1_of_own_namespace():
    """fork(): the child, PID 1 of the namespace just unshared, goes on as the launcher proper; this process (the
    one the trainer started) only passes the stop signals on, waits, and ends as the child did, dying of the stop
    signal the child exited 128 + of. The child dies with it: if this process is SIGKILLed, PID 1 is, and with it
    the namespace, every run included."""
    lifeline_r, lifeline_w = os.pipe()
    launcher = os.fork()
    if launcher == 0:
        os.close(lifeline_w)
        die_with_parent(lifeline_r)
        return
    os.close(lifeline_r)
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, lambda signum, frame: os.kill(launcher, signum))
    code = os.waitstatus_to_exitcode(os.waitpid(launcher, 0)[1])
    signum = -code if code < 0 else code - 128 if code - 128 in STOP_SIGNALS else 0
    if signum:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    os._exit(code & 0xFF)


def _find_protections(features, notes, disable, is_root, python_paths):
    """The other protections this kernel offers (kept or dropped by the probe that follows): a
    mount namespace, the memory cgroup, Landlock, seccomp. Also makes us the child subreaper."""
    features["mount_ns"] = True  # kept if the probe can make one
    try:
        if "cgroup" in disable or not is_root:
            raise OSError(0, "disabled" if is_root else "not root")
        features["cgroup"] = make_memory_cgroup(_owner)
        _made["cgroup"] = features["cgroup"][0]
    except (OSError, StopIteration) as e:
        notes.append(f"no memory cgroup ({getattr(e, 'strerror', e)}): memory is bounded per process only "
                     f"(RLIMIT_AS x PROCESSES)")
    prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of a run come back to us, not to init
    abi = landlock_abi()
    if abi:
        features["landlock"] = abi
        features["readable"] = sorted({os.path.realpath(p) for p in (*READABLE, *python_paths) if os.path.exists(p)})
    else:
        notes.append("no Landlock: files outside the work dir are protected only by file permissions")
    if SECCOMP_ARCH:
        features["seccomp"] = True
    else:
        notes.append(f"no seccomp filter on this architecture ({MACHINE}; its syscall numbers are known here for "
                     f"x86_64 and aarch64 only): socket(2) is not refused, so unix sockets elsewhere on the machine "
                     f"are reachable where file permissions allow")


def _preload(names):
    for name in names:  # a failed optional import is the snippet's problem later, not ours
        try:
            __import__(name)
        except Exception:
            pass
    import resource  # noqa: F401 (imported here once, not in every child)
    gc.freeze()  # the pre-loaded objects are never scanned by a child's gc, so never copied-on-write


def _make_base_dir():
    """The dir the runs' work dirs are made in: on a tmpfs of ours where we can mount one, as
    rmdir on ext4 can take ms. Its name carries our pid and start time, so that a later launcher
    can tell a dead owner. Returns (base, whether we have a private mount namespace)."""
    base = tempfile.mkdtemp(prefix=f"tocode-sandbox-{_owner}-")
    _made["base"] = base
    os.chmod(base, 0o711)  # the run's uid must be able to reach its work dir
    try:
        unshare(CLONE_NEWNS)
        mount(None, "/", None, MS_REC | MS_PRIVATE)
    except OSError:
        return base, False
    try:
        mount("tocode", base, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0711")
        _made["base_mounted"] = True
    except OSError:
        pass
    return base, True


def _open_to_runs(features, notes, paths, own_mount_ns):
    """A root run has no capability, so it reaches a file only through dirs other users may enter.
    Where Python's dirs (or our base dir) lie below one they may not (a pyenv under a 0700 /root),
    cover that dir, in our own mount namespace (the runs get a copy, nobody else sees it), with a
    tmpfs others may enter holding bind mounts of just the entries on the way. If that cannot be
    done, the runs keep CAP_DAC_READ_SEARCH, and the trainer is told what that means. (A dir that
    is itself closed to others stays closed: that is its owner's choice.)"""
    def blockers():  # {closed dir: the names below it on the way to our paths}
        found = {}
        for path in paths:
            blocker = _closed_on_the_way(path)
            if blocker and blocker != path:
                found.setdefault(blocker, set()).add(path[len(blocker):].strip("/").split("/")[0])
        return found

    for _ in range(16):  # each pass opens the first closed dir on the way to each path
        closed = blockers()
        if not closed or not own_mount_ns:
            break
        try:
            for directory, names in closed.items():
                _cover(directory, names)
        except OSError:
            break
    closed = blockers()
    if closed:
        features["read_search"] = True
        notes.append(f"runs keep CAP_DAC_READ_SEARCH, as {min(closed)} is closed to other users: a run can read "
                     f"every file on this machine" + (" that Landlock allows (the system's dirs, /etc included)"
                                                        if "landlock" in features else ""))


def _closed_on_the_way(path):
    """The first dir on the way to `path`, itself included, that other users may not enter; or None."""
    here = "/"
    for part in [""] + path.strip("/").split("/"):
        here = os.path.join(here, part)
        if not os.stat(here).st_mode & stat.S_IXOTH:
            return here
    return None


def _cover(directory, names):
    """Mount over `directory` a tmpfs others may enter, holding bind mounts of its entries `names`."""
    keep = {name: os.open(os.path.join(directory, name), os.O_PATH | os.O_CLOEXEC) for name in names}
    try:
        mount("tocode", directory, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0711")
        for name, fd in keep.items():
            target = os.path.join(directory, name)
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                os.mkdir(target)
            else:
                os.close(os.open(target, os.O_CREAT | os.O_WRONLY))
            mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC)
    finally:
        for fd in keep.values():
            os.close(fd)


def _keep_protections_that_work(features, notes, disable, base, run_uid):
    """Probe: add the optional protections one at a time, keeping each whose setup works here;
    later runs then treat any setup failure as our error rather than silently running less
    protected."""
    wanted = {name: features.pop(name) for name in ("cgroup", "mount_ns", "proc", "landlock", "seccomp") if name in features}
    for name, value in wanted.items():
        if name in disable or name == "proc" and "mount_ns" not in features:
            notes.append(f"no {name}")
            continue
        probe = execute_safely({"code": "pass", "limits": DEFAULT_LIMITS}, base, dict(features, **{name: value}), run_uid)
        if probe["status"] == "ok":
            features[name] = value
        else:
            if name == "cgroup":
                remove_cgroup(_made.pop("cgroup"))
            notes.append(f"could not set up {name} ({probe['error']}): running without it")
    if "mount_ns" not in features and not _made.get("base_mounted"):
        notes.append("no tmpfs for the work dirs: a run's disk use is bounded per file only (RLIMIT_FSIZE)")


def _serve(base, features, run_uid):
    """Answer the trainer's requests, one run each, until it closes the pipe."""
    while True:
        try:
            request = _recv(0)
        except EOFError:
            break
        try:
            _send(1, execute_safely(request, base, features, run_uid))
        except BrokenPipeError:  # the trainer died during the run
            break


# -----------------------------------------------------------------------------
# One run, as the launcher sees it: fork the child, read its output, enforce the clock, kill, reap

def execute_safely(request, base, features, run_uid):
    try:
        return execute(request, base, features, run_uid)
    except Exception as e:  # e.g. fork() failing: our failure, reported, and the launcher lives on
        return dict(status="sandbox_error", stdout="", stderr="", elapsed=0.0, truncated=False,
                    error=f"SandboxError: {type(e).__name__}: {e}")


def execute(request, base, features, run_uid):
    """One run: fork the child, feed its output through a byte cap, enforce the clock, kill, reap.
    Whatever fails or stops us on the way, nothing of the run stays: no process, pipe or work dir."""
    limits = request["limits"]
    if "cgroup" in features:  # the tree's new pages: the snippet's memory, its files in tmpfs, some slack
        group, limit_file, events_file = features["cgroup"]
        with open(f"{group}/{limit_file}", "w") as f:
            f.write(str((limits["memory_mb"] + 2 * limits["disk_mb"] + 64) << 20))
        oom_before = oom_kills(group, events_file)
    if "mount_ns" not in features and _made.get("base_mounted"):
        # No tmpfs of the run's own: its work dir is on ours, which gets the run's budget.
        mount("tocode", base, "tmpfs", MS_REMOUNT | MS_NOSUID | MS_NODEV,
              f"size={limits['disk_mb']}m,nr_inodes={limits['max_files'] + 2},mode=0711")
    workdir = tempfile.mkdtemp(dir=base)
    pid = None
    ours = {}  # our ends of the pipes, by inode: closed below if _watch could not close them
    try:
        out_r, out_w = os.pipe()
        ours[out_r] = os.fstat(out_r).st_ino
        err_r, err_w = os.pipe()
        ours[err_r] = os.fstat(err_r).st_ino
        status_r, status_w = os.pipe()
        ours[status_r] = os.fstat(status_r).st_ino
        start = time.monotonic()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # a stop signal must not come between fork and pid =
        try:
            pid = _fork_child(request, workdir, features, run_uid, (out_w, err_w, status_w))
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        verdict, stdout, stderr, status_msg, wait_status, usage = _watch(pid, out_r, err_r, status_r, start, limits,
                                                                         features)
    except BaseException:
        if pid is not None:
            _kill_and_reap(pid, features)
        raise
    finally:
        for fd, inode in ours.items():
            try:
                if os.fstat(fd).st_ino == inode:
                    os.close(fd)
            except OSError:
                pass
        _remove_workdir(workdir)
    elapsed = time.monotonic() - start
    cap = limits["output_bytes"]
    result = dict(stdout=bytes(stdout[:cap]).decode("utf-8", "replace"),
                  stderr=bytes(stderr[:cap]).decode("utf-8", "replace"),
                  elapsed=elapsed, truncated=len(stdout) > cap or len(stderr) > cap, error="")
    if "cgroup" in features and oom_kills(group, events_file) > oom_before:  # the cause of whatever followed
        verdict = verdict if verdict == "output_limit" else "memory"
    return _classify(result, verdict, status_msg, wait_status, usage, limits)


def _remove_workdir(workdir):
    try:
        os.rmdir(workdir)  # the tmpfs was on top of it; it is empty again
    except OSError:
        shutil.rmtree(workdir, ignore_errors=True)


def _fork_child(request, workdir, features, run_uid, child_fds):
    """fork() the child, PID 1 of a fresh PID namespace where we may; close the child's ends of
    the pipes here, whether fork() worked or not."""
    try:
        if "pid_ns" in features:
            unshare(CLONE_NEWPID)  # the next fork() is PID 1 of a fresh namespace ...
        pid = os.fork()
        if pid == 0:
            child_main(request, workdir, *child_fds, features, run_uid)
    finally:
        if "pid_ns" in features:
            setns(_own_pid_ns(), CLONE_NEWPID)  # ... and only that one
        for fd in child_fds:
            os.close(fd)
    return pid


def _kill_and_reap(pid, features):
    """After _watch failed or was stopped: the child killed and reaped unless it already was, and
    without a PID namespace its orphans too."""
    try:
        if os.waitpid(pid, os.WNOHANG) == (0, 0):  # still running; not reaped, so the pid is still the child's
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    except ChildProcessError:
        pass  # _watch reaped it
    if "pid_ns" not in features:
        sweep()


POLL_S = 0.01  # without a pidfd, how often _watch asks whether the child has exited


def _watch(pid, out_r, err_r, status_r, start, limits, features):
    """Read the child's pipes until the tree has ended (PID 1 exited: the namespace is gone, all
    pipes reach EOF), the clock runs out, or the output passes the cap; then kill the whole tree
    and reap it. Returns (verdict or None, stdout bytes, stderr bytes, the child's setup message,
    wait status, rusage); stdout and stderr hold at most one byte over the cap."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # EMFILE, or ENOSYS before Linux 5.3: then we ask every POLL_S whether it exited
        pidfd = None
    outputs = {out_r: bytearray(), err_r: bytearray()}
    open_fds = [out_r, err_r, status_r] + ([pidfd] if pidfd is not None else [])
    status_msg = bytearray()
    deadline = start + limits["setup_timeout"]  # the snippet's clock starts when setup reports "R"
    started = False
    cap = limits["output_bytes"]
    verdict = None
    exited = False
    while (open_fds or not exited) and verdict is None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            verdict = "timeout"
            break
        ready, _, _ = select.select(open_fds, [], [], remaining if pidfd is not None else min(remaining, POLL_S))
        if not exited and (pidfd in ready if pidfd is not None else
                           os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None):
            exited = True
            if pidfd is not None:
                open_fds.remove(pidfd)
            _, wait_status, usage = os.wait4(pid, 0)
            if "pid_ns" not in features:
                sweep()  # without a PID namespace, escaped descendants could hold the pipes open
        for fd in ready:
            if fd == pidfd:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                open_fds.remove(fd)
            elif fd == status_r:
                status_msg += chunk[:4096]
                if not started and status_msg.startswith(b"R"):
                    started = True
                    deadline = time.monotonic() + limits["timeout"]
            else:
                outputs[fd] += chunk[: cap + 1 - len(outputs[fd])]
                if len(outputs[fd]) > cap:
                    verdict = "output_limit"
    # Kill the whole tree: PID 1 dying takes its namespace with it; otherwise sweep orphans.
    if not exited:
        os.kill(pid, signal.SIGKILL)  # not reaped yet, so the pid cannot have been reused
        _, wait_status, usage = os.wait4(pid, 0)
    if "pid_ns" not in features:
        sweep()
    status_msg += _read_nonblocking(status_r)
    for fd in (out_r, err_r, status_r) + ((pidfd,) if pidfd is not None else ()):
        os.close(fd)
    return verdict, outputs[out_r], outputs[err_r], status_msg, wait_status, usage


def _classify(result, verdict, status_msg, wait_status, usage, limits):
    """The run's status and error line: our failure if the child's setup did not finish, else the
    watcher's verdict, else what the snippet's exit (and its stderr) says."""
    stderr = result["stderr"]
    if not status_msg.startswith(b"R"):  # died before the snippet started: our failure
        return dict(result, status="sandbox_error", error=status_msg.decode(errors="replace") or "sandbox setup did not finish")
    if verdict:
        return dict(result, status=verdict, error={
            "timeout": f"TimeoutError: execution timed out after {limits['timeout']:g} s",
            "output_limit": f"OutputLimitError: output exceeded {limits['output_bytes']} bytes",
            "memory": "MemoryError: the run's processes together exceeded the memory limit"}[verdict])
    code = os.waitstatus_to_exitcode(wait_status)
    if code == 0:
        return dict(result, status="ok")
    lines = [line for line in stderr.splitlines() if line.strip()]
    last = lines[-1].strip() if lines else ""
    if code in (-signal.SIGXCPU, -signal.SIGKILL) and usage.ru_utime + usage.ru_stime >= int(limits["timeout"]) + 1:
        return dict(result, status="timeout", error="TimeoutError: CPU time limit exceeded")
    if code < 0:
        last = f"killed by signal {signal.Signals(-code).name}"
    if "MemoryError" in last or "Cannot allocate memory" in stderr[-2000:]:
        return dict(result, status="memory", error=last if "MemoryError" in last else "MemoryError: memory limit exceeded")
    return dict(result, status="error", error=last or f"exit code {code}")


_own_ns_fd = None


def _own_pid_ns():
    """An fd of the launcher's own PID namespace, to return to (setns) after each
    unshare(CLONE_NEWPID), so that only the run's PID 1 lands in a fresh one."""
    global _own_ns_fd
    if _own_ns_fd is None:
        _own_ns_fd = os.open("/proc/self/ns/pid", os.O_RDONLY)
    return _own_ns_fd


def _read_nonblocking(fd):
    data = b""
    while select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data


def sweep():
    """Kill and reap every child of the launcher (the subreaper): orphans of a run land here.
    Repeated, because killing a process re-parents its own children to us."""
    for _ in range(1000):
        children = set()
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/children") as f:
                    children.update(int(p) for p in f.read().split())
            except OSError:
                pass
        if not children:
            return
        for child in children:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for child in children:
            try:
                os.waitpid(child, 0)
            except ChildProcessError:
                pass


# -----------------------------------------------------------------------------
# The child: what happens between fork() and the snippet's first line

def child_main(request, workdir, stdout_w, stderr_w, status_w, features, run_uid):
    """Runs in the forked child (PID 1 of its namespace when permitted). Never returns."""
    limits = request["limits"]
    try:
        os.close(_lifeline[1])  # the launcher's end: only it may hold one
        for sig in (*STOP_SIGNALS, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by the launcher around fork()
        os.setsid()
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as in a normal interpreter: BrokenPipeError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large file raises OSError instead
        writable = []
        if "mount_ns" in features:
            unshare(CLONE_NEWNS)
            mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount leaks to the host
            # The work dir is a private tmpfs: total bytes and file count are bounded, and it
            # vanishes with the namespace, whatever the snippet left in it.
            mount("tocode", workdir, "tmpfs", MS_NOSUID | MS_NODEV,
                  f"size={limits['disk_mb']}m,nr_inodes={limits['max_files']},mode=0700,uid={run_uid},gid={run_uid}")
            if os.path.isdir("/dev/shm"):  # multiprocessing's semaphores live here
                mount("tocode", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV,
                      f"size={limits['disk_mb']}m,nr_inodes=256,mode=1777")
                writable.append("/dev/shm")
            if "proc" in features:  # a /proc of our PID namespace: other processes (and their environ) are invisible
                mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        elif run_uid:
            os.chown(workdir, run_uid, run_uid)
        if "cgroup" in features:  # "0": this process; its descendants follow
            with open(f"{features['cgroup'][0]}/cgroup.procs", "w") as f:
                f.write("0")
        os.chdir(workdir)
        # stdin reads EOF; stdout/stderr are the launcher's capped pipes; nothing else stays open
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(stdout_w, 1)
        os.dup2(stderr_w, 2)
        low, high = sorted((status_w, _lifeline[0]))
        for start, stop in ((3, low), (low + 1, high), (high + 1, 65536)):
            os.closerange(start, stop)
        os.environ.clear()
        os.environ.update(CHILD_ENV, HOME=workdir, TMPDIR=workdir)
        tempfile.tempdir = workdir  # the launcher's cached choice (/tmp) is not writable here
        import resource
        cpu = int(limits["timeout"]) + 2
        for name, value in (("RLIMIT_CPU", cpu), ("RLIMIT_FSIZE", limits["file_size_mb"] << 20),
                            ("RLIMIT_NOFILE", limits["open_files"]), ("RLIMIT_CORE", 0),
                            ("RLIMIT_NPROC", limits["processes"])):
            resource.setrlimit(getattr(resource, name), (value, value))
        keep = 1 << CAP_DAC_READ_SEARCH if "read_search" in features else 0  # see _open_to_runs
        drop_bounding_set(keep)  # while we still have CAP_SETPCAP: no exec can regain a capability
        if run_uid:  # root: become nobody-like, so NPROC counts and file permissions apply
            os.setgroups([])
            os.setresgid(run_uid, run_uid, run_uid)
            if keep:
                prctl(PR_SET_KEEPCAPS, 1)
            os.setresuid(run_uid, run_uid, run_uid)
        keep_only_capabilities(keep)  # also as root of a user namespace: no capability is needed
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        if "landlock" in features:
            landlock_restrict(features["landlock"], workdir, features["readable"], [os.devnull] + writable)
        if "seccomp" in features:
            seccomp_deny_socket()
        die_with_parent(_lifeline[0])  # here, after the uid switch, which clears the parent-death signal
        # RLIMIT_AS last and relative: the forked interpreter already maps numpy and sympy
        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        address_space = mapped + (limits["memory_mb"] << 20)
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    except BaseException as e:
        try:
            os.write(status_w, f"setup failed: {e!r}".encode()[:4000])
        finally:
            os._exit(111)
    os.write(status_w, b"R")  # setup done: from here on, everything is the snippet's doing
    os.close(status_w)
    rc = 1
    try:
        rc = run_snippet(request["code"])
    finally:
        os._exit(rc)


def run_snippet(code):
    import builtins, io, linecache, traceback, types
    atexit._clear()  # the launcher's exit handlers are not the snippet's
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="backslashreplace")
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
                                  line_buffering=True)
    sys.argv = ["<cell>"]
    linecache.cache["<cell>"] = (len(code), None, code.splitlines(True), "<cell>")  # tracebacks show source
    rc = 0
    try:
        main = types.ModuleType("__main__")  # a fresh __main__, so pickling the snippet's classes works
        main.__builtins__ = builtins
        sys.modules["__main__"] = main
        exec(compile(code, "<cell>", "exec"), main.__dict__)
        threading._shutdown()  # like a normal interpreter: wait for non-daemon threads
        atexit._run_exitfuncs()
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if rc and e.code is not None:
            print(f"SystemExit: {e.code}", file=sys.stderr)
    except BaseException as e:
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)  # from the snippet's frame on
        rc = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    return rc


# -----------------------------------------------------------------------------
# Kernel interfaces through ctypes (no dependencies): unshare/mount/prctl, Landlock, seccomp, capset

libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 32, 4096, 0x4000, 1 << 18
PR_SET_PDEATHSIG, PR_SET_KEEPCAPS, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 1, 8, 38, 22
PR_SET_CHILD_SUBREAPER, PR_CAPBSET_DROP = 36, 24
CAP_DAC_READ_SEARCH = 2
MACHINE = os.uname().machine
# For the seccomp filter, what differs per architecture: (socket's syscall number, audit arch)
SECCOMP_ARCH = {"x86_64": (41, 0xC000003E), "aarch64": (198, 0xC00000B7)}.get(MACHINE)
# Syscalls added since Linux 5.1 have one number on every architecture but alpha, ia64 and mips
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446


def _check(ret, what):
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def unshare(flags):
    _check(libc.unshare(flags), "unshare")


def setns(fd, nstype):
    _check(libc.setns(fd, nstype), "setns")


def mount(source, target, fstype, flags, data=None):
    enc = lambda s: s.encode() if s is not None else None
    _check(libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def prctl(option, arg):
    _check(libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl {option}")


def die_with_parent(lifeline_r):
    """SIGKILL when our parent ends (PR_SET_PDEATHSIG), and the classic race closed: had the parent
    ended before, the lifeline (a pipe whose write end only the parent holds) would be at EOF. Not
    getppid(): as PID 1 of a PID namespace we see our parent as 0 whether it lives or not."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if select.select([lifeline_r], [], [], 0)[0]:
        os._exit(1)
    os.close(lifeline_r)


def make_memory_cgroup(owner):
    """A memory cgroup for this launcher's runs: RLIMIT_AS bounds one process, this bounds the
    whole tree (32 forked children x 1 GB each would otherwise be 32 GB). cgroup v1 (a `memory`
    hierarchy) or v2 (unified, where the kernel lets us enable the controller). Named after its
    `owner` ('pid-starttime'); those of owners that have ended are removed. Returns (dir, limit
    file, events file) or raises OSError."""
    with open("/proc/self/cgroup") as f:
        lines = [line.rstrip("\n").split(":", 2) for line in f]
    v1 = [path for _, controllers, path in lines if "memory" in controllers.split(",")]
    if v1 and os.path.isdir("/sys/fs/cgroup/memory"):
        parent, limit_file, events_file = f"/sys/fs/cgroup/memory{v1[0]}", "memory.limit_in_bytes", "memory.oom_control"
    else:
        parent = "/sys/fs/cgroup" + next(path for hierarchy, _, path in lines if hierarchy == "0")
        limit_file, events_file = "memory.max", "memory.events"
        with open(f"{parent}/cgroup.subtree_control", "w") as f:
            f.write("+memory")
    for name in os.listdir(parent):  # groups left by launchers that were killed
        match = re.fullmatch(r"tocode-(\d+(?:-\d+)?)", name)
        if match and _owner_gone(match[1]):
            remove_cgroup(f"{parent}/{name}")
    group = f"{parent}/tocode-{owner}"
    os.makedirs(group, exist_ok=True)
    if not os.path.exists(f"{group}/{limit_file}"):
        raise OSError(0, f"no {limit_file} in {group}")
    return group, limit_file, events_file


def remove_cgroup(group):
    """rmdir one of our cgroups, first killing what is still in it: only a run of a launcher that
    died can be (its pids are read from the group itself, so nothing else is signalled)."""
    for _ in range(200):  # killed processes leave the group within ms
        try:
            os.rmdir(group)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                return
        try:
            with open(f"{group}/cgroup.procs") as f:
                pids = [int(pid) for pid in f.read().split()]
        except OSError:
            pids = []
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def oom_kills(group, events_file):
    with open(f"{group}/{events_file}") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith("oom_kill "))


def drop_bounding_set(keep):
    """Every capability but those in the bit mask `keep` out of the bounding set: no exec regains one."""
    for cap in range(64):
        if not keep >> cap & 1 and libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) == -1:
            if ctypes.get_errno() == errno.EINVAL:  # past the last capability this kernel knows
                return
            _check(-1, "prctl PR_CAPBSET_DROP")


def keep_only_capabilities(keep):
    """Effective, permitted and inheritable sets: every capability but those in the bit mask `keep` (< 32) out."""
    header = struct.pack("Ii", 0x20080522, 0)            # _LINUX_CAPABILITY_VERSION_3, this process
    data = struct.pack("IIIIII", keep, keep, 0, 0, 0, 0)  # effective, permitted, inheritable (x2)
    _check(libc.capset(header, data), "capset")


def landlock_abi():
    if MACHINE.startswith(("alpha", "ia64", "mips")):  # Landlock's syscall numbers differ there
        return 0
    try:
        return max(0, libc.syscall(SYS_LANDLOCK_CREATE_RULESET, None, 0, 1))  # 1 = CREATE_RULESET_VERSION
    except Exception:
        return 0


def landlock_restrict(abi, workdir, readable, extra_writable):
    """Reading and executing below `readable`; writing only below workdir (+ /dev/null, a private
    /dev/shm); with ABI >= 4 no TCP bind/connect (no rule allows any port); with ABI >= 6 no
    signals and no abstract unix sockets outside this Landlock domain."""
    read = 1 | 4 | 8  # EXECUTE | READ_FILE | READ_DIR
    everything = (1 << 13) - 1  # EXECUTE .. MAKE_SYM (ABI 1)
    if abi >= 2: everything |= 1 << 13  # REFER
    if abi >= 3: everything |= 1 << 14  # TRUNCATE
    net = 0b11 if abi >= 4 else 0        # BIND_TCP | CONNECT_TCP
    scoped = 0b11 if abi >= 6 else 0     # ABSTRACT_UNIX_SOCKET | SIGNAL
    attr = struct.pack("QQQ", everything, net, scoped)
    size = 8 if abi < 4 else (16 if abi < 6 else 24)
    ruleset = _check(libc.syscall(SYS_LANDLOCK_CREATE_RULESET, attr, size, 0), "landlock_create_ruleset")
    try:
        def allow(path, access):
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = struct.pack("=Qi", access, fd)  # struct landlock_path_beneath_attr is packed
                _check(libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, 1, rule, 0), f"landlock_add_rule {path}")
            finally:
                os.close(fd)
        for path in readable:
            allow(path, read if os.path.isdir(path) else 1 | 4)
        allow(workdir, everything)
        for path in extra_writable:
            allow(path, everything if os.path.isdir(path) else 1 | 2 | 4 | (1 << 14 if abi >= 3 else 0))
        _check(libc.syscall(SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0), "landlock_restrict_self")
    finally:
        os.close(ruleset)


def seccomp_deny_socket():
    """A 6-instruction BPF filter: socket(2) fails with EACCES (socketpair, used by multiprocessing,
    still works). This is what stops connect() to a unix socket file elsewhere on the machine."""
    nr_socket, audit_arch = SECCOMP_ARCH
    ld, jeq, jset, ret = 0x20, 0x15, 0x45, 0x06
    allow, deny = 0x7FFF0000, 0x00050000 | 13  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | EACCES
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, audit_arch), (ret, 0, 0, allow),  # other ABIs: leave alone
            (ld, 0, 0, 0), (jset, 2, 0, 0x40000000),                       # x32 syscalls: deny
            (jeq, 1, 0, nr_socket), (ret, 0, 0, allow), (ret, 0, 0, deny)]
    buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *ins) for ins in prog))
    fprog = struct.pack("HxxxxxxQ", len(prog), ctypes.addressof(buf))
    _check(libc.prctl(PR_SET_SECCOMP, 2, ctypes.c_char_p(fprog), 0, 0), "seccomp")


# -----------------------------------------------------------------------------
# CLI: run a file, soak the sandbox, or benchmark it against naive subprocess.run

# (code, limits, the status it must get): every way a run can end, for the soak
SOAK_MIX = (
    ("print(sum(range(1000)))", {}, "ok"),
    ("import json, math\nprint(json.dumps([math.factorial(30)]))", {}, "ok"),
    ("print('before')\n1 / 0", {}, "error"),
    ("while True:\n    pass", {"timeout": 0.1}, "timeout"),
    ("import time\ntime.sleep(30)", {"timeout": 0.1}, "timeout"),
    ("x = bytearray(8 * 1024**3)", {}, "memory"),
    ("chunks = []\nwhile True:\n    chunks.append(b'x' * 10**6)", {"memory_mb": 64}, "memory"),
    ("import os, time\nfor _ in range(100):\n    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
     "    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\nprint('forked')", {"processes": 8}, "ok"),
    ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(30)\n"
     "    os._exit(0)\nprint('escaped')", {}, "ok"),
    ("while True:\n    print('x' * 1000)", {"output_bytes": 4096}, "output_limit"),
)


def soak(n, workers=2, batch=500, rss_growth_mb=8):
    """`n` runs cycling through SOAK_MIX on `workers` launchers of its own, then what must hold
    after any number of runs: each status as expected, no process, fd, work dir or cgroup left
    over, a flat launcher RSS (after a warm-up), and on shutdown every launcher gone with its
    dirs and cgroup. It looks only at the launchers it started and what they made, and each run
    is bounded by its own clock. Returns (report lines, problems)."""
    shutdown()  # launchers of our own, started below
    jobs = [SOAK_MIX[i % len(SOAK_MIX)] for i in range(n)]
    trainer_fds = len(os.listdir("/proc/self/fd"))
    errors_before = sandbox_errors
    statuses, problems = collections.Counter(), []

    def run_jobs(part):
        for (code, _, expected), result in zip(part, _run_all([(code, limits) for code, limits, _ in part], workers)):
            statuses[result.status] += 1
            if result.status != expected and len(problems) < 20:
                problems.append(f"{code.splitlines()[-1]!r}: {expected} expected, got {result.status} ({result.error})")

    start = time.perf_counter()
    warm = min(n, len(SOAK_MIX))  # every kind once: what a launcher allocates for good is allocated
    run_jobs(jobs[:warm])
    launchers = list(_idle)
    before = {launcher: _launcher_state(launcher) for launcher in launchers}
    rss = [[before[launcher]["rss_mb"] for launcher in launchers]]
    for i in range(warm, n, batch):
        run_jobs(jobs[i:i + batch])
        rss.append([_launcher_state(launcher)["rss_mb"] for launcher in launchers])
    elapsed = time.perf_counter() - start
    if sorted(id(launcher) for launcher in _idle) != sorted(id(launcher) for launcher in launchers):
        problems.append("a launcher was replaced during the soak")
    if sandbox_errors != errors_before:
        problems.append(f"{sandbox_errors - errors_before} sandbox_errors")
    lines = [f"{n} runs ({len(SOAK_MIX)} kinds in turn) on {workers} workers in {elapsed:.1f} s: {n / elapsed:.1f} runs/s",
             "statuses: " + ", ".join(f"{status} {count}" for status, count in sorted(statuses.items()))]
    for launcher in launchers:
        was, now = before[launcher], _launcher_state(launcher)
        lines.append(f"launcher {launcher.hello['pid']}: fds {was['fds']} -> {now['fds']}, RSS {was['rss_mb']:.1f} -> "
                     f"{now['rss_mb']:.1f} MB (after each batch: {', '.join(f'{r:.1f}' for r in list(zip(*rss))[launchers.index(launcher)])})")
        if now["fds"] != was["fds"]:
            problems.append(f"launcher {launcher.hello['pid']}: {now['fds'] - was['fds']} fds leaked")
        if now["rss_mb"] - was["rss_mb"] > rss_growth_mb:
            problems.append(f"launcher {launcher.hello['pid']}: RSS grew {now['rss_mb'] - was['rss_mb']:.1f} MB")
        for what in ("processes", "workdirs", "cgroup_procs"):
            if now[what]:
                problems.append(f"launcher {launcher.hello['pid']}: {what} left over: {now[what]}")
    shutdown()
    for launcher in launchers:
        left = [path for path in (launcher.hello["base"], launcher.hello["features"].get("cgroup", [None])[0])
                if path and os.path.exists(path)]
        if launcher.proc.returncode != 0 or left:
            problems.append(f"launcher {launcher.hello['pid']}: exit code {launcher.proc.returncode}, left {left}")
    if len(os.listdir("/proc/self/fd")) != trainer_fds:
        problems.append(f"the trainer has {len(os.listdir('/proc/self/fd')) - trainer_fds} more fds")
    lines.append("problems: " + ("; ".join(problems) if problems else "none (no process, fd, work dir or cgroup left, "
                                 "RSS flat, each launcher removed its dirs and cgroup on exit)"))
    return lines, problems


def _launcher_state(launcher):
    """What a launcher holds between runs, read from /proc: fds, RSS, processes under it (but itself, the one
    that serves), work dirs in its base dir (seen through its own mount namespace), processes in its cgroup."""
    pid = launcher.hello["pid"]
    with open(f"/proc/{pid}/status") as f:
        rss_mb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    children = collections.defaultdict(list)
    for other in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{other}/stat") as f:
                children[int(f.read().rsplit(")", 1)[1].split()[1])].append(int(other))
        except OSError:
            pass
    processes, todo = [], [launcher.proc.pid]
    while todo:
        for child in children[todo.pop()]:
            processes.append(child)
            todo.append(child)
    try:
        workdirs = os.listdir(f"/proc/{pid}/root{launcher.hello['base']}")
    except OSError:  # not ours to look into (a user namespace)
        workdirs = []
    group = launcher.hello["features"].get("cgroup", [None])[0]
    cgroup_procs = open(f"{group}/cgroup.procs").read().split() if group else []
    return dict(fds=len(os.listdir(f"/proc/{pid}/fd")), rss_mb=rss_mb, processes=[p for p in processes if p != pid],
                workdirs=workdirs, cgroup_procs=cgroup_procs)


def bench(n, workers):
    codes = [f"x = {i}\nprint(x * x + 1)" for i in range(n)]
    t0 = time.perf_counter()
    run_many(codes[:workers], workers=workers)
    cold = time.perf_counter() - t0
    naive_times, ours_times, latencies = [], [], []
    for _ in range(2):  # alternate, so a busy neighbour hurts both sides alike
        t0 = time.perf_counter()
        for code in codes:
            subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
        naive_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        results = run_many(codes, workers=workers)
        ours_times.append(time.perf_counter() - t0)
        assert all(r.status == "ok" and r.stdout == f"{i * i + 1}\n" for i, r in enumerate(results)), results[:3]
    for code in codes[:50]:
        t0 = time.perf_counter()
        run(code)
        latencies.append(time.perf_counter() - t0)
    naive, ours = min(naive_times), min(ours_times)
    latencies.sort()
    print(f"{n} trivial snippets, {workers} workers, {os.cpu_count()} CPUs")
    print(f"naive sequential subprocess.run : {naive:.2f} s  ({n / naive:.0f} runs/s)")
    print(f"sandbox.run_many (launchers up) : {ours:.2f} s  ({n / ours:.0f} runs/s)")
    print(f"throughput ratio                : {naive / ours:.1f}x   (incl. starting the launchers: "
          f"{naive / (ours + cold):.1f}x; start took {cold:.2f} s)")
    print(f"p50 latency of one run()        : {latencies[len(latencies) // 2] * 1000:.1f} ms "
          f"(p90 {latencies[int(len(latencies) * 0.9)] * 1000:.1f} ms)")
    launcher = _checkout()
    print("protections:", ", ".join(name for name in launcher.hello["features"] if name != "readable"),
          "| missing:", "; ".join(launcher.hello["notes"]) or "none")
    _idle.append(launcher)


if __name__ == "__main__":
    if sys.argv[1:] == ["--launcher"]:
        launcher_main()
        sys.exit(0)
    parser = argparse.ArgumentParser(description="Run Python under the tocode sandbox, or benchmark it.")
    parser.add_argument("file", nargs="?", help="a .py file to run; prints the Result as JSON")
    parser.add_argument("--bench", action="store_true", help="throughput vs naive subprocess.run")
    parser.add_argument("--soak", type=int, metavar="N", help="N mixed runs, then check that nothing leaked")
    parser.add_argument("--n", type=int, default=200, help="snippets in the benchmark")
    parser.add_argument("--workers", type=int, default=2, help="concurrent runs in the benchmark or soak")
    parser.add_argument("--timeout", type=float, default=TIMEOUT)
    parser.add_argument("--memory_mb", type=int, default=MEMORY_MB)
    args = parser.parse_args()
    if args.soak:
        report, problems = soak(args.soak, args.workers)
        print("\n".join(report))
        sys.exit(1 if problems else 0)
    elif args.bench:
        bench(args.n, args.workers)
    elif args.file:
        with open(args.file) as f:
            print(json.dumps(dataclasses.asdict(run(f.read(), timeout=args.timeout, memory_mb=args.memory_mb)), indent=2))
    else:
        parser.print_help()
