"""Per-step metrics to the console, ``metrics.jsonl`` and TensorBoard (one writer rank)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Dict, Optional

logger = logging.getLogger("megaphi.train")


class MetricsWriter:
    """Writes one JSON object per logged step to ``<run_dir>/metrics.jsonl`` (a fresh run
    starts the file anew; a resumed run appends) and the same scalars to TensorBoard under
    ``<run_dir>/tensorboard``."""

    def __init__(self, run_dir: str, tensorboard: bool, enabled: bool, fresh: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        self._jsonl = open(Path(run_dir) / "metrics.jsonl", "w" if fresh else "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

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


def _fmt(key: str, value) -> str:
    if isinstance(value, float):
        if key in ("lr",):
            return f"{key} {value:.3e}"
        if key == "mfu":
            return f"{key} {value:.1%}"
        return f"{key} {value:.4g}"
    return f"{key} {value}"
