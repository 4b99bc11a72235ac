"""JSON-lines files: reading input whose bad lines are reported as ``file:line``, and writing
output that a killed run resumes with no duplicates and no losses (:class:`ResumableOutput`)."""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, Tuple, Type

logger = logging.getLogger(__name__)


def json_lines(path: str, error: Type[Exception]) -> Iterator[Tuple[str, Any]]:
    """``(where, value)`` for each non-blank line of ``path``, ``where`` being ``path:line``;
    a line that is not JSON raises ``error("path:line: not JSON (...)")``."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{where}: not JSON ({exc.msg})") from None


class ResumableOutput:
    """An append-only JSON-lines output ``OUT`` written item by item, with
    ``OUT.progress.jsonl`` saying which items are finished, shared by the data-parallel
    processes of one run.

    An item (a question, an input record) writes all its output lines in one append, then one
    progress line ``{"id": ITEM, ...stats}``. Every output line names its item in the field
    ``key``. On opening, the lines of items not marked done (a run killed between the two
    writes, or during the first) are removed, so a rerun that skips the done items writes each
    line exactly once. Every change happens under an exclusive lock on ``OUT.lock``, so the
    processes of one run see an item's lines and its progress line together.

    Args:
        path: ``OUT``.
        key: the field of an output line that names its item.
        owns: which items this process writes (all by default): only their unfinished lines
            are removed on opening.
    """

    def __init__(self, path: str, key: str, owns: Callable[[str], bool] = lambda item: True):
        self.path, self.key = Path(path), key
        self.progress = Path(str(path) + ".progress.jsonl")
        self.lock = Path(str(path) + ".lock")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: Dict[str, dict] = {}
        self._read_to = 0  # bytes of the progress file already read into self.done
        with self._locked():
            self._read_progress()
            if self.progress.exists() and self.progress.stat().st_size > self._read_to:
                os.truncate(self.progress, self._read_to)  # a torn last line: not done
            if self.path.exists():
                text = self.path.read_text(encoding="utf-8")
                lines = text.splitlines(keepends=True)
                keep = [x for x in lines if x.endswith("\n") and x.strip()  # whole lines only
                        and self._keep(x, owns)]
                if len(keep) != len(lines):
                    logger.info("%s: removing %d lines of unfinished items", self.path,
                                len(lines) - len(keep))
                    tmp = self.path.with_suffix(self.path.suffix + f".{os.getpid()}.tmp")
                    tmp.write_text("".join(keep), encoding="utf-8")
                    os.replace(tmp, self.path)
        if self.done:
            logger.info("resuming: %d items already done (%s)", len(self.done), self.progress)

    def _keep(self, line: str, owns: Callable[[str], bool]) -> bool:
        item = str(json.loads(line)[self.key])
        return item in self.done or not owns(item)

    @contextmanager
    def _locked(self):
        import fcntl

        with open(self.lock, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _read_progress(self) -> None:
        """Add to ``done`` the progress lines written since the last read (by any process);
        a torn last line is not done (opening truncates it)."""
        if not self.progress.exists():
            return
        with open(self.progress, "rb") as f:
            f.seek(self._read_to)
            for line in f:
                if not line.endswith(b"\n"):
                    break
                self._read_to += len(line)
                if line.strip():
                    stats = json.loads(line)
                    self.done[str(stats["id"])] = stats

    def write(self, item: str, lines: Iterable[dict], stats: dict) -> Dict[str, dict]:
        """Append a finished item's lines, then mark it done with ``stats``; returns every item
        done so far (all processes)."""
        with self._locked():
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
                f.flush()
                os.fsync(f.fileno())
            with open(self.progress, "a", encoding="utf-8") as f:
                f.write(json.dumps({**stats, "id": item}, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._read_progress()
        return self.done
