"""Oracles (megaphi/oracles.py): math-verify in a worker process with a hard timeout (and its
known false positives guarded), option letters, code through the sandbox, dispatch on type."""

import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from megaphi import oracles
from megaphi.oracles import (Verdict, check, choice_equal, extract_choice, extract_code,
                             extract_final_answer, math_equal)

EQUAL = [
    ("0.5", r"\frac{1}{2}"),
    (r"\frac{1}{2}", "0.5"),
    (r"\dfrac{1}{2}", r"\frac12"),
    (r"2\sqrt{2}", r"\sqrt{8}"),
    (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"),
    ("1+x", "x+1"),
    ("1,000", "1000"),
    ("2.0", "2"),
    (r"\frac{\sqrt{3}}{2}", r"\sin(\pi/3)"),
    (r"\{2, 1\}", r"\{1, 2\}"),
    ("85", "85"),
    (r"4\sqrt(2)", r"4\sqrt{2}"),  # the parenthesised root is read as a root
    (r"\boxed{\frac{3}{4}}", "0.75"),
    ("$x = 3$", "3"),
]
NOT_EQUAL = [
    (r"\frac{1}{2006!}", r"\frac{1}{2004!}"),  # math-verify alone: equal (float comparison)
    ("1/2006!", "1/2004!"),
    (r"4\sqrt(2)", "4"),  # math-verify alone: equal (it drops \sqrt(2))
    ("4", r"4\sqrt(2)"),
    ("10^{100}+1", "10^{100}"),
    ("3", "4"),
    ("0.333", r"\frac{1}{3}"),
    (r"\pi", "3.14159"),
    ("x+2", "x+1"),
    ("seven", "7"),
]


@pytest.mark.parametrize("answer, gold", EQUAL)
def test_math_equivalences(answer, gold):
    assert math_equal(answer, gold) == Verdict(True, "equal")


@pytest.mark.parametrize("answer, gold", NOT_EQUAL)
def test_math_non_equivalences(answer, gold):
    verdict = math_equal(answer, gold)
    assert not verdict.correct and verdict.reason.startswith(("not equal", "answer not parsed"))


def test_factorial_pitfall_is_caught_by_the_exact_check():
    """math-verify calls 1/2004! and 1/2006! equal; the exact comparison says not."""
    assert math_equal("1/2006!", "1/2004!") == Verdict(False, "not equal (exact check)")
    assert math_equal(r"\frac{2005 \cdot 2006}{2006!}", "1/2004!") == Verdict(True, "equal")


def test_a_hanging_check_is_killed_at_its_timeout_and_the_worker_replaced():
    assert math_equal("2", "2").correct  # a warm worker
    workers = {p.pid for p in psutil.Process().children() if "_serve" in " ".join(p.cmdline())}
    assert workers
    start = time.monotonic()
    verdict = math_equal("9^{9^{9^{9}}}", "1", timeout_s=1.0)
    assert verdict == Verdict(False, "timeout")
    assert time.monotonic() - start < 4
    alive = {p.pid for p in psutil.Process().children() if "_serve" in " ".join(p.cmdline())}
    assert len(workers - alive) == 1  # the hung worker is gone
    assert math_equal(r"\frac{1}{2}", "0.5") == Verdict(True, "equal")  # a fresh one answers


def test_math_checks_from_threads():
    """math-verify's own timeouts need the main thread; the worker processes do not."""
    pairs = [("0.5", r"\frac12"), ("3", "4"), ("1/2006!", "1/2004!"), (r"\sqrt{4}", "2")] * 2
    with ThreadPoolExecutor(4) as pool:
        verdicts = list(pool.map(lambda p: math_equal(*p).correct, pairs))
    assert verdicts == [True, False, False, True] * 2
    time.sleep(0.3)  # the pool's threads have ended: workers they started must live on
    idle = oracles._get_pool().idle
    assert idle and all(worker.proc.poll() is None for worker in idle)


def test_math_bad_arguments():
    with pytest.raises(ValueError, match="timeout_s must be a positive number"):
        math_equal("1", "1", timeout_s=0)
    with pytest.raises(TypeError, match="strings"):
        math_equal(1, "1")
    with pytest.raises(ValueError, match="gold answer is empty"):
        math_equal("1", " ")
    assert math_equal("", "1") == Verdict(False, "no answer")


@pytest.mark.parametrize("text, answer", [
    (r"so $x = \boxed{\frac{1}{\sqrt{2}}}$ and finally \boxed{x^{2}+\frac{a}{b}}.",
     r"x^{2}+\frac{a}{b}"),
    (r"\boxed{\left\{ 1, 2 \right\}}", r"\left\{ 1, 2 \right\}"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    (r"first \boxed{3}, then a cut-off \boxed{\frac{1}{2", "3"),
    (r"\fbox{42}", "42"),
    (r"The answer is $\frac{1}{2}$.", r"\frac{1}{2}"),
    ("Thus the final answer is: **42**", "42"),
    ("Answer: 7", "7"),
    ("no answer here", None),
])
def test_extract_final_answer(text, answer):
    assert extract_final_answer(text) == answer


@pytest.mark.parametrize("text, letter", [
    ("Answer: C", "C"),
    ("The answer is (B).", "B"),
    (r"Therefore \boxed{D}", "D"),
    (r"\boxed{\text{(A)}}", "A"),
    ("Let me think.\nThe options differ.\nE", "E"),
    ("Reasoning...\n(C)", "C"),
    ("answer: **B**", "B"),
    ("I pick option E because it fits", "E"),
    ("First I thought the answer is A, but the answer is D.", "D"),
    ("A cat is an animal.", None),
    ("no letter", None),
])
def test_extract_choice(text, letter):
    assert extract_choice(text) == letter


def test_choice_equal():
    assert choice_equal("The answer is (C).", "C") == Verdict(True, "correct")
    assert choice_equal("The answer is (C).", "c") == Verdict(True, "correct")
    assert choice_equal("Answer: B", "C") == Verdict(False, "chose B, expected C")
    assert choice_equal("hmm", "C") == Verdict(False, "no option letter found")
    with pytest.raises(ValueError, match="one option letter"):
        choice_equal("Answer: B", "BC")


def test_extract_code():
    text = ("Plan:\n```python\ndef f():\n    return 1\n```\nBetter:\n```py\ndef f():\n"
            "    return 2\n```\nOutput:\n```\n2\n```")
    assert extract_code(text) == "def f():\n    return 2\n"
    assert extract_code("```python\ndef g(): pass") == "def g(): pass"  # cut off at the end
    assert extract_code("```\nx = 1\n```") == "x = 1\n"
    assert extract_code("def h(): return 3") == "def h(): return 3"


def test_check_dispatches_on_type():
    math = {"id": "m", "type": "math", "answer": r"\frac{1}{2}"}
    assert check(math, r"Half of one: \boxed{0.5}") == Verdict(True, "equal")
    assert check(math, r"\boxed{0.25}").correct is False
    assert not check(math, "I do not know").correct
    choice = {"type": "choice", "answer": "B"}
    assert check(choice, "The answer is (B)") == Verdict(True, "correct")
    assert check(choice, "The answer is (A)").correct is False
    # each option applies to its own type: one call fits a file of mixed questions
    assert check(choice, "The answer is (B)", timeout_s=2.0, python="/usr/bin/python3").correct
    assert check(math, r"\boxed{\frac{2}{4}}", timeout_s=2.0, unsafe_no_sandbox=True).correct


@pytest.mark.skipif(shutil.which("bwrap") is None,
                    reason="bubblewrap missing: apt-get install bubblewrap")
def test_check_code_runs_the_tests_in_the_sandbox():
    question = {"type": "code", "tests": "assert add(2, 3) == 5"}
    good = "Here:\n```python\ndef add(a, b):\n    return a + b\n```"
    assert check(question, good) == Verdict(True, "passed")
    wrong = check(question, good.replace("a + b", "a * b"))
    assert wrong == Verdict(False, "failed: exit status 1 (AssertionError)")


def test_check_bad_questions():
    with pytest.raises(ValueError, match=r'question \'q1\': unknown "type" \'essay\''):
        check({"id": "q1", "type": "essay", "answer": "x"}, "text")
    with pytest.raises(ValueError, match='has no "type"'):
        check({"answer": "1"}, "text")
    with pytest.raises(ValueError, match='a math question needs "answer"'):
        check({"type": "math"}, "text")
    with pytest.raises(ValueError, match='a code question needs "tests"'):
        check({"type": "code", "answer": "x"}, "text")
    with pytest.raises(TypeError, match="completion must be a string"):
        check({"type": "choice", "answer": "A"}, None)


def test_missing_math_verify_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(oracles, "_pool", None)
    monkeypatch.setattr(oracles.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install 'math-verify\[antlr4_13_2\]"):
        math_equal("1", "1")
