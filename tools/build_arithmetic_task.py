#!/usr/bin/env python
"""A toy task with checkable answers for Pivotal Token Search on CPU: addition of two numbers,
as PTS questions (``type: math``, checked by math-verify) and as SFT conversations with
solutions (to train a tiny policy until it succeeds about half the time).

    python tools/build_arithmetic_task.py --questions q.jsonl --sft sft.jsonl --count 2000

Solutions (``--style``):

- ``worked`` adds the digits right to left with the carries, then states the answer as
  ``\\boxed{N}``, e.g. for 47 + 38: ``7 + 8 = 15, write 5 carry 1. 4 + 3 + 1 = 8, write 8.
  The answer is \\boxed{85}.``
- ``direct`` restates the sum and answers: ``4 + 3 = \\boxed{7}.``

``--text`` also writes the problems with their solutions as plain documents, to pre-train a
policy from scratch before SFT. ``--tokenizer DIR`` writes a character-level Hugging Face
tokenizer (102 ids: printable ASCII and Phi-4's chat tokens; train with
``data.tokenizer=DIR model.vocab_size=128``), with which a tiny model learns
``--digits 1 --max-operand 4 --style direct`` in about two minutes on two CPU cores.

The questions and the conversations come from one seeded generator, the questions drawn apart
from the conversations (``--seed``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from typing import Iterator, Optional, Tuple


def worked_solution(a: int, b: int) -> str:
    """Digit-by-digit addition of ``a + b`` with carries, ending with ``\\boxed{a + b}``."""
    steps, carry = [], 0
    da, db = str(a)[::-1], str(b)[::-1]
    for k in range(max(len(da), len(db))):
        x = int(da[k]) if k < len(da) else 0
        y = int(db[k]) if k < len(db) else 0
        total = x + y + carry
        terms = " + ".join([str(x), str(y)] + ([str(carry)] if carry else []))
        carry = total // 10
        steps.append(f"{terms} = {total}, write {total % 10}" + (" carry 1" if carry else ""))
    if carry:
        steps.append("Write the carry 1")
    return ". ".join(steps) + f". The answer is \\boxed{{{a + b}}}."


def direct_solution(a: int, b: int) -> str:
    """``a + b = \\boxed{a + b}.``"""
    return f"{a} + {b} = \\boxed{{{a + b}}}."


SOLUTIONS = {"worked": worked_solution, "direct": direct_solution}


def problems(count: int, digits: int, rng: random.Random,
             max_operand: Optional[int] = None) -> Iterator[Tuple[int, int]]:
    low, high = 10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1
    high = high if max_operand is None else max_operand
    for _ in range(count):
        yield rng.randint(low, high), rng.randint(low, high)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="build_arithmetic_task", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", metavar="Q.jsonl", help="PTS questions to write")
    parser.add_argument("--sft", metavar="SFT.jsonl", help="SFT conversations to write")
    parser.add_argument("--text", metavar="TEXT.jsonl",
                        help="the SFT problems and solutions as plain documents ({\"text\"}) "
                             "to write, for pre-training a policy from scratch")
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="write a character-level Hugging Face tokenizer for the task here")
    parser.add_argument("--count", type=int, default=1000, help="items in each file")
    parser.add_argument("--digits", type=int, default=2, help="digits of each operand (1-4)")
    parser.add_argument("--max-operand", type=int, default=None, metavar="M",
                        help="largest operand (default: the largest with --digits digits)")
    parser.add_argument("--style", choices=sorted(SOLUTIONS), default="worked",
                        help="the solutions' form (default: worked)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not (args.questions or args.sft or args.text or args.tokenizer):
        parser.error("give --questions, --sft, --text and/or --tokenizer")
    if not 1 <= args.digits <= 4 or args.count < 1:
        parser.error("--digits must be 1-4 and --count >= 1")
    low = 10 ** (args.digits - 1) if args.digits > 1 else 0
    if args.max_operand is not None and not low <= args.max_operand < 10 ** args.digits:
        parser.error(f"--max-operand must be a {args.digits}-digit number (>= {low})")
    rng = random.Random(args.seed)
    sft = list(problems(args.count, args.digits, rng, args.max_operand))
    questions = list(problems(args.count, args.digits, rng, args.max_operand))
    solve = SOLUTIONS[args.style]
    if args.sft:
        with open(args.sft, "w", encoding="utf-8") as f:
            for i, (a, b) in enumerate(sft):
                f.write(json.dumps({"id": f"add-sft-{i}", "messages": [
                    {"role": "user", "content": f"What is {a} + {b}?"},
                    {"role": "assistant", "content": solve(a, b)}]}) + "\n")
    if args.text:
        with open(args.text, "w", encoding="utf-8") as f:
            for a, b in sft:
                f.write(json.dumps({"text": f"What is {a} + {b}? {solve(a, b)}"}) + "\n")
    if args.tokenizer:
        from megaphi.data.tokenizer import write_char_tokenizer

        write_char_tokenizer(args.tokenizer)
    if args.questions:
        with open(args.questions, "w", encoding="utf-8") as f:
            for i, (a, b) in enumerate(questions):
                f.write(json.dumps({"id": f"add-{i}", "question": f"What is {a} + {b}?",
                                    "type": "math", "answer": str(a + b)}) + "\n")
    print(f"build_arithmetic_task: {args.count} items of {args.digits}-digit addition"
          + " -> " + ", ".join(x for x in (args.sft, args.text, args.questions, args.tokenizer)
                               if x))
    return 0


if __name__ == "__main__":
    sys.exit(main())
