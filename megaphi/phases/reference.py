"""The reference model's log-probs of a DPO run, computed once and kept in its run directory.

``<run_dir>/reference_logps.npz`` holds, for every preference dataset of the run, the summed
reference log-probs of each pair's chosen and rejected response (a token pair's two next-token
log-probs), NaN for a pair too long for a row, with a fingerprint:

* of each dataset: SHA-256 of its ``.idx`` and ``.bin``, recorded by preprocessing in its
  ``meta.json`` (the arrays are keyed by it, so moving or renaming data files keeps the cache
  valid, and changing their contents does not);
* of the reference: SHA-256 of its ``megaphi.json`` (config and step), its
  ``.metadata`` (tensor layout) and the first MiB of every shard file (weights);
* of ``model.seq_length``, which decides the pairs that fit a row.

A resumed run loads the file and never recomputes. A fingerprint that does not match (other
data, another reference, another sequence length) is refused with one error naming the setting,
before any process group is set up. The file is written whole or not at all.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from megaphi.config.schema import ConfigError

logger = logging.getLogger("megaphi.train")

CACHE_NAME = "reference_logps.npz"
FORMAT = 1
_SAMPLE_BYTES = 1 << 20

Logps = Tuple[np.ndarray, np.ndarray]  # (chosen, rejected) per pair


def cache_path(run_dir) -> Path:
    return Path(run_dir) / CACHE_NAME


def _hash_files(paths: Sequence[Path], limit: Optional[int] = None) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            if limit is not None:
                digest.update(f.read(limit))
                continue
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def dataset_hash(prefix: str) -> str:
    """SHA-256 of a dataset's ``.idx`` and ``.bin``: what its pairs are. Preprocessing records
    it in ``PREFIX.meta.json`` (so the ranks of a large job do not each reread the data); a
    dataset without it is hashed here."""
    from megaphi.data.preprocess import content_hash, dataset_paths, read_meta

    recorded = read_meta(prefix).get("sha256")
    if recorded:
        return recorded
    paths = dataset_paths(prefix)
    return content_hash(paths["idx"], paths["bin"])


def reference_hash(iter_dir: Path) -> str:
    """SHA-256 of a checkpoint's ``megaphi.json``, ``.metadata`` and the first MiB of each
    shard file: which weights it holds, without reading all of them."""
    files = sorted(p for p in Path(iter_dir).iterdir() if p.is_file())
    meta = [p for p in files if p.name in ("megaphi.json", ".metadata")]
    shards = [p for p in files if p not in meta]
    return _hash_files(meta) + _hash_files(shards, limit=_SAMPLE_BYTES)


def fingerprint(prefixes: Sequence[str], reference: Path, seq_length: int) -> dict:
    """What the reference log-probs of these datasets depend on."""
    return {"format": FORMAT, "reference": reference_hash(reference),
            "reference_path": str(Path(reference).resolve()), "seq_length": seq_length,
            "datasets": {prefix: dataset_hash(prefix) for prefix in prefixes}}


def _read(path: Path) -> Tuple[dict, Dict[str, Logps]]:
    with np.load(path) as f:
        stored = json.loads(str(f["fingerprint"]))
        values = {h: (f[f"chosen/{h}"], f[f"rejected/{h}"])
                  for h in stored["datasets"].values()}
    return stored, values


def load_cached(run_dir, expected: dict) -> Optional[Dict[str, Logps]]:
    """The run's stored reference log-probs by dataset prefix, or None when there are none yet.

    Raises:
        ConfigError: they were computed for other data, another reference or another
            ``model.seq_length``, naming the setting.
    """
    path = cache_path(run_dir)
    if not path.is_file():
        return None
    stored, values = _read(path)
    fix = (f"use the settings this run started with, or start a new run (another "
           f"train.run_dir) for this one; delete {path} only to recompute on purpose")
    if stored.get("format") != FORMAT:
        raise ConfigError("train.run_dir", f"{path} is of another format", fix)
    if stored["reference"] != expected["reference"]:
        raise ConfigError("dpo.reference", f"the reference log-probs in {path} were computed "
                          f"with the reference {stored['reference_path']}, not "
                          f"{expected['reference_path']} (or its weights changed)", fix)
    if stored["seq_length"] != expected["seq_length"]:
        raise ConfigError("model.seq_length", f"the reference log-probs in {path} were computed "
                          f"for rows of {stored['seq_length']} tokens, not "
                          f"{expected['seq_length']}", fix)
    known = set(stored["datasets"].values())
    out = {}
    for prefix, digest in expected["datasets"].items():
        if digest not in known:
            raise ConfigError("data.mixture", f"{prefix} is not among the datasets whose "
                              f"reference log-probs {path} holds (new or changed data)", fix)
        out[prefix] = values[digest]
    return out


def save(run_dir, fp: dict, logps: Dict[str, Logps]) -> Path:
    """Write the cache atomically (a temporary file renamed into place)."""
    path = cache_path(run_dir)
    arrays = {"fingerprint": np.asarray(json.dumps(fp))}
    for prefix, (chosen, rejected) in logps.items():
        digest = fp["datasets"][prefix]
        arrays[f"chosen/{digest}"] = np.asarray(chosen, dtype=np.float64)
        arrays[f"rejected/{digest}"] = np.asarray(rejected, dtype=np.float64)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    tmp = path.with_suffix(".npz.tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)
    return path


__all__ = ["CACHE_NAME", "cache_path", "dataset_hash", "reference_hash", "fingerprint",
           "load_cached", "save"]
