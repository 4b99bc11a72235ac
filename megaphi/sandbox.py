"""A sandbox for untrusted generated Python (the code oracle of Pivotal Token Search, and
``tools/validate_code.py``): :func:`run_python` runs a program under bubblewrap and says whether
it exited 0 within its limits; :func:`check_code` runs ``code + "\\n" + tests``.

Isolation (bubblewrap, ``apt-get install bubblewrap``):

- every namespace unshared: no network (only a loopback of its own), its own pids, IPC, UTS
  and cgroup view, in a user namespace that may not create further user namespaces;
- a read-only view of the system (``/usr`` and the few ``/etc`` files programs need) and of the
  interpreter's prefix; a private, size-bounded tmpfs as the working directory and ``/tmp``
  (and a small ``/dev/shm``); a minimal read-only ``/dev``; a read-only root; nothing else of
  the host (no ``/home``, ``/root``, no project directory);
- a cleared environment, all capabilities dropped, a new session (no terminal injection);
- bubblewrap itself runs as an unprivileged uid when the caller is root (root, and a user
  namespace mapped to root, ignore the process-count rlimit); concurrent sandboxes get distinct
  uids, so one program's fork loop does not eat another's process budget;
- the pid namespace ends the whole tree: its pid 1 (a shell running the program) is killed at
  the wall time limit, and when it exits, normally or not, the kernel kills every process left
  inside (daemonised children included) before :func:`run_python` returns; ``--die-with-parent``
  does the same if the caller dies.

Limits (:class:`Limits`), set as rlimits by ``prlimit`` before bubblewrap starts: CPU time (per
process), address space (per process), processes (per sandbox uid), file size (also bounds the
captured output), plus a wall-clock kill of the whole tree and size-bounded tmpfs mounts.

Not guaranteed: the kernel is shared (a kernel exploit escapes; there is no seccomp filter),
memory is bounded per process rather than per tree (up to ``processes * memory_mb``), CPU time
per process, and programs can see the host's CPU and kernel version. human-eval's
``reliability_guard`` is not used: it is not a sandbox.

Without bubblewrap, :func:`run_python` raises :class:`SandboxUnavailable` unless
``unsafe_no_sandbox=True`` (trusted code only): then the program runs with the same rlimits, a
cleared environment and a temporary working directory, and nothing else.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import json
import logging
import math
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

logger = logging.getLogger("megaphi.sandbox")

DEFAULT_PYTHON = "/usr/bin/python3"
"""The sandbox's default interpreter: the system Python, which every uid can read (a pyenv or
venv interpreter under ``/root`` is unreadable to the unprivileged sandbox uid)."""

SANDBOX_UID_BASE = 1_879_048_192
"""When the caller is root, each concurrent sandbox runs as its own uid from
``SANDBOX_UID_BASE`` on (the range systemd documents as unused): uids that own no file and
whose process count is the sandbox's alone."""
SANDBOX_UID_SLOTS = 256

OUTPUT_LIMIT = 64 * 1024
"""Characters of stdout and of stderr kept in a :class:`SandboxResult` (head and tail)."""

WORKDIR = "/tmp"
STOP_GRACE_S = 5.0  # for bubblewrap to exit after its child was killed at the wall limit
INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf "
                "install bubblewrap), or pass --unsafe-no-sandbox (unsafe_no_sandbox=True) to "
                "run trusted code without isolation")

_ETC = ["/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/etc/ld.so.cache",
        "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime", "/etc/alternatives"]


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot create a sandbox on this machine."""


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed program."""

    cpu_s: int = 10
    """CPU seconds per process (RLIMIT_CPU: SIGXCPU, then SIGKILL a second later)."""
    wall_s: float = 20.0
    """Wall-clock seconds before the whole process tree is killed."""
    memory_mb: int = 1024
    """Address space per process, MiB (RLIMIT_AS): allocations beyond it fail (MemoryError)."""
    processes: int = 64
    """Processes and threads of the sandbox uid (RLIMIT_NPROC): bubblewrap and the sandbox's
    pid 1 take 2 of them, the interpreter 1. Per sandbox when the caller is root (each has a uid
    of its own); otherwise it counts all of the caller's processes."""
    file_size_mb: int = 16
    """Largest file the program may write, MiB (RLIMIT_FSIZE); also caps stdout and stderr.
    The tmpfs working directory holds ``2 * file_size_mb + 16`` MiB."""

    def __post_init__(self):
        def need(name, value, kind, low):
            if isinstance(value, bool) or not isinstance(value, kind) or value < low:
                what = "an integer" if kind is int else "a number"
                raise ValueError(f"Limits.{name} must be {what} >= {low}, got {value!r}")

        if isinstance(self.wall_s, float) and not math.isfinite(self.wall_s):
            raise ValueError(f"Limits.wall_s must be finite, got {self.wall_s!r}")
        need("cpu_s", self.cpu_s, int, 1)
        need("wall_s", self.wall_s, (int, float), 0.1)
        need("memory_mb", self.memory_mb, int, 64)  # the interpreter alone maps ~30 MiB
        need("processes", self.processes, int, 4)  # bubblewrap, pid 1, the interpreter, 1 more
        need("file_size_mb", self.file_size_mb, int, 1)


@dataclass
class SandboxResult:
    """What a sandboxed program did."""

    passed: bool
    """It exited 0 within its limits."""
    reason: str
    """``passed``, ``failed: exit status N (last exception line)``, ``wall time limit (Xs)``,
    ``CPU time limit``, ``memory limit (...)``, ``file size limit (...)``, ``killed by signal
    N (NAME)`` or ``sandbox error: ...``."""
    returncode: Optional[int]
    """The program's exit status (128 + N when signal N killed it); None at the wall limit."""
    stdout: str
    stderr: str
    """Both truncated to :data:`OUTPUT_LIMIT` characters (head and tail kept)."""
    wall_s: float


def check_code(code: str, tests: str, **kw) -> SandboxResult:
    """Run ``code + "\\n" + tests`` in the sandbox (keywords: those of :func:`run_python`)."""
    if not isinstance(code, str) or not isinstance(tests, str):
        raise TypeError(f"check_code needs code and tests as strings, got "
                        f"{type(code).__name__} and {type(tests).__name__}")
    return run_python(code + "\n" + tests, **kw)


def run_python(program: str, limits: Limits = Limits(), python: Optional[str] = None,
               unsafe_no_sandbox: bool = False) -> SandboxResult:
    """Run a Python program in the sandbox and report whether it exited 0 within ``limits``.

    Args:
        program: the program's source.
        limits: its resource limits.
        python: the interpreter inside the sandbox (default :data:`DEFAULT_PYTHON`); it and its
            prefix must be readable by every uid when the caller is root.
        unsafe_no_sandbox: run without bubblewrap (trusted code only): rlimits, a cleared
            environment and a temporary working directory, no isolation.

    Raises:
        SandboxUnavailable: bubblewrap is missing or cannot create namespaces here, or the
            interpreter cannot run inside the sandbox (the message says what to do).
    """
    if not isinstance(program, str):
        raise TypeError(f"program must be a string, got {type(program).__name__}")
    if not isinstance(limits, Limits):
        raise TypeError(f"limits must be a megaphi.sandbox.Limits, got {type(limits).__name__}")
    python = python or DEFAULT_PYTHON
    if not os.path.isabs(python):
        found = shutil.which(python)
        if found is None:
            raise ValueError(f"python {python!r} not found on PATH; give an absolute path")
        python = found
    prlimit = _find_tool("prlimit")
    if prlimit is None:
        raise SandboxUnavailable("prlimit (util-linux) is missing; install util-linux")
    if unsafe_no_sandbox:
        return _run_unsafe(program, limits, python, prlimit)
    bwrap = _find_bwrap()
    if bwrap is None:
        raise SandboxUnavailable(f"bubblewrap (bwrap) is not installed: {INSTALL_HINT}")
    binds = _probe(bwrap, prlimit, python)
    with _uid_slot() as uid:
        return _run_sandboxed(program, limits, python, bwrap, prlimit, binds, uid)


# ------------------------------------------------------------------------------------------
# finding and probing the tools


def _find_tool(name: str) -> Optional[str]:
    return shutil.which(name, path=os.pathsep.join(
        [os.environ.get("PATH", ""), "/usr/local/bin", "/usr/bin", "/bin"]))


def _find_bwrap() -> Optional[str]:
    return _find_tool("bwrap")


def _system_binds() -> List[str]:
    """bwrap arguments for a read-only view of the system: /usr, the /bin and /lib entries
    (symlinks into /usr on merged-/usr systems) and the /etc files programs need."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    for path in _ETC + sorted(glob.glob("/etc/python3*")):
        if os.path.lexists(path):
            args += ["--ro-bind-try", path, path]
    return args


def _prefix_binds(prefixes: Sequence[str]) -> List[str]:
    """Read-only binds for the interpreter's prefixes that /usr does not already cover."""
    args, seen = [], set()
    for prefix in prefixes:
        real = os.path.realpath(prefix)
        for path in {prefix, real}:
            if path in seen or path == "/usr" or path.startswith("/usr/"):
                continue
            seen.add(path)
            args += ["--ro-bind", real, path]
    return args


@lru_cache(maxsize=None)
def _probe(bwrap: str, prlimit: str, python: str) -> Tuple[str, ...]:
    """Check once per (bwrap, python) that bwrap can create a sandbox here and the interpreter
    runs inside it; return the binds of the interpreter's prefixes. Raises SandboxUnavailable
    (not cached: a fixed machine works on the next call)."""
    if not os.path.isabs(python):
        raise SandboxUnavailable(f"the sandbox's python must be an absolute path, got {python!r}")
    with _uid_slot() as uid:
        who = f"uid {uid}" if uid is not None else "this user"
        unreadable = (f"the sandbox's python {python} cannot run as {who}: choose an interpreter "
                      f"every uid can read (one under a private home, such as pyenv under "
                      f"/root, is not), e.g. {DEFAULT_PYTHON} (--python / python=)")
        try:
            got = subprocess.run(
                [python, "-I", "-c", "import sys, json; print(json.dumps([sys.prefix, "
                 "sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]))"],
                env={}, cwd="/", capture_output=True, text=True, timeout=60, **_as_user(uid))
        except OSError as exc:
            raise SandboxUnavailable(f"{unreadable} ({exc})") from None
        if got.returncode != 0:
            raise SandboxUnavailable(f"{unreadable} (exit status {got.returncode}: "
                                     f"{_last_line(got.stderr)})")
        binds = _prefix_binds(json.loads(got.stdout))
        for what, argv in (("create a sandbox", ["/usr/bin/true"]),
                           (f"run {python} inside the sandbox", [python, "-I", "-c", "pass"])):
            code, _, err, _, _, _ = _spawn(_bwrap_argv(bwrap, binds, Limits(), argv, None, None),
                                           prlimit, Limits(), uid, pass_fds=(), wall_s=60)
            if code == 0:
                continue
            if what == "create a sandbox":
                raise SandboxUnavailable(
                    f"bubblewrap ({bwrap}) cannot create a sandbox on this machine: "
                    f"{_last_line(err) or f'exit status {code}'}. It needs unprivileged user "
                    "namespaces: check `sysctl user.max_user_namespaces` (> 0), "
                    "`kernel.unprivileged_userns_clone=1` (older Debian kernels), "
                    "`kernel.apparmor_restrict_unprivileged_userns=0` (Ubuntu 24.04), or a "
                    "container runtime that blocks unshare(2); or pass --unsafe-no-sandbox "
                    "for trusted code")
            raise SandboxUnavailable(f"cannot {what} (exit status {code}): {_last_line(err)}")
    logger.info("sandbox: bubblewrap %s works; python %s%s", bwrap, python,
                f" (binds {' '.join(binds[2::3])})" if binds else "")
    return tuple(binds)


# ------------------------------------------------------------------------------------------
# uids


_uid_lock = threading.Lock()
_uids_in_use: set = set()


def _uid_lock_path(uid: int) -> str:
    return os.path.join(tempfile.gettempdir(), "megaphi-sandbox-uids", str(uid))


class _uid_slot:
    """A uid of its own for one sandbox (root only; otherwise the caller's uid, None): unique in
    this process by a set, across processes by an flock on a file per uid."""

    def __enter__(self) -> Optional[int]:
        self.uid, self.lock = None, None
        if os.geteuid() != 0:
            return None
        os.makedirs(os.path.dirname(_uid_lock_path(0)), mode=0o700, exist_ok=True)
        for _ in range(200):
            with _uid_lock:
                for uid in range(SANDBOX_UID_BASE, SANDBOX_UID_BASE + SANDBOX_UID_SLOTS):
                    if uid in _uids_in_use:
                        continue
                    fd = os.open(_uid_lock_path(uid), os.O_RDWR | os.O_CREAT, 0o600)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except OSError:
                        os.close(fd)
                        continue
                    _uids_in_use.add(uid)
                    self.uid, self.lock = uid, fd
                    return uid
            time.sleep(0.05)
        raise SandboxUnavailable(f"all {SANDBOX_UID_SLOTS} sandbox uids are busy")

    def __exit__(self, *exc):
        if self.uid is not None:
            with _uid_lock:
                _uids_in_use.discard(self.uid)
            os.close(self.lock)  # releases the flock


def _as_user(uid: Optional[int]) -> dict:
    """Popen keywords that run the child as ``uid`` (no supplementary groups), set in C by
    subprocess: no preexec_fn, so it is safe with threads."""
    if uid is None:
        return {}
    return {"user": uid, "group": uid, "extra_groups": []}


# ------------------------------------------------------------------------------------------
# running


def _bwrap_argv(bwrap: str, binds: Sequence[str], limits: Limits, argv: Sequence[str],
                program_fd: Optional[int], status_fd: Optional[int]) -> List[str]:
    tmp_bytes = (2 * limits.file_size_mb + 16) << 20
    args = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--new-session",
            "--die-with-parent", "--as-pid-1", "--clearenv", "--cap-drop", "ALL",
            "--hostname", "sandbox", *_system_binds(),
            "--proc", "/proc", "--dev", "/dev",
            "--size", str(limits.file_size_mb << 20), "--tmpfs", "/dev/shm",
            "--remount-ro", "/dev",
            "--size", str(tmp_bytes), "--tmpfs", WORKDIR,
            *binds,  # after the tmpfs: an interpreter under /tmp stays visible
            "--chdir", WORKDIR,
            "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin", "--setenv", "HOME", WORKDIR,
            "--setenv", "TMPDIR", WORKDIR, "--setenv", "LANG", "C.UTF-8"]
    if program_fd is not None:
        args += ["--file", str(program_fd), f"{WORKDIR}/main.py"]
    if status_fd is not None:
        args += ["--json-status-fd", str(status_fd)]
    return args + ["--remount-ro", "/", "--", *argv]  # only /tmp and /dev/shm are writable


def _init_argv(python: str) -> List[str]:
    """The sandbox's pid 1: a shell that runs the program as its child and exits with its
    status (128 + N when signal N killed it). bwrap's own init would outlive bwrap as a zombie
    left to the host's pid 1, still counted against the uid's process limit; pid 1 also
    ignores signals it has no handler for, so the program itself must not be pid 1 ("; exit"
    keeps the shell from exec'ing it)."""
    return ["/bin/sh", "-c", f'"$1" -I {WORKDIR}/main.py; exit $?', "sandbox-init", python]


def _prlimit_argv(prlimit: str, limits: Limits) -> List[str]:
    return [prlimit, f"--cpu={limits.cpu_s}:{limits.cpu_s + 1}",
            f"--as={limits.memory_mb << 20}", f"--nproc={limits.processes}",
            f"--fsize={limits.file_size_mb << 20}", "--core=0", "--"]


def _run_sandboxed(program, limits, python, bwrap, prlimit, binds, uid) -> SandboxResult:
    program_fd = _memfd(program)
    status_r, status_w = os.pipe()
    os.set_blocking(status_r, False)
    open_w, status = [status_w], []

    def close_writer():  # once: a second close could hit another thread's new fd
        if open_w:
            os.close(open_w.pop())

    def stop():
        """Kill the sandbox's pid 1 (bwrap's child): the kernel kills everything else in the
        pid namespace, and bwrap reaps it and exits, leaving no orphan (killing bwrap instead
        would leave its child a zombie of the host's pid 1, still counted against the uid's
        process limit)."""
        status.append(_read_all(status_r))
        found = re.search(r'"child-pid"\s*:\s*(\d+)', "".join(status))
        if found:
            try:
                os.kill(int(found.group(1)), signal.SIGKILL)
            except ProcessLookupError:
                pass

    try:
        argv = _bwrap_argv(bwrap, binds, limits, _init_argv(python), program_fd, status_w)
        logger.debug("sandbox: uid %s, program of %d characters", uid, len(program))
        code, out, err, elapsed, cpu, timed_out = _spawn(
            argv, prlimit, limits, uid, pass_fds=(program_fd, status_w), wall_s=limits.wall_s,
            after_start=close_writer, stop=stop)
        status.append(_read_all(status_r))
    finally:
        close_writer()
        os.close(program_fd)
        os.close(status_r)
    if not timed_out and '"child-pid"' not in "".join(status):  # bwrap failed in its setup
        return SandboxResult(False, f"sandbox error: {_last_line(err) or f'exit status {code}'}",
                             code, out, err, elapsed)
    return _result(code, out, err, elapsed, cpu, timed_out, limits)


_warned_unsafe = False


def _run_unsafe(program, limits, python, prlimit) -> SandboxResult:
    global _warned_unsafe
    if not _warned_unsafe:
        _warned_unsafe = True
        logger.warning("sandbox: running programs WITHOUT isolation (unsafe_no_sandbox): "
                       "trusted code only")
    with tempfile.TemporaryDirectory(prefix="megaphi-unsafe-") as work:
        path = os.path.join(work, "main.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work,
               "LANG": "C.UTF-8"}
        code, out, err, elapsed, cpu, timed_out = _spawn(
            [python, "-I", path], prlimit, limits, None, pass_fds=(), wall_s=limits.wall_s,
            cwd=work, env=env)
    return _result(code, out, err, elapsed, cpu, timed_out, limits)


def _memfd(text: str) -> int:
    fd = os.memfd_create("megaphi-sandbox-program")  # close-on-exec: only pass_fds passes it
    view = memoryview(text.encode("utf-8", "surrogatepass"))
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _spawn(argv, prlimit, limits, uid, pass_fds, wall_s, after_start=None, stop=None, cwd=None,
           env=None):
    """Run ``argv`` under ``prlimit`` as ``uid`` in a session of its own; at ``wall_s`` call
    ``stop`` (then, or without one, kill its process group); kill the group at the end too.
    Returns (exit status, stdout, stderr, wall seconds,
    CPU seconds of the reaped tree, timed out)."""
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        start = time.monotonic()
        try:
            proc = subprocess.Popen(_prlimit_argv(prlimit, limits) + list(argv),
                                    stdin=subprocess.DEVNULL, stdout=out_f, stderr=err_f,
                                    pass_fds=pass_fds, start_new_session=True, cwd=cwd,
                                    env=env if env is not None else {}, **_as_user(uid))
        except OSError as exc:
            who = f"uid {uid}" if uid is not None else "this user"
            raise SandboxUnavailable(f"cannot start {argv[0]} as {who}: {exc}") from None
        if after_start is not None:
            after_start()
        status, usage, timed_out = _wait(proc, wall_s, stop)
        elapsed = time.monotonic() - start
        out, err = _read_bounded(out_f), _read_bounded(err_f)
    code = None if timed_out else os.waitstatus_to_exitcode(status)
    if code is not None and code < 0:
        code = 128 - code  # killed by signal N: 128 + N, as bwrap and shells report it
    return code, out, err, elapsed, usage.ru_utime + usage.ru_stime, timed_out


def _wait(proc: subprocess.Popen, wall_s: float, stop=None):
    """Wait up to ``wall_s`` for ``proc`` to exit; past that (or on an exception) call ``stop``
    and give it ``STOP_GRACE_S`` to end ``proc``; then kill its process group (also after a
    normal exit: children left behind) and reap it. The group is killed before the reap, while
    the leader's pid (the group id) cannot be reused. Returns (wait status, rusage of the
    reaped tree, timed out)."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # Linux < 5.3: poll
        pidfd = None

    def wait_exit(seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if pidfd is not None:
                select.select([pidfd], [], [], remaining)
            else:
                time.sleep(min(remaining, 0.01))
        return True

    exited = False
    try:
        exited = wait_exit(wall_s)
    finally:
        try:
            if not exited and stop is not None:
                stop()
                wait_exit(STOP_GRACE_S)
        finally:
            if pidfd is not None:
                os.close(pidfd)
            _kill_group(proc.pid)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return status, usage, not exited


def _kill_group(pid: int) -> None:
    for kill in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            kill()
        except ProcessLookupError:
            pass
        except PermissionError:  # a group of another uid's that we may not signal
            pass


def _read_bounded(f) -> str:
    size = f.seek(0, os.SEEK_END)
    if size <= OUTPUT_LIMIT:
        f.seek(0)
        return f.read().decode("utf-8", "replace")
    head, tail = OUTPUT_LIMIT // 4, OUTPUT_LIMIT - OUTPUT_LIMIT // 4
    f.seek(0)
    first = f.read(head).decode("utf-8", "replace")
    f.seek(size - tail)
    last = f.read(tail).decode("utf-8", "replace")
    return f"{first}\n[... {size - head - tail} bytes cut ...]\n{last}"


def _read_all(fd: int) -> str:
    chunks = []
    os.set_blocking(fd, False)
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


_SIGNAL_REASONS = {signal.SIGXCPU: "CPU time limit", signal.SIGXFSZ: "file size limit"}


def _result(code, out, err, elapsed, cpu, timed_out, limits: Limits) -> SandboxResult:
    if timed_out:
        return SandboxResult(False, f"wall time limit ({limits.wall_s:g}s)", None, out, err,
                             elapsed)
    if code == 0:
        return SandboxResult(True, "passed", 0, out, err, elapsed)
    last = _last_line(err)
    if 128 < code < 128 + signal.NSIG:
        sig = code - 128
        name = signal.Signals(sig).name if sig in signal.valid_signals() else "?"
        if sig in _SIGNAL_REASONS:
            reason = _SIGNAL_REASONS[sig]
        elif sig == signal.SIGKILL and cpu >= limits.cpu_s:
            reason = "CPU time limit"
        elif sig in (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS) and "MemoryError" in err:
            reason = f"memory limit (killed by {name})"
        else:
            reason = f"killed by signal {sig} ({name})"
    elif last.startswith("MemoryError") or re.search(r"\[Errno %d\]" % errno.ENOMEM, last):
        reason = f"memory limit ({last[:120]})"
    elif re.search(r"\[Errno %d\]" % errno.EFBIG, last):
        reason = f"file size limit ({last[:120]})"
    else:
        reason = f"failed: exit status {code}" + (f" ({last[:200]})" if last else "")
    return SandboxResult(False, reason, code, out, err, elapsed)
