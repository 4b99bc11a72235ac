"""Oracles: does a completion solve a question? Selected per question by its ``type``:

- ``math``: the final answer (the last ``\\boxed{...}``, else a trailing "the answer is X")
  against the question's ``answer`` with math-verify, in a worker process with a hard timeout
  (math-verify's own timeouts use ``signal.alarm``, which only works in the main thread);
- ``choice``: the chosen option letter against ``answer``;
- ``code``: the last fenced Python block of the completion with the question's ``tests``, run in
  the sandbox (:mod:`megaphi.sandbox`).

math-verify's known false positives are guarded against: two exact numbers that its float
comparison calls equal (``1/2004!`` and ``1/2006!``) are compared again to 50 significant
digits, and ``\\sqrt(2)`` (which it drops, reading ``4\\sqrt(2)`` as 4) is read as
``\\sqrt{2}``.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import json
import logging
import os
import queue
import re
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import List, Optional

logger = logging.getLogger("megaphi.oracles")

TYPES = {"math": "answer", "choice": "answer", "code": "tests"}
"""Question type -> the field holding what its oracle checks against."""

WORKER_MEMORY_MB = 4096
"""Address space of a math worker: an answer like ``9^{9^{9^9}}`` fails there, not the host."""
WORKER_START_S = 120.0


@dataclass
class Verdict:
    """An oracle's decision and why."""

    correct: bool
    reason: str


# ------------------------------------------------------------------------------------------
# answer extraction


def _balanced(text: str, open_at: int) -> Optional[str]:
    """The text inside the brace group opening at ``text[open_at] == "{"``, or None when it
    does not close. Escaped braces (``\\{``) do not count."""
    depth, i = 0, open_at
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1:i]
        i += 1
    return None


def last_boxed(text: str) -> Optional[str]:
    """The content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``,
    nested braces included; None if there is none."""
    for match in reversed(list(re.finditer(r"\\(?:boxed|fbox)\s*\{", text))):
        inner = _balanced(text, match.end() - 1)
        if inner is not None:
            return inner.strip()
    return None


_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*(.+)", re.IGNORECASE)


def _strip_markup(text: str) -> str:
    text = text.strip()
    for _ in range(3):
        text = re.sub(r"^(\*\*|__|\$\$|\$|\\\(|\\\[)", "", text).strip()
        text = re.sub(r"(\*\*|__|\$\$|\$|\\\)|\\\]|[.;,!])$", "", text).strip()
    return text


def extract_final_answer(text: str) -> Optional[str]:
    """The final answer of a math solution: the last ``\\boxed{...}`` (nested braces handled),
    else what follows the last "answer is" / "answer:" on its line; None if neither."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    matches = list(_ANSWER_IS.finditer(text))
    if not matches:
        return None
    answer = _strip_markup(matches[-1].group(1).splitlines()[0] if matches[-1].group(1) else "")
    return answer or None


# ------------------------------------------------------------------------------------------
# multiple choice

_LETTER = r"\(?\s*\**\s*([A-Z])\s*\**\s*\)?(?![A-Za-z0-9])"
_CHOICE_PATTERNS = [
    re.compile(r"answer\s*(?:is|:)?\s*(?:option\s*)?:?\s*" + _LETTER, re.IGNORECASE),
    re.compile(r"(?:option|choice)\s*(?:is\s*)?" + _LETTER, re.IGNORECASE),
]


def extract_choice(text: str) -> Optional[str]:
    """The option letter a completion chose: ``\\boxed{C}``, else the last "answer is (C)" /
    "Answer: C" / "option C", else a final line that is just the letter ("C", "(C)", "C."),
    else None. Letters are capitals A-Z."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a string, got {type(text).__name__}")
    boxed = last_boxed(text)
    if boxed is not None:
        m = re.fullmatch(r"\s*(?:\\text\{)?\s*\(?([A-Za-z])\)?\s*\}?\s*", boxed)
        if m:
            return m.group(1).upper()
    for pattern in _CHOICE_PATTERNS:
        found = [m for m in pattern.finditer(text) if m.group(1).isupper()]
        if found:
            return found[-1].group(1)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if lines:
        m = re.fullmatch(r"\**\(?([A-Z])\)?[.:]?\**", lines[-1])
        if m:
            return m.group(1)
    return None


def choice_equal(text: str, gold_letter: str) -> Verdict:
    """Whether the option chosen in ``text`` is ``gold_letter`` (one letter, any case)."""
    if not isinstance(gold_letter, str) or not re.fullmatch(r"\s*\(?[A-Za-z]\)?\s*",
                                                           gold_letter):
        raise ValueError(f"the gold answer of a choice question must be one option letter, got "
                         f"{gold_letter!r}")
    gold = re.sub(r"[^A-Za-z]", "", gold_letter).upper()
    chosen = extract_choice(text)
    if chosen is None:
        return Verdict(False, "no option letter found")
    if chosen == gold:
        return Verdict(True, "correct")
    return Verdict(False, f"chose {chosen}, expected {gold}")


# ------------------------------------------------------------------------------------------
# math: the comparison (runs in the worker process)


def _fix_sqrt_parens(text: str) -> str:
    """``\\sqrt(x)`` -> ``\\sqrt{x}`` (balanced parentheses): math-verify drops a
    parenthesised square root, reading ``4\\sqrt(2)`` as 4."""
    out, i = [], 0
    while True:
        j = text.find("\\sqrt(", i)
        if j < 0:
            return "".join(out) + text[i:]
        depth, k = 0, j + 5
        while k < len(text):
            depth += {"(": 1, ")": -1}.get(text[k], 0)
            if depth == 0:
                break
            k += 1
        if depth != 0:
            return "".join(out) + text[i:]
        out.append(text[i:j] + "\\sqrt{" + text[j + 6:k] + "}")
        i = k + 1


def _as_math(text: str) -> str:
    """What math-verify parses: a bare LaTeX answer is wrapped in ``$...$`` (it looks for
    math delimiters or ``\\boxed``)."""
    text = _fix_sqrt_parens(text.strip())
    if "\\boxed" in text or "$" in text or "\\(" in text or "\\[" in text:
        return text
    return f"${text}$"


def _exactly_different(gold, answer) -> bool:
    """True when ``gold`` and ``answer`` are exact numbers (no symbols, no floats) that differ
    at 50 significant digits: math-verify compares numbers in floating point and calls
    ``1/2004!`` and ``1/2006!`` equal."""
    import sympy

    if not (isinstance(gold, sympy.Expr) and isinstance(answer, sympy.Expr)):
        return False
    for e in (gold, answer):
        if e.free_symbols or e.atoms(sympy.Float) or not e.is_number:
            return False
    g, a = sympy.N(gold, 50), sympy.N(answer, 50)
    diff = sympy.N(gold - answer, 50)
    if not all(x.is_number and x.is_finite for x in (g, a, diff)):
        return False
    scale = max(abs(g), abs(a))
    return bool(abs(diff) > scale * sympy.Float("1e-40", 50))


def _compare(answer: str, gold: str) -> dict:
    from math_verify import parse, verify

    parsed_gold = parse(_as_math(gold), parsing_timeout=None)
    if not parsed_gold:
        return {"correct": False, "reason": f"gold answer not parsed: {gold[:100]!r}"}
    parsed = parse(_as_math(answer), parsing_timeout=None)
    if not parsed:
        return {"correct": False, "reason": "answer not parsed"}
    if not verify(parsed_gold, parsed, timeout_seconds=None):
        return {"correct": False, "reason": "not equal"}
    if _exactly_different(parsed_gold[0], parsed[0]):
        return {"correct": False, "reason": "not equal (exact check)"}
    return {"correct": True, "reason": "equal"}


def _serve() -> None:
    """The worker: one JSON request per line on stdin, one JSON reply per line on stdout."""
    import resource

    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints go to stderr, never into the protocol
    try:  # die with the parent (Linux)
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if len(sys.argv) > 1 and os.getppid() != int(sys.argv[1]):
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = WORKER_MEMORY_MB << 20
    if hard == resource.RLIM_INFINITY or hard > limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled" notices
    for module in ("math_verify", "sympy"):  # imported before "ready": not check time
        importlib.import_module(module)

    proto.write('{"ready": true}\n')
    for line in sys.stdin:
        request = json.loads(line)
        try:
            reply = _compare(request["answer"], request["gold"])
        except MemoryError:
            reply = {"correct": False, "reason": "error: MemoryError"}
        except Exception as exc:  # math-verify and sympy raise many kinds
            reply = {"correct": False, "reason": f"error: {type(exc).__name__}: {exc}"[:300]}
        proto.write(json.dumps(reply) + "\n")


# ------------------------------------------------------------------------------------------
# math: the worker pool (parent side)


class _Spawner:
    """Starts worker processes from one long-lived daemon thread: a worker's parent-death
    signal fires when the *thread* that started it ends, so workers started from a caller's
    short-lived thread (a ThreadPoolExecutor's) would be killed with it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: "queue.Queue" = queue.Queue()
        self.thread: Optional[threading.Thread] = None

    def run(self, start):
        with self.lock:
            if self.thread is None or not self.thread.is_alive() or \
                    self.pid != os.getpid():
                self.pid = os.getpid()
                self.thread = threading.Thread(target=self._loop, name="math-verify-spawner",
                                               daemon=True)
                self.thread.start()
        done, box = threading.Event(), {}
        self.requests.put((start, done, box))
        done.wait()
        if "error" in box:
            raise box["error"]
        return box["result"]

    def _loop(self):
        while True:
            start, done, box = self.requests.get()
            try:
                box["result"] = start()
            except BaseException as exc:  # handed to the caller
                box["error"] = exc
            done.set()


_spawner = _Spawner()


class _Worker:
    def __init__(self):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get(
            "PYTHONPATH") else []))
        self.proc = _spawner.run(lambda: subprocess.Popen(
            [sys.executable, "-c", "from megaphi.oracles import _serve; _serve()",
             str(os.getpid())], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
            start_new_session=True))
        self.buffer, self.died = b"", False
        line = self._read_line(time.monotonic() + WORKER_START_S)
        if line is None or not json.loads(line).get("ready"):
            self.kill()
            raise RuntimeError("the math-verify worker process did not start (see its error "
                               "above); is math-verify installed? pip install "
                               "'math-verify[antlr4_13_2]' (megaphi[pts])")

    def _read_line(self, deadline: float) -> Optional[str]:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                self.died = True
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def ask(self, answer: str, gold: str, timeout_s: float) -> Optional[dict]:
        """The worker's reply, or None when it took longer than ``timeout_s`` or died
        (``self.died``)."""
        try:
            self.proc.stdin.write((json.dumps({"answer": answer, "gold": gold}) + "\n").encode())
            self.proc.stdin.flush()
        except OSError:  # BrokenPipeError: it had died
            self.died = True
            return None
        line = self._read_line(time.monotonic() + timeout_s)
        return None if line is None else json.loads(line)

    def kill(self) -> None:
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class _MathPool:
    """Persistent math-verify worker processes, one per concurrent check (up to
    ``max_workers``); a worker past its timeout is killed and replaced on the next check."""

    def __init__(self, max_workers: int):
        self.max_workers = max_workers
        self.idle: List[_Worker] = []
        self.busy = 0
        self.cond = threading.Condition()
        self.pid = os.getpid()

    def check(self, answer: str, gold: str, timeout_s: float) -> Verdict:
        worker = self._acquire()
        reply = None
        try:
            reply = worker.ask(answer, gold, timeout_s)
        finally:
            self._release(worker, alive=reply is not None)
        if reply is None and worker.died:
            logger.warning("math worker died (exit status %s) checking answer %.80r, gold %.80r",
                           worker.proc.returncode, answer, gold)
            return Verdict(False, f"error: worker died (exit status {worker.proc.returncode})")
        if reply is None:
            logger.warning("math check timed out after %gs (worker killed): answer %.80r, "
                           "gold %.80r", timeout_s, answer, gold)
            return Verdict(False, "timeout")
        return Verdict(bool(reply["correct"]), str(reply["reason"]))

    def _acquire(self) -> _Worker:
        with self.cond:
            while not self.idle and self.busy >= self.max_workers:
                self.cond.wait()
            self.busy += 1
            if self.idle:
                return self.idle.pop()
        try:
            return _Worker()
        except BaseException:
            with self.cond:
                self.busy -= 1
                self.cond.notify()
            raise

    def _release(self, worker: _Worker, alive: bool) -> None:
        if not alive:
            worker.kill()
        with self.cond:
            self.busy -= 1
            if alive:
                self.idle.append(worker)
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            workers, self.idle = self.idle, []
        for worker in workers:
            worker.kill()


_pool: Optional[_MathPool] = None
_pool_lock = threading.Lock()


def _get_pool() -> _MathPool:
    global _pool
    with _pool_lock:
        if _pool is None or _pool.pid != os.getpid():  # a forked child starts its own
            if importlib.util.find_spec("math_verify") is None:
                raise ImportError("math-verify is not installed: pip install "
                                  "'math-verify[antlr4_13_2]>=0.9,<0.10' (or megaphi[pts])")
            _pool = _MathPool(max_workers=max(1, os.cpu_count() or 1))
        return _pool


@atexit.register
def close_workers() -> None:
    """Stop the math-verify worker processes (also at exit)."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None and pool.pid == os.getpid():
        pool.close()


def math_equal(answer: str, gold: str, timeout_s: float = 5.0) -> Verdict:
    """Whether ``answer`` equals ``gold`` mathematically (math-verify, gold first), checked in a
    worker process killed after ``timeout_s`` seconds (then ``Verdict(False, "timeout")``).

    A bare LaTeX answer or gold (``\\frac{1}{2}``) is wrapped in ``$...$``; one with ``$`` or
    ``\\boxed`` is parsed as it is. Pass the final answer, not a whole solution (see
    :func:`extract_final_answer`)."""
    if not isinstance(answer, str) or not isinstance(gold, str):
        raise TypeError(f"math_equal needs answer and gold as strings, got "
                        f"{type(answer).__name__} and {type(gold).__name__}")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    if not gold.strip():
        raise ValueError("the gold answer is empty")
    if not answer.strip():
        return Verdict(False, "no answer")
    return _get_pool().check(answer, gold, float(timeout_s))


# ------------------------------------------------------------------------------------------
# dispatch


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str:
    """The program in a completion: the last fenced block tagged python/py/python3 (an
    unclosed last block runs to the end), else the last untagged fenced block, else the whole
    text."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(text)]
    for wanted in (("python", "py", "python3"), ("",)):
        tagged = [body for tag, body in blocks if tag in wanted]
        if tagged:
            return tagged[-1]
    return text


def check(question: dict, completion: str, *, timeout_s: float = 5.0, limits=None,
          python: Optional[str] = None, unsafe_no_sandbox: bool = False) -> Verdict:
    """Whether ``completion`` solves ``question``, by the oracle its ``type`` selects.

    Args:
        question: ``{"type": "math" | "choice", "answer": ...}`` or ``{"type": "code",
            "tests": ...}`` (other fields are ignored).
        completion: the model's whole answer text.
        timeout_s: math: the hard timeout of one math-verify check.
        limits, python, unsafe_no_sandbox: code: those of :func:`megaphi.sandbox.run_python`
            (``limits`` None: the default :class:`~megaphi.sandbox.Limits`).
        Each option applies to its type only, so one call fits a file of mixed questions.

    Raises:
        ValueError: an unknown type or a missing field (named).
    """
    if not isinstance(question, dict):
        raise TypeError(f"question must be a dict, got {type(question).__name__}")
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a string, got {type(completion).__name__}")
    where = f"question {question['id']!r}" if "id" in question else "question"
    kind = question.get("type")
    if kind is None:
        raise ValueError(f'{where} has no "type"; expected one of {", ".join(TYPES)}')
    if kind not in TYPES:
        raise ValueError(f'{where}: unknown "type" {kind!r}; expected one of '
                         f'{", ".join(TYPES)}')
    field = TYPES[kind]
    if field not in question:
        raise ValueError(f'{where}: a {kind} question needs "{field}"')
    if kind == "code":
        from megaphi.sandbox import Limits, check_code

        result = check_code(extract_code(completion), str(question["tests"]),
                            limits=limits if limits is not None else Limits(), python=python,
                            unsafe_no_sandbox=unsafe_no_sandbox)
        return Verdict(result.passed, result.reason)
    gold = str(question[field])
    if kind == "choice":
        return choice_equal(completion, gold)
    answer = extract_final_answer(completion)
    if answer is None:
        return Verdict(False, "no final answer (no \\boxed{} or 'the answer is')")
    return math_equal(answer, gold, timeout_s=timeout_s)
