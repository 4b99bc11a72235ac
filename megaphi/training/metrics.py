"""Per-step metrics to the console, ``metrics.jsonl`` and TensorBoard (one writer rank)."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Dict, Optional

logger = logging.getLogger("megaphi.train")


class MetricsWriter:
    """Writes one JSON object per logged step to ``<run_dir>/metrics.jsonl`` and the same
    scalars to TensorBoard under ``<run_dir>/tensorboard``.

    A fresh run (``resume_step=None``) starts the file anew. A run resumed from a checkpoint
    at step N first drops what an earlier attempt logged after step N (steps it trained past
    its last checkpoint before it crashed or was killed), in the file and in TensorBoard, so
    both read as one run and every step appears once."""

    def __init__(self, run_dir: str, tensorboard: bool, enabled: bool,
                 resume_step: Optional[int] = None):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None:
            _truncate_after(path, resume_step)
        self._jsonl = open(path, "w" if resume_step is None else "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=purge)

    def log(self, step: int, metrics: Dict[str, Optional[float]], prefix: str = "train") -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: v for k, v in metrics.items() if v is not None}}
        self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{prefix}/{key}", value, step)
        logger.info("step %d | %s", step, " | ".join(_fmt(k, v) for k, v in record.items()
                                                     if k != "step"))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def _truncate_after(path: Path, step: int) -> None:
    """Keep the records of ``path`` up to ``step`` (rewritten by temp file + rename)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the crash
    if len(kept) == len(lines):
        return
    logger.info("metrics.jsonl: dropped %d records logged after step %d by the interrupted "
                "attempt", len(lines) - len(kept), step)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _fmt(key: str, value) -> str:
    if isinstance(value, float):
        if key in ("lr",):
            return f"{key} {value:.3e}"
        if key == "mfu":
            return f"{key} {value:.1%}"
        return f"{key} {value:.4g}"
    return f"{key} {value}"
