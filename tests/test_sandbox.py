"""The code sandbox (megaphi/sandbox.py, tools/validate_code.py): hostile programs are contained
and reported with a reason, the host is unchanged, correct code passes and wrong code fails."""

import fcntl
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from megaphi import sandbox
from megaphi.sandbox import Limits, SandboxUnavailable, check_code, run_python

REPO = Path(__file__).resolve().parents[1]
ROOT = os.geteuid() == 0
pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None,
                                reason="bubblewrap missing: apt-get install bubblewrap")
# Not root, RLIMIT_NPROC counts all of the user's processes: then the process limit is loose
# and the tests of fork loops (which need a sandbox uid of their own) are skipped.
FAST = Limits(cpu_s=2, wall_s=10.0, memory_mb=256, processes=16 if ROOT else 100_000,
              file_size_mb=4)
needs_root = pytest.mark.skipif(not ROOT, reason="a process limit of the sandbox's own needs "
                                "root (a uid per sandbox)")


def host_processes(marker: str):
    """Host pids whose command line contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmdline:
                found.append(int(entry))
    return found


def leftover_sandbox_processes():
    """Host pids running as a sandbox uid that no sandbox holds (root only: otherwise they
    are ours). A uid's flock is held while a sandbox, in any process, runs as it."""
    by_uid = {}
    uids = range(sandbox.SANDBOX_UID_BASE, sandbox.SANDBOX_UID_BASE + sandbox.SANDBOX_UID_SLOTS)
    for entry in os.listdir("/proc"):
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("Uid:") and int(line.split()[1]) in uids:
                by_uid.setdefault(int(line.split()[1]), []).append(int(entry))
    leftover = []
    for uid, pids in by_uid.items():
        try:
            fd = os.open(sandbox._uid_lock_path(uid), os.O_RDWR)
        except FileNotFoundError:
            leftover += pids
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            leftover += [pid for pid in pids if os.path.exists(f"/proc/{pid}")]
        except BlockingIOError:
            pass  # a sandbox is running as it now
        finally:
            os.close(fd)
    return leftover


@pytest.fixture
def open_dir():
    """A host directory every uid may read, write and traverse (under /tmp, not pytest's
    0700 tmp_path): only the sandbox's mount namespace keeps a program out of it."""
    path = Path(tempfile.mkdtemp(prefix="megaphi-sandbox-test-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def host_unchanged():
    """Every test leaves no sandbox process behind on the host."""
    yield
    if ROOT:
        deadline = time.monotonic() + 2
        while leftover_sandbox_processes() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert leftover_sandbox_processes() == [], "sandbox processes outlived their run"


def test_correct_solution_passes_and_wrong_one_fails():
    code = "def add(a, b):\n    return a + b\n"
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\nprint('ok')"
    good = check_code(code, tests, limits=FAST)
    assert (good.passed, good.reason, good.returncode, good.stdout) == (True, "passed", 0, "ok\n")
    bad = check_code(code.replace("a + b", "a - b"), tests, limits=FAST)
    assert not bad.passed and bad.returncode == 1
    assert bad.reason == "failed: exit status 1 (AssertionError)"
    assert "assert add(2, 3) == 5" in bad.stderr
    syntax = check_code("def f(:\n", "", limits=FAST)
    assert not syntax.passed and "SyntaxError" in syntax.reason


def test_network_to_a_host_listener_is_unreachable():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    try:
        r = run_python(f"""
import socket
s = socket.create_connection(("127.0.0.1", {port}), timeout=3)
s.sendall(b"escaped")
print("connected")
""", FAST)
        assert not r.passed and "connected" not in r.stdout
        assert r.reason.startswith("failed: exit status 1 (ConnectionRefusedError"), r.reason
        with pytest.raises(BlockingIOError):  # nothing ever reached the listener
            listener.accept()
    finally:
        listener.close()


def test_writes_outside_the_work_directory_do_not_reach_the_host(open_dir):
    r = run_python(f"""
import os, sys
wrote = []
for path in [{str(open_dir / "pwned")!r}, "/usr/pwned", "/etc/pwned", "/pwned", "/dev/pwned"]:
    try:
        with open(path, "w") as f:
            f.write("pwned")
        wrote.append(path)
    except OSError as exc:
        print(path, type(exc).__name__)
with open("inside.txt", "w") as f:  # the private work directory is writable
    f.write("fine")
sys.exit(0 if wrote else 3)
""", FAST)
    assert (r.passed, r.reason) == (False, "failed: exit status 3"), r.stdout + r.stderr
    assert list(open_dir.iterdir()) == []
    for path in ("/usr/pwned", "/etc/pwned", "/pwned"):
        assert not os.path.exists(path)


def test_host_files_are_unreadable(open_dir):
    token = secrets.token_hex(16)
    secret = open_dir / "secret.txt"
    secret.write_text(token)
    secret.chmod(0o644)
    open_dir.chmod(0o755)  # world-readable: only the mount namespace hides it
    r = run_python(f"""
import os, sys
seen = []
for path in [{str(secret)!r}, "/root", "/home", {str(REPO)!r}, "/etc/shadow", "/var/log"]:
    try:
        seen.append((path, open(path).read() if os.path.isfile(path) else os.listdir(path)))
    except OSError as exc:
        print(path, type(exc).__name__)
print(seen)
sys.exit(0 if seen else 3)
""", FAST)
    assert (r.passed, r.reason) == (False, "failed: exit status 3"), r.stdout + r.stderr
    assert token not in r.stdout and token not in r.stderr


def test_the_parent_environment_is_invisible(monkeypatch):
    token = secrets.token_hex(16)
    monkeypatch.setenv("MEGAPHI_SANDBOX_SECRET", token)
    r = run_python(f"""
import glob, os, sys
found = [k for k, v in os.environ.items() if {token!r} in v]
for path in glob.glob("/proc/*/environ"):
    try:
        if {token!r}.encode() in open(path, "rb").read():
            found.append(path)
    except OSError:
        pass
print(sorted(os.environ), found)
sys.exit(0 if found else 3)
""", FAST)
    assert (r.passed, r.reason) == (False, "failed: exit status 3"), r.stdout + r.stderr
    assert token not in r.stdout
    assert "MEGAPHI_SANDBOX_SECRET" not in r.stdout


@needs_root
def test_a_fork_loop_hits_the_process_limit_and_nothing_survives():
    marker = f"9{secrets.randbelow(10**6)}.123"
    r = run_python(f"""
import os, sys
children = 0
while children < 200:
    try:
        pid = os.fork()
    except OSError as exc:
        print("fork failed after", children, exc)
        sys.exit(3)
    if pid == 0:
        os.execv("/usr/bin/sleep", ["sleep", "{marker}"])
    children += 1
print("forked", children)
""", Limits(cpu_s=2, wall_s=10.0, memory_mb=256, processes=12))
    assert (r.passed, r.reason) == (False, "failed: exit status 3"), r.stdout + r.stderr
    assert "fork failed after" in r.stdout
    assert int(r.stdout.split("after")[1].split()[0]) < 12
    assert host_processes(marker) == []


@needs_root
def test_a_spinning_fork_bomb_is_killed_at_the_wall_time_limit():
    r = run_python("""
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
""", Limits(cpu_s=5, wall_s=1.5, memory_mb=256, processes=8))
    assert (r.passed, r.reason, r.returncode) == (False, "wall time limit (1.5s)", None)
    assert r.wall_s < 5
    # the bomb's processes are all gone (reaped, not zombies still counted against the uid)
    # when the run returns: the next sandbox, on the same uid, starts at once
    again = run_python("print('next')", Limits(processes=8))
    assert (again.passed, again.stdout) == (True, "next\n"), again.reason


def test_a_memory_hog_hits_the_memory_limit():
    r = run_python("chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))", FAST)
    assert not r.passed and r.reason == "memory limit (MemoryError)", r.reason


def test_an_endless_loop_hits_the_cpu_limit():
    r = run_python("while True:\n    pass", replace(FAST, cpu_s=1))
    assert (r.passed, r.reason) == (False, "CPU time limit")
    assert r.wall_s < 5


def test_a_sleeper_hits_the_wall_time_limit():
    start = time.monotonic()
    r = run_python("import time\ntime.sleep(60)", replace(FAST, wall_s=1.0))
    assert (r.passed, r.reason, r.returncode) == (False, "wall time limit (1s)", None)
    assert time.monotonic() - start < 5


def test_a_subprocess_escape_stays_inside(open_dir):
    targets = [open_dir / name for name in ("popen", "ctypes", "system")]
    r = run_python(f"""
import os, sys
cmd = "id > {{}}; echo pwned >> {{}}"
__import__("subprocess")
popen = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == "Popen"][0]
popen(["/bin/sh", "-c", cmd.format({str(targets[0])!r}, {str(targets[0])!r})]).wait()
import ctypes
ctypes.CDLL(None).system(cmd.format({str(targets[1])!r}, {str(targets[1])!r}).encode())
os.system(cmd.format({str(targets[2])!r}, {str(targets[2])!r}))
os.system("echo inside > here.txt")  # the shell itself runs, inside the sandbox
print(open("here.txt").read().strip())
sys.exit(0 if any(os.path.exists(p) for p in {[str(t) for t in targets]!r}) else 3)
""", FAST)
    assert not r.passed and r.reason.startswith("failed: exit status 3"), r.stdout + r.stderr
    assert "Directory nonexistent" in r.stderr  # the shells ran, inside, and found no host dir
    assert r.stdout.strip().endswith("inside")
    assert list(open_dir.iterdir()) == []


def test_a_child_lingering_after_the_parent_exits_is_killed():
    marker = f"8{secrets.randbelow(10**6)}.5"
    start = time.monotonic()
    r = run_python(f"""
import os
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv("/usr/bin/sleep", ["sleep", "{marker}"])
    os._exit(0)
os.wait()
print("parent exits")
""", FAST)
    assert (r.passed, r.reason, r.stdout) == (True, "passed", "parent exits\n")
    assert time.monotonic() - start < 5  # not held until the wall limit either
    assert host_processes(marker) == []


@pytest.mark.parametrize("program, reason", [
    ("import sys; sys.exit(7)", "failed: exit status 7"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", "killed by signal 15 (SIGTERM)"),
    ("open('big', 'wb').write(b'x' * (8 << 20))",
     "file size limit (OSError: [Errno 27] File too large)"),
    ("raise ValueError('bad value')", "failed: exit status 1 (ValueError: bad value)"),
])
def test_reasons(program, reason):
    r = run_python(program, FAST)
    assert (r.passed, r.reason) == (False, reason)


def test_output_is_truncated_to_a_bound():
    r = run_python("print('a' * 300000)\nprint('END')", FAST)
    assert r.passed
    assert len(r.stdout) < sandbox.OUTPUT_LIMIT + 100
    assert r.stdout.startswith("aaaa") and r.stdout.endswith("END\n") and "bytes cut" in r.stdout


@needs_root
def test_a_fork_loop_does_not_starve_a_concurrent_sandbox():
    holder = {}
    hog = threading.Thread(target=lambda: holder.setdefault("r", run_python("""
import os, time
while True:
    try:
        if os.fork() == 0:
            time.sleep(3)
            os._exit(0)
    except OSError:
        break
time.sleep(3)
""", Limits(wall_s=10.0, processes=12))))
    hog.start()
    time.sleep(1.0)  # the hog holds all 12 of its processes by now
    r = run_python("""
import os
pids = [os.fork() or os._exit(0) for _ in range(4)]
for pid in pids:
    os.waitpid(pid, 0)
print(os.getuid())
""", Limits(wall_s=10.0, processes=12))
    hog.join()
    assert (r.passed, r.reason) == (True, "passed"), r.stderr
    assert holder["r"].reason == "passed"


def test_limits_are_validated():
    with pytest.raises(ValueError, match=r"Limits.cpu_s must be an integer >= 1, got 0"):
        Limits(cpu_s=0)
    with pytest.raises(ValueError, match=r"Limits.wall_s must be a number"):
        Limits(wall_s="5")
    with pytest.raises(ValueError, match=r"Limits.memory_mb must be an integer >= 64"):
        Limits(memory_mb=10)
    with pytest.raises(ValueError, match=r"Limits.processes"):
        Limits(processes=True)
    with pytest.raises(TypeError, match="limits must be"):
        run_python("pass", limits={"cpu_s": 1})


def test_without_bubblewrap_it_refuses_unless_unsafe(monkeypatch):
    monkeypatch.setattr(sandbox, "_find_bwrap", lambda: None)
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap") as err:
        run_python("pass")
    assert "--unsafe-no-sandbox" in str(err.value)
    ok = run_python("import os; print(sorted(os.environ))", FAST, unsafe_no_sandbox=True)
    assert ok.passed and "MEGAPHI" not in ok.stdout  # still a cleared environment
    loop = run_python("while True:\n    pass", replace(FAST, cpu_s=1), unsafe_no_sandbox=True)
    assert (loop.passed, loop.reason) == (False, "CPU time limit")


def test_bubblewrap_that_cannot_create_namespaces_is_reported(monkeypatch, open_dir):
    fake = open_dir / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\n"
                    "exit 1\n")
    fake.chmod(0o755)
    open_dir.chmod(0o755)
    monkeypatch.setattr(sandbox, "_find_bwrap", lambda: str(fake))
    with pytest.raises(SandboxUnavailable, match="No permissions to creating new namespace") \
            as err:
        run_python("pass")
    assert "user namespaces" in str(err.value)


@pytest.mark.skipif(not ROOT, reason="the interpreter check matters when root drops its uid")
def test_an_interpreter_the_sandbox_uid_cannot_read_is_refused():
    private = Path(tempfile.mkdtemp(prefix="megaphi-private-"))  # 0700, like /root
    try:
        (private / "python3").symlink_to(sandbox.DEFAULT_PYTHON)
        with pytest.raises(SandboxUnavailable, match="every uid can read"):
            run_python("pass", python=str(private / "python3"))
    finally:
        shutil.rmtree(private)


def test_a_configured_interpreter_outside_usr_runs_with_its_prefix(open_dir):
    """A venv under /tmp: its prefix is bound read-only after the /tmp tmpfs."""
    venv = open_dir / "venv"
    subprocess.run([sandbox.DEFAULT_PYTHON, "-m", "venv", "--without-pip", str(venv)],
                   check=True)
    open_dir.chmod(0o755)
    r = run_python("import sys; print(sys.prefix, sys.executable)", FAST,
                   python=str(venv / "bin" / "python"))
    assert (r.passed, r.stdout) == (True, f"{venv} {venv}/bin/python\n"), r.stderr
    write = run_python(f"open({str(venv / 'pwned')!r}, 'w')", FAST,
                       python=str(venv / "bin" / "python"))
    assert "Read-only file system" in write.reason
    assert not (venv / "pwned").exists()


def validate_code(*args):
    return subprocess.run([sys.executable, str(REPO / "tools" / "validate_code.py"), *args,
                           "--no-progress"], capture_output=True, text=True, timeout=120)


def test_validate_code_tool(tmp_path):
    records = [{"id": "good", "code": "def sq(x):\n    return x * x",
                "tests": "assert sq(3) == 9", "source": "a"},
               {"id": 2, "code": "def sq(x):\n    return x + x", "tests": "assert sq(3) == 9"},
               {"id": "slow", "code": "import time\ntime.sleep(30)", "tests": ""},
               {"id": "net", "code": "import socket",
                "tests": "socket.create_connection(('127.0.0.1', 9), timeout=2)"}]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    proc = validate_code("--input", str(src), "--output", str(out), "--wall-s", "1",
                         "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in results] == ["good", 2, "slow", "net"]
    assert results[0] == {**records[0], "passed": True, "reason": "passed",
                          "wall_s": results[0]["wall_s"]}
    assert [r["passed"] for r in results] == [True, False, False, False]
    assert results[2]["reason"] == "wall time limit (1s)"
    summary = json.loads(proc.stdout)
    assert summary["passed"] == 1 and summary["failed_by_reason"] == {
        "failed: exit status 1": 2, "wall time limit": 1}

    # a run killed mid-write: the complete lines stay, the partial one goes, the rest is run
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1][:20])
    proc = validate_code("--input", str(src), "--output", str(out), "--wall-s", "1")
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == \
        ["good", 2, "slow", "net"]

    src.write_text(json.dumps(records[0]) + "\n" + '{"id": "x", "code": 1, "tests": ""}\n')
    proc = validate_code("--input", str(src), "--output", str(tmp_path / "o.jsonl"))
    assert proc.returncode == 2
    assert f'{src}:2: "code" must be a string, got int' in proc.stderr
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "else", "code": "", "tests": ""}) + "\n")
    proc = validate_code("--input", str(other), "--output", str(out))
    assert proc.returncode == 2 and "output of another input" in proc.stderr
    proc = validate_code("--input", str(other), "--output", str(tmp_path / "o.jsonl"),
                         "--cpu-s", "0")
    assert proc.returncode == 2 and "--cpu-s must be an integer >= 1" in proc.stderr
