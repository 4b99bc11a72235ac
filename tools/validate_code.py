#!/usr/bin/env python
"""Run generated code against its unit tests in the sandbox (megaphi/sandbox.py), one JSON
record per line; see --help."""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Dict, List

PROG = "validate_code"
log = logging.getLogger(PROG)

DESCRIPTION = """\
Each input line is {"id", "code", "tests"}; the program code + "\\n" + tests passes if it exits
0 within its limits. Each runs in a bubblewrap sandbox: no network, a read-only view of the
system and the interpreter, a private tmpfs working directory, a cleared environment, an
unprivileged uid, rlimits on CPU time, address space, processes and file size, and a wall-clock
kill of the whole process tree. Without bubblewrap (apt-get install bubblewrap) it refuses,
unless --unsafe-no-sandbox (trusted code only: rlimits and nothing else).

The output has every input field plus "passed", "reason" (passed, failed: exit status N (last
exception line), wall time limit (Xs), CPU time limit, memory limit (...), file size limit
(...), killed by signal N (NAME), sandbox error: ...) and "wall_s", in input order. It is
written as records finish, in order, so a killed run resumes: rerun the same command (delete
OUT to start over)."""

EPILOG = """\
examples:
  %(prog)s --input solutions.jsonl --output checked.jsonl
  %(prog)s --input s.jsonl --output c.jsonl --workers 8 --wall-s 30 --memory-mb 2048

exit status: 0 when every record was run (whether or not it passed), 1 when the sandbox is
unavailable or the disk fails, 2 on bad arguments or input."""

LIMIT_FLAGS = {"cpu_s": "--cpu-s", "wall_s": "--wall-s", "memory_mb": "--memory-mb",
               "processes": "--processes", "file_size_mb": "--file-size-mb"}


class InputError(ValueError):
    """Bad input (the message names file and line)."""


def build_parser() -> argparse.ArgumentParser:
    from megaphi.sandbox import DEFAULT_PYTHON, Limits

    d = Limits()
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, metavar="IN.jsonl",
                   help='{"id", "code", "tests"} per line')
    p.add_argument("--output", required=True, metavar="OUT.jsonl",
                   help="the input records with passed, reason and wall_s (resumable)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="programs run at once (default: the CPU count)")
    p.add_argument("--python", default=DEFAULT_PYTHON, metavar="PATH",
                   help="the interpreter inside the sandbox; every uid must be able to read it "
                        "(default %(default)s)")
    p.add_argument("--unsafe-no-sandbox", action="store_true",
                   help="run without bubblewrap: trusted code only (rlimits, nothing else)")
    limits = p.add_argument_group("limits, per program")
    limits.add_argument("--cpu-s", type=int, default=d.cpu_s,
                        help="CPU seconds per process (default %(default)s)")
    limits.add_argument("--wall-s", type=float, default=d.wall_s,
                        help="wall-clock seconds for the whole tree (default %(default)s)")
    limits.add_argument("--memory-mb", type=int, default=d.memory_mb,
                        help="address space per process, MiB (default %(default)s)")
    limits.add_argument("--processes", type=int, default=d.processes,
                        help="processes and threads (default %(default)s)")
    limits.add_argument("--file-size-mb", type=int, default=d.file_size_mb,
                        help="largest file written, MiB; also caps stdout (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def load_records(path: str) -> List[dict]:
    """The records of ``path``, each checked; :class:`InputError` names file:line."""
    from megaphi.data.jsonl import json_lines

    records, seen = [], {}
    for where, record in json_lines(path, InputError):
        if not isinstance(record, dict):
            raise InputError(f"{where}: a record must be a JSON object with \"id\", \"code\" "
                             f"and \"tests\"")
        if "id" not in record or isinstance(record["id"], (bool, dict, list)) or \
                record["id"] is None:
            raise InputError(f"{where}: a record needs an \"id\" (a string or a number)")
        for key in ("code", "tests"):
            if not isinstance(record.get(key), str):
                got = type(record[key]).__name__ if key in record else "nothing"
                raise InputError(f"{where}: \"{key}\" must be a string, got {got}")
        key = json.dumps(record["id"])
        if key in seen:
            raise InputError(f"{where}: id {record['id']!r} repeats {seen[key]}")
        seen[key] = where
        records.append(record)
    return records


def resume(path: str, records: List[dict]) -> List[dict]:
    """The records already in ``path`` (a previous run's, in input order), after cutting a
    partial last line; :class:`InputError` when ``path`` is not this input's output."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) < len(data):
        log.warning("%s: cutting a partial last line (a killed run)", path)
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    done = []
    for number, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: not JSON ({exc.msg}); delete {path} to start over") \
                from None
        if number > len(records) or not isinstance(record, dict) or \
                record.get("id") != records[number - 1]["id"] or "passed" not in record:
            raise InputError(f"{where}: not the result of input record {number}; {path} is the "
                             f"output of another input: delete it to start over")
        done.append(record)
    return done


def category(reason: str) -> str:
    """A reason without its details: 'failed: exit status 1 (AssertionError)' -> 'failed:
    exit status 1'."""
    return reason.split(" (", 1)[0]


def summarize(results: List[dict]) -> dict:
    passed = sum(1 for r in results if r["passed"])
    reasons = collections.Counter(category(r["reason"]) for r in results if not r["passed"])
    return {"records": len(results), "passed": passed, "failed": len(results) - passed,
            "failed_by_reason": dict(reasons.most_common())}


def validate(records: List[dict], done: List[dict], output: str, workers: int, run_kw: dict,
             progress: bool) -> List[dict]:
    """Run the records not yet in ``done``, appending each result to ``output`` in input
    order as soon as all before it are written."""
    from tqdm import tqdm

    from megaphi.sandbox import check_code

    results = list(done)
    todo = list(range(len(done), len(records)))
    finished: Dict[int, dict] = {}
    next_to_write = len(done)
    with open(output, "a", encoding="utf-8") as out, \
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool, \
            tqdm(total=len(records), initial=len(done), unit="rec", desc=PROG,
                 disable=not progress, dynamic_ncols=True) as bar:
        futures = {pool.submit(check_code, records[i]["code"], records[i]["tests"], **run_kw): i
                   for i in todo}
        pending = set(futures)
        try:
            while pending:
                complete, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in complete:
                    i = futures[future]
                    r = future.result()
                    finished[i] = {**records[i], "passed": r.passed, "reason": r.reason,
                                   "wall_s": round(r.wall_s, 3)}
                while next_to_write in finished:
                    record = finished.pop(next_to_write)
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    results.append(record)
                    next_to_write += 1
                out.flush()
                bar.update(len(complete))
                bar.set_postfix(passed=sum(1 for r in results if r["passed"]), refresh=False)
        except BaseException:
            for future in pending:
                future.cancel()
            raise
        os.fsync(out.fileno())
    return results


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    from megaphi.sandbox import Limits, SandboxUnavailable, run_python

    def fail(message: str, code: int) -> int:
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return code

    if args.workers < 1:
        return fail(f"--workers must be >= 1, got {args.workers}", 2)
    try:
        limits = Limits(args.cpu_s, args.wall_s, args.memory_mb, args.processes,
                        args.file_size_mb)
    except ValueError as exc:
        message = str(exc)
        for field, flag in LIMIT_FLAGS.items():
            message = message.replace(f"Limits.{field}", flag)
        return fail(message, 2)
    if os.path.abspath(args.input) == os.path.abspath(args.output):
        return fail("--output must not be --input", 2)
    try:
        records = load_records(args.input)
        done = resume(args.output, records)
    except InputError as exc:
        return fail(str(exc), 2)
    except (OSError, UnicodeDecodeError) as exc:
        return fail(str(exc), 2)
    run_kw = {"limits": limits, "python": args.python,
              "unsafe_no_sandbox": args.unsafe_no_sandbox}
    try:
        run_python("pass", **run_kw)  # the sandbox works (or a clear error) before the work
    except (SandboxUnavailable, ValueError) as exc:
        return fail(str(exc), 1)
    log.info("%d records from %s (%d already in %s); %d workers; limits: %s%s", len(records),
             args.input, len(done), args.output, args.workers, limits,
             "; WITHOUT a sandbox" if args.unsafe_no_sandbox else "")
    start = time.monotonic()
    try:
        results = validate(records, done, args.output, args.workers, run_kw,
                           progress=not args.no_progress)
    except KeyboardInterrupt:
        return fail(f"interrupted; {args.output} holds the records finished so far: rerun to "
                    "resume", 130)
    except OSError as exc:
        return fail(f"{exc}", 1)
    summary = summarize(results)
    summary["output"] = args.output
    summary["wall_s"] = round(time.monotonic() - start, 1)
    log.info("%d records: %d passed, %d failed%s", summary["records"], summary["passed"],
             summary["failed"], "".join(f"; {n} {reason}"
                                        for reason, n in summary["failed_by_reason"].items()))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
