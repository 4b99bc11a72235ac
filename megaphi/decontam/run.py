"""Decontaminating a corpus: the input cut into parts, the parts classified by worker processes
(and by SLURM array tasks), each part's outputs written atomically with a completion marker, and
the parts merged into ``clean``/``partial``/``contaminated`` when all are done.

Layout of ``--output-dir DIR``:

- ``run.json``: the settings and inputs; a relaunch with other settings is refused.
- ``parts/P.{clean,partial,contaminated}.jsonl[.gz]`` and ``parts/P.json``, the part's report,
  written last: a part with its report is done, any other is redone by a relaunch.
- ``shards/shard-I-of-N.done``: every part of array task I of N is done.
- ``clean.jsonl[.gz]``, ``partial.jsonl[.gz]``, ``contaminated.jsonl[.gz]``, ``report.json``:
  written by the process that finds every part done (each through a temporary file and a
  rename, ``report.json`` last); the part outputs are then deleted.

A part is a byte range of an uncompressed file (``--part-size``; a line belongs to the part
holding its first byte) or a whole gzipped file. The parts depend only on the inputs and the part
size, never on the number of shards or workers, so every layout writes the same outputs, in
input order.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from megaphi.decontam.index import (CATEGORIES, LONG, SHORT, BenchmarkIndex, DecontamError,
                                    Match, Thresholds, open_text, write_allowlist)
from megaphi.decontam.ngrams import Normalization, hash_texts

logger = logging.getLogger(__name__)

BATCH_CHARS = 1 << 19
HISTOGRAM_BINS = 20  # of the best 7-gram ratio, over documents sharing any 7-gram


@dataclass(frozen=True)
class Part:
    """Lines of ``path`` whose first byte lies in ``[start, stop)``; the whole file if gzipped."""

    id: str
    path: str
    start: int
    stop: int

    @property
    def gzipped(self) -> bool:
        return self.path.endswith(".gz")


def plan_parts(inputs: Sequence[str], part_bytes: int) -> List[Part]:
    parts = []
    for f, path in enumerate(inputs):
        size = os.path.getsize(path)
        if path.endswith(".gz"):
            parts.append(Part(f"{f:05d}-00000", path, 0, size))
            continue
        for k, start in enumerate(range(0, max(size, 1), part_bytes)):
            parts.append(Part(f"{f:05d}-{k:05d}", path, start, min(size, start + part_bytes)))
    return parts


def shard_parts(parts: List[Part], index: int, count: int) -> List[Part]:
    if not 0 <= index < count:
        raise DecontamError(f"--shard-index {index} is not in [0, --num-shards {count})")
    return parts[index::count]


def check_inputs(inputs: Sequence[str], text_field: str) -> None:
    """Every input exists, and its first line is a JSON object with a string ``text_field``."""
    if not inputs:
        raise DecontamError("no --input files")
    if len(set(inputs)) != len(inputs):
        raise DecontamError("--input names a file twice")
    for path in inputs:
        if not Path(path).is_file():
            raise DecontamError(f"--input {path}: no such file")
        try:
            with open_text(path) as f:
                for number, line in enumerate(f, start=1):
                    if line.strip():
                        _text_of(line, text_field, f"{path}:{number}")
                        break
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise DecontamError(f"--input {path}: cannot read it ({exc})") from None


def _text_of(line, text_field: str, where: str) -> Tuple[dict, str]:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DecontamError(f"{where}: not JSON ({getattr(exc, 'msg', exc)}); fix the line "
                            "or pass --skip-bad-lines") from None
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        what = ("no field" if not isinstance(record, dict) or text_field not in record
                else "a non-string field")
        raise DecontamError(f"{where}: {what} {text_field!r}; name the text field with "
                            "--text-field, or pass --skip-bad-lines")
    return record, record[text_field]


# --------------------------------------------------------------------------------------------
# Reading a part
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _part_lines(part: Part):
    """``(lines, position)``: the part's raw lines, and a function giving how many bytes of the
    file on disk have been consumed (compressed bytes for a gzipped file)."""
    raw = open(part.path, "rb")
    try:
        if part.gzipped:
            stream = gzip.GzipFile(fileobj=raw)
            yield iter(stream), raw.tell
            return
        if part.start:
            raw.seek(part.start - 1)
            raw.readline()  # the rest of the line that started in the part before

        def lines() -> Iterator[bytes]:
            while raw.tell() < part.stop:
                line = raw.readline()
                if not line:
                    return
                yield line

        yield lines(), raw.tell
    finally:
        raw.close()


def _first_line_number(part: Part) -> int:
    """The file line number of the part's first line (counted only to name a bad line): the
    part starts after the first newline at or past byte ``start - 1``."""
    if part.gzipped or part.start == 0:
        return 1
    count, remaining = 0, part.start - 1
    with open(part.path, "rb") as f:
        while remaining > 0:
            chunk = f.read(min(remaining, 1 << 24))
            count += chunk.count(b"\n")
            remaining -= len(chunk)
    return count + 2


# --------------------------------------------------------------------------------------------
# Classifying a part (in a worker process)
# --------------------------------------------------------------------------------------------


@dataclass
class Settings:
    """What a run was asked to do; ``run.json`` holds it."""

    inputs: List[str]
    benchmarks: List[str]
    text_field: str = "text"
    benchmark_field: str = "text"
    benchmark_id_field: str = "id"
    allowlist: Optional[str] = None
    thresholds: Thresholds = field(default_factory=Thresholds)
    normalization: Normalization = field(default_factory=Normalization)
    part_bytes: int = 64 << 20
    skip_bad_lines: bool = False
    gzip_level: int = 1  # intermediate data: level 6 made a gzipped run 2.4x slower

    @property
    def gzip_output(self) -> bool:
        return any(p.endswith(".gz") for p in self.inputs)

    @property
    def suffix(self) -> str:
        return ".jsonl.gz" if self.gzip_output else ".jsonl"

    def fingerprint(self) -> dict:
        """What must not change between a run and its relaunch (--skip-bad-lines may: the
        natural relaunch after a stop at a bad line adds it)."""
        def digest(path: str) -> str:
            return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]

        return {
            "inputs": [{"path": os.path.abspath(p), "bytes": os.path.getsize(p)}
                       for p in self.inputs],
            "benchmarks": [{"path": os.path.abspath(p), "sha256": digest(p)}
                           for p in self.benchmarks],
            "allowlist": (None if self.allowlist is None else
                          {"path": os.path.abspath(self.allowlist),
                           "sha256": digest(self.allowlist)}),
            "text_field": self.text_field, "benchmark_field": self.benchmark_field,
            "benchmark_id_field": self.benchmark_id_field,
            "thresholds": asdict(self.thresholds),
            "normalization": self.normalization.describe(),
            "part_bytes": self.part_bytes, "gzip_level": self.gzip_level,
        }


# The worker processes inherit these (fork) or receive them once (spawn).
_STATE: Dict[str, object] = {}


def _init_worker(index: BenchmarkIndex, settings: Settings, counters) -> None:
    _STATE.update(index=index, settings=settings, counters=counters)


def _report_progress(n_bytes: int, docs: int) -> None:
    counters = _STATE["counters"]
    with counters.get_lock():
        counters[0] += n_bytes
        counters[1] += docs


class _AtomicWriter:
    """``path`` written through ``path.tmp``, gzipped (reproducibly: mtime 0) when asked;
    :meth:`commit` renames it into place."""

    def __init__(self, path: Path, gzipped: bool, level: int):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        raw = open(self.tmp, "wb")
        self.f = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=level, mtime=0,
                               filename="") if gzipped else raw
        self.raw = raw

    def write(self, data: bytes) -> None:
        self.f.write(data)

    def commit(self) -> None:
        self.close()
        os.replace(self.tmp, self.path)

    def close(self) -> None:
        if not self.raw.closed:
            self.f.close()
            self.raw.close()

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.tmp)


def _annotation(match: Match, index: BenchmarkIndex) -> dict:
    out = {"category": match.category}
    if match.stage is None:
        return out
    benchmark, item = index.describe_item(match.item)
    out.update(stage=match.stage, benchmark=benchmark, item=item)
    if match.stage == "13gram":
        out.update(ngram=match.ngram, shared_13grams=match.overlap)
    else:
        out.update(ratio=round(match.ratio, 4), overlap=match.overlap,
                   doc_7grams=match.doc_grams, item_7grams=match.item_grams)
    return out


def process_part(part: Part, out_dir: str) -> dict:
    """Classify every line of ``part`` and write its outputs and report under ``out_dir``."""
    index: BenchmarkIndex = _STATE["index"]
    settings: Settings = _STATE["settings"]
    started = time.perf_counter()
    base = Path(out_dir) / "parts"
    writers = {c: _AtomicWriter(base / f"{part.id}.{c}{settings.suffix}", settings.gzip_output,
                                settings.gzip_level) for c in CATEGORIES}
    skipped_writer = None
    counts = {c: 0 for c in CATEGORIES}
    per_benchmark: Dict[str, Dict[str, set]] = {}
    histogram = [0] * HISTOGRAM_BINS
    skipped, skipped_where = 0, []
    line_base: Optional[int] = None
    reported = 0

    def where(k: int) -> str:
        nonlocal line_base
        if line_base is None:
            line_base = _first_line_number(part)
        return f"{part.path}:{line_base + k}"

    def flush(records: List[dict], texts: List[str]) -> None:
        if not records:
            return
        batch = hash_texts(texts, (LONG, SHORT), settings.normalization)
        out = {c: [] for c in CATEGORIES}
        for record, match in zip(records, index.classify(batch, settings.thresholds)):
            record["decontamination"] = _annotation(match, index)
            out[match.category].append(json.dumps(record, ensure_ascii=False))
            if match.stage is not None:
                if match.stage == "7gram":
                    histogram[min(int(match.ratio * HISTOGRAM_BINS), HISTOGRAM_BINS - 1)] += 1
                if match.category != "clean":
                    name, item = index.describe_item(match.item)
                    per_benchmark.setdefault(name, {"contaminated": set(), "partial": set(),
                                                    "docs_contaminated": [0],
                                                    "docs_partial": [0]})
                    per_benchmark[name][match.category].add(item)
                    per_benchmark[name][f"docs_{match.category}"][0] += 1
        for c, lines in out.items():
            if lines:
                writers[c].write(("\n".join(lines) + "\n").encode("utf-8"))
                counts[c] += len(lines)

    try:
        with _part_lines(part) as (lines, position):
            records, texts, chars = [], [], 0
            for k, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    record, text = _text_of(line, settings.text_field, "")
                except DecontamError as exc:
                    if not settings.skip_bad_lines:
                        raise DecontamError(where(k) + str(exc)) from None
                    if skipped_writer is None:
                        skipped_writer = _AtomicWriter(base / f"{part.id}.skipped.txt", False, 0)
                    skipped_writer.write(line if line.endswith(b"\n") else line + b"\n")
                    skipped += 1
                    if len(skipped_where) < 10:
                        skipped_where.append(where(k))
                    continue
                records.append(record)
                texts.append(text)
                chars += len(text)
                if chars >= BATCH_CHARS:
                    flush(records, texts)
                    now = position()
                    _report_progress(now - part.start - reported, len(records))
                    reported = now - part.start
                    records, texts, chars = [], [], 0
            flush(records, texts)
            _report_progress(part.stop - part.start - reported, len(records))
        for w in writers.values():
            w.commit()
        if skipped_writer is not None:
            skipped_writer.commit()
    except BaseException:
        for w in list(writers.values()) + ([skipped_writer] if skipped_writer else []):
            w.discard()
        raise
    report = {
        "part": part.id, "input": part.path, "start": part.start, "stop": part.stop,
        "documents": counts, "skipped": skipped, "skipped_where": skipped_where,
        "benchmarks": {name: {"docs_contaminated": v["docs_contaminated"][0],
                              "docs_partial": v["docs_partial"][0],
                              "items_contaminated": sorted(v["contaminated"]),
                              "items_partial": sorted(v["partial"])}
                       for name, v in per_benchmark.items()},
        "ratio_histogram": histogram,
        "seconds": round(time.perf_counter() - started, 3),
    }
    _write_json(base / f"{part.id}.json", report)
    return report


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # shards may start together
    tmp.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Running (a shard of) a decontamination
# --------------------------------------------------------------------------------------------


class _Progress:
    """A bar of input bytes, with documents per second, fed from shared counters."""

    def __init__(self, total: int, enabled: bool, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, disable=not enabled, desc=desc, unit="B", unit_scale=True,
                        unit_divisor=1024, file=sys.stderr, mininterval=0.5,
                        dynamic_ncols=True)
        self.start, self.seen = time.perf_counter(), 0

    def poll(self, counters) -> None:
        n_bytes, docs = counters[0], counters[1]
        self.bar.update(n_bytes - self.seen)
        self.seen = n_bytes
        secs = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{docs / secs:,.0f} docs/s", refresh=False)

    def close(self) -> None:
        self.bar.close()


def _mp_context():
    # fork: the workers start at once with the index already in memory (shared copy-on-write)
    return multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")


def run_parts(parts: List[Part], fn: Callable, args: tuple, index: BenchmarkIndex,
              settings: Settings, workers: int, progress: bool, desc: str) -> Iterator[dict]:
    """``fn(part, *args)`` for every part in ``workers`` processes (in this one if 1), yielding
    results as they come, with a progress bar over the parts' bytes."""
    ctx = _mp_context()
    counters = ctx.Array("q", 2)
    bar = _Progress(sum(p.stop - p.start for p in parts), progress, desc)
    try:
        if workers <= 1 or len(parts) <= 1:
            _init_worker(index, settings, counters)
            for part in parts:
                result = fn(part, *args)
                bar.poll(counters)
                yield result
            return
        with ctx.Pool(min(workers, len(parts)), initializer=_init_worker,
                      initargs=(index, settings, counters)) as pool:
            pending = pool.imap_unordered(_call, [(fn, part, args) for part in parts])
            done = 0
            while done < len(parts):
                try:
                    result = pending.next(timeout=0.5)
                except multiprocessing.TimeoutError:
                    bar.poll(counters)
                    continue
                done += 1
                bar.poll(counters)
                yield result
    finally:
        bar.close()


def _call(job):
    fn, part, args = job
    return fn(part, *args)


def _check_run_dir(out: Path, settings: Settings) -> None:
    path = out / "run.json"
    wanted = settings.fingerprint()
    if path.exists():
        held = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(held) | set(wanted) if held.get(k) != wanted.get(k))
        if changed:
            raise DecontamError(
                f"--output-dir {out} holds a run with other {', '.join(changed)}; rerun with "
                "the same settings to resume it, or choose a new --output-dir")
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "parts").mkdir(exist_ok=True)
    (out / "shards").mkdir(exist_ok=True)
    _write_json(path, wanted)


def decontaminate(settings: Settings, out_dir: str, workers: int = 1, shard_index: int = 0,
                  num_shards: int = 1, merge: bool = True, progress: bool = True,
                  index: Optional[BenchmarkIndex] = None) -> Optional[dict]:
    """Run shard ``shard_index`` of ``num_shards``; when every part is then done, merge. Returns
    the merged report, or None while other shards are unfinished. ``index``: the benchmarks'
    index, if already built from ``settings``."""
    settings.thresholds.check()
    check_inputs(settings.inputs, settings.text_field)
    out = Path(out_dir)
    parts = plan_parts(settings.inputs, settings.part_bytes)
    mine = shard_parts(parts, shard_index, num_shards)
    t0 = time.perf_counter()
    index = index or BenchmarkIndex.from_files(
        settings.benchmarks, settings.benchmark_field, settings.benchmark_id_field,
        settings.normalization, settings.allowlist)
    logger.info("benchmark index: %d items of %d benchmarks, %d distinct 13-grams, %d distinct "
                "7-grams (%d and %d allow-listed occurrences dropped), %.1f s", index.num_items,
                len(index.names), len(index.sets[LONG]), len(index.sets[SHORT]),
                index.allowed[LONG], index.allowed[SHORT], time.perf_counter() - t0)
    _check_run_dir(out, settings)
    marker = out / "shards" / f"shard-{shard_index}-of-{num_shards}.done"
    todo = [p for p in mine if not (out / "parts" / f"{p.id}.json").exists()]
    if len(todo) < len(mine):
        logger.info("resuming: %d of this shard's %d parts already done", len(mine) - len(todo),
                    len(mine))
    start = time.perf_counter()
    n_bytes = sum(p.stop - p.start for p in todo)
    docs = 0
    for report in run_parts(todo, process_part, (str(out),), index, settings, workers,
                            progress, "decontaminate"):
        docs += sum(report["documents"].values())
    if todo:
        secs = time.perf_counter() - start
        logger.info("shard %d of %d: %d parts, %.1f MB of input files, %d documents in %.1f s "
                    "(%.1f MB/s, %.0f docs/s)", shard_index, num_shards, len(todo), n_bytes / 1e6, docs,
                    secs, n_bytes / 1e6 / secs, docs / secs)
    marker.write_text(json.dumps({"parts": [p.id for p in mine]}) + "\n", encoding="utf-8")
    if not all((out / "parts" / f"{p.id}.json").exists() for p in parts):
        logger.info("waiting for other shards: the last to finish merges the outputs")
        return None
    return merge_outputs(out, parts, settings, index) if merge else None


def merge_outputs(out: Path, parts: List[Part], settings: Settings,
                  index: BenchmarkIndex) -> dict:
    """Concatenate the parts' outputs in part order, write report.json, delete the parts'
    outputs. Under a lock: of two shards finishing together, one merges."""
    import fcntl

    with open(out / "shards" / "merge.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        report_path = out / "report.json"
        if report_path.exists():
            return json.loads(report_path.read_text(encoding="utf-8"))
        reports = [json.loads((out / "parts" / f"{p.id}.json").read_text(encoding="utf-8"))
                   for p in parts]
        outputs = [(c, f"{c}{settings.suffix}") for c in CATEGORIES]
        if any(r["skipped"] for r in reports):
            outputs.append(("skipped", "skipped.txt"))
        for category, name in outputs:
            tmp = out / f"{name}.tmp"
            with open(tmp, "wb") as f:
                for p in parts:  # gzip members concatenate into one valid gzip file
                    src = out / "parts" / (f"{p.id}.{category}{settings.suffix}"
                                           if category != "skipped" else f"{p.id}.skipped.txt")
                    if src.exists():
                        with open(src, "rb") as g:
                            while chunk := g.read(1 << 24):
                                f.write(chunk)
            os.replace(tmp, out / name)
        report = build_report(reports, settings, index)
        _write_json(report_path, report)
        for p in parts:
            for src in (out / "parts").glob(f"{p.id}.*"):
                if not src.name.endswith(".json"):
                    src.unlink()
        return report


def build_report(reports: List[dict], settings: Settings, index: BenchmarkIndex) -> dict:
    def zero() -> dict:
        return {**{c: 0 for c in CATEGORIES}, "skipped": 0}

    per_input: Dict[str, dict] = {p: {**zero(), "bytes": 0} for p in settings.inputs}
    totals = zero()
    hist = [0] * HISTOGRAM_BINS
    bench = {name: {"items": int((index.item_bench == b).sum()), "docs_contaminated": 0,
                    "docs_partial": 0, "items_contaminated": set(), "items_partial": set()}
             for b, name in enumerate(index.names)}
    skipped_where = []
    for r in reports:
        row = per_input[r["input"]]
        row["bytes"] += r["stop"] - r["start"]
        for c in CATEGORIES:
            row[c] += r["documents"][c]
            totals[c] += r["documents"][c]
        row["skipped"] += r["skipped"]
        totals["skipped"] += r["skipped"]
        skipped_where += r["skipped_where"]
        hist = [a + b for a, b in zip(hist, r["ratio_histogram"])]
        for name, v in r["benchmarks"].items():
            b = bench[name]
            for k in ("docs_contaminated", "docs_partial"):
                b[k] += v[k]
            b["items_contaminated"].update(v["items_contaminated"])
            b["items_partial"].update(v["items_partial"])
    for b in bench.values():
        b["items_contaminated"] = len(b["items_contaminated"])
        b["items_partial"] = len(b["items_partial"])
    return {
        "totals": totals, "per_input": per_input, "per_benchmark": bench,
        "skipped_where": skipped_where[:20],
        "ratio_histogram": {"bins": [round(i / HISTOGRAM_BINS, 3)
                                     for i in range(HISTOGRAM_BINS + 1)], "documents": hist},
        "settings": settings.fingerprint(),
        "outputs": {c: f"{c}{settings.suffix}" for c in CATEGORIES},
    }


# --------------------------------------------------------------------------------------------
# The allow-list
# --------------------------------------------------------------------------------------------


def count_part(part: Part) -> np.ndarray:
    """For every benchmark n-gram (13-grams, then 7-grams), how many of the part's documents
    hold it."""
    index: BenchmarkIndex = _STATE["index"]
    settings: Settings = _STATE["settings"]
    offsets = {LONG: 0, SHORT: len(index.sets[LONG])}
    counts = np.zeros(len(index.sets[LONG]) + len(index.sets[SHORT]), dtype=np.int64)
    reported = 0
    with _part_lines(part) as (lines, position):
        texts, chars = [], 0

        def flush() -> None:
            batch = hash_texts(texts, (LONG, SHORT), settings.normalization)
            for n, offset in offsets.items():
                size = len(index.sets[n])
                positions, keys = index.sets[n].find(batch.grams[n].hashes)
                pairs = np.unique(batch.grams[n].doc[positions] * size + keys)  # per document
                np.add.at(counts, offset + pairs % size, 1)

        for k, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                texts.append(_text_of(line, settings.text_field, "")[1])
            except DecontamError as exc:
                if settings.skip_bad_lines:
                    continue
                raise DecontamError(f"{part.path}:{_first_line_number(part) + k}"
                                    + str(exc)) from None
            chars += len(texts[-1])
            if chars >= BATCH_CHARS:
                flush()
                _report_progress(position() - part.start - reported, len(texts))
                reported = position() - part.start
                texts, chars = [], 0
        if texts:
            flush()
        _report_progress(part.stop - part.start - reported, len(texts))
    return counts


def build_allowlist(benchmarks: Sequence[str], references: Sequence[str], output: str,
                    min_documents: int = 10, benchmark_field: str = "text",
                    text_field: str = "text", norm: Normalization = Normalization(),
                    workers: int = 1, part_bytes: int = 64 << 20, skip_bad_lines: bool = False,
                    progress: bool = True) -> dict:
    """Write the benchmark 13-grams and 7-grams held by at least ``min_documents`` documents
    of the reference corpora; returns counts."""
    if min_documents < 1:
        raise DecontamError(f"--min-documents {min_documents}: must be at least 1")
    check_inputs(references, text_field)
    index = BenchmarkIndex.from_files(benchmarks, benchmark_field, "id", norm)
    settings = Settings(inputs=list(references), benchmarks=list(benchmarks),
                        text_field=text_field, normalization=norm,
                        part_bytes=part_bytes, skip_bad_lines=skip_bad_lines)
    parts = plan_parts(references, part_bytes)
    total = None
    for counts in run_parts(parts, count_part, (), index, settings, workers, progress,
                            "allow-list"):
        total = counts if total is None else total + counts
    n_long = len(index.sets[LONG])
    rows = []
    for offset, n in ((0, LONG), (n_long, SHORT)):
        s = index.sets[n]
        common = np.flatnonzero(total[offset:offset + len(s)] >= min_documents)
        rows += [(n, int(total[offset + k]), text)
                 for k, text in zip(common.tolist(), _gram_texts(index, n, common))]
    rule = (f"a benchmark n-gram (n = {LONG} or {SHORT}) held by at least {min_documents} "
            f"documents of {', '.join(map(str, references))}")
    write_allowlist(output, rows, norm, rule)
    return {"13-grams": sum(r[0] == LONG for r in rows),
            "7-grams": sum(r[0] == SHORT for r in rows),
            "benchmark 13-grams": n_long, "benchmark 7-grams": len(index.sets[SHORT])}


def _gram_texts(index: BenchmarkIndex, n: int, keys: np.ndarray) -> List[str]:
    """The text of each n-gram key, read off the first item holding it."""
    s = index.sets[n]
    out = []
    for key, item in zip(keys.tolist(), s.first_item(keys).tolist()):
        batch = hash_texts([index.item_texts[item]], (n,), index.norm)
        g = batch.grams[n]
        k = int(np.flatnonzero(g.hashes == s.keys[key])[0])
        out.append(batch.ngram_text(int(g.first[k]), n))
    return out
