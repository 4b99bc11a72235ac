"""Reading JSON-lines input files whose bad lines are reported as ``file:line``."""

from __future__ import annotations

import json
from typing import Any, Iterator, Tuple, Type


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
