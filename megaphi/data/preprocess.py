"""Preprocess JSON-lines corpora into Megatron-Core indexed datasets.

One JSON object per line (plain or gzip) becomes one document, followed by the tokenizer's
``eod_id``. What a line holds depends on the dataset's kind (``format`` of :func:`preprocess`,
recorded as ``kind`` in the meta; see :data:`KINDS`):

* ``text``: the string under ``json_key``, tokenised as ordinary text (special-token strings in
  it are plain text); pre-training documents.
* ``chat``: a conversation ``{"messages": [{"role": ..., "content": ...}, ...]}`` rendered in
  Phi-4's chat format by :func:`megaphi.data.chat.render_chat`; the loss mask is not stored, as
  :func:`megaphi.data.chat.loss_mask_from_ids` recovers it from the ids. The meta also records
  ``assistant_tokens``, the tokens that carry loss.
* ``preference``: a DPO pair, full-length or token pair (:mod:`megaphi.data.preference`), stored
  as one document of several sequences (3: prompt, chosen, rejected; 2: context, [chosen id,
  rejected id]) with no end-of-document token; the line's other fields go, one JSON object per
  pair, to the sidecar ``PREFIX.extra.jsonl``. The meta records ``pairs``, ``full_pairs`` and
  ``token_pairs``.

The result is ``PREFIX.bin`` + ``PREFIX.idx``, written with Megatron-Core's
``IndexedDatasetBuilder`` so ``IndexedDataset(PREFIX)`` reads it, and ``PREFIX.meta.json``, which
records the kind and the tokenizer's fingerprint so training can refuse data made with another
vocabulary or of another kind.

Tokenisation runs in worker processes over chunks of lines; the main process writes the chunks
in input order, so the output is byte-identical whatever the number of workers. Outputs are
written under ``.tmp`` names and renamed only on success, ``.meta.json`` last: a dataset whose
``.meta.json`` exists is complete, and a failed or interrupted run leaves earlier outputs alone.

:func:`preprocess` and :func:`merge` are the entry points (``tools/preprocess_data.py`` is the
command line); :func:`read_meta` is what training uses to check a dataset's tokenizer, and
:func:`dataset_kind` its kind.
"""

from __future__ import annotations

import array
import collections
import concurrent.futures
import contextlib
import gzip
import json
import logging
import multiprocessing
import os
import signal
import struct
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from megaphi.data.chat import (
    CONVERSATION_FORMAT,
    ChatFormatError,
    chat_token_ids,
    parse_conversation,
    render_chat,
)
from megaphi.data.preference import (
    FULL,
    PAIR_FORMAT,
    extra_path,
    pair_metadata,
    parse_pair,
)

logger = logging.getLogger(__name__)

META_FORMAT = "megaphi-indexed-v1"
KINDS = ("text", "chat", "preference")
"""Kinds of dataset (:func:`preprocess`'s ``format``, the meta's ``kind``): ``text`` documents for
pre-training, ``chat`` conversations for SFT, ``preference`` pairs for DPO. A meta without
``kind`` (written before kinds existed) is ``text``."""
DEFAULT_CHUNK_BYTES = 1 << 20
"""Bytes of input per chunk a worker tokenises: large enough that pickling and process hops
cost next to nothing, small enough to keep workers evenly busy on a few MB of input."""

_GZIP_MAGIC = b"\x1f\x8b"
_IDX_HEADER = b"MMIDIDX\x00\x00"  # Megatron-Core's .idx magic, followed by version and dtype code
_MAX_REPORTED_BAD_LINES = 10
# array.array typecodes of the dtypes DType.optimal_dtype picks (C short and int: 2 and 4 bytes)
_ARRAY_TYPECODES = {np.dtype(np.uint16): "H", np.dtype(np.int32): "i"}
_JSON_TYPE_NAMES = {dict: "an object", list: "an array", str: "a string", int: "a number",
                    float: "a number", bool: "a boolean", type(None): "null"}

PathLike = Union[str, os.PathLike]


DOCUMENT_NOUNS = {"text": "documents", "chat": "conversations", "preference": "pairs"}


class PreprocessError(ValueError):
    """Bad input to preprocessing (a file, a line, a dataset). The message names it and the fix."""


@dataclass(frozen=True)
class PreprocessResult:
    """What a :func:`preprocess` or :func:`merge` run wrote."""

    prefix: str
    """Output prefix: the dataset is ``prefix.bin``, ``prefix.idx`` and ``prefix.meta.json``."""
    documents: int
    """Documents written (one per non-blank, non-skipped input line)."""
    tokens: int
    """Tokens written, the ``eod_id`` ending each document included."""
    skipped_lines: int
    """Bad input lines skipped (only with ``skip_bad_lines``)."""
    bytes_written: int
    """Size of ``.bin`` plus ``.idx``."""
    seconds: float
    """Wall time of the run (after the checks and imports that precede any work)."""
    kind: str = "text"
    """The dataset's kind (:data:`KINDS`)."""
    counts: Dict[str, int] = field(default_factory=dict)
    """Counts particular to the kind, also recorded in the meta (chat: ``assistant_tokens``)."""

    def summary(self) -> str:
        """One line for a person: documents, tokens, bytes, seconds and rates."""
        secs = max(self.seconds, 1e-9)
        noun = DOCUMENT_NOUNS.get(self.kind, "documents")
        counts = "".join(f" ({value:,} {name.replace('_', ' ')})"
                         for name, value in self.counts.items() if name != noun)
        line = (f"{self.documents:,} {noun}, {self.tokens:,} tokens{counts}, "
                f"{_human_bytes(self.bytes_written)} written to {self.prefix}.{{bin,idx}} in "
                f"{self.seconds:.2f} s ({_human_rate(self.documents / secs)} docs/s, "
                f"{_human_rate(self.tokens / secs)} tok/s)")
        if self.skipped_lines:
            line += f"; {self.skipped_lines:,} bad line{'s' * (self.skipped_lines > 1)} skipped"
        return line


def dataset_paths(prefix: PathLike) -> Dict[str, str]:
    """The files of the dataset at ``prefix``: keys ``bin``, ``idx`` and ``meta``."""
    prefix = os.fspath(prefix)
    return {"bin": prefix + ".bin", "idx": prefix + ".idx", "meta": prefix + ".meta.json"}


def read_meta(prefix: PathLike) -> dict:
    """Read and check ``PREFIX.meta.json``, the record of a complete dataset.

    Raises:
        PreprocessError: the file is missing (an unfinished run, or not a megaphi dataset),
            is not JSON, or lacks the fields training relies on.
    """
    path = dataset_paths(prefix)["meta"]
    redo = "rerun tools/preprocess_data.py to (re)create the dataset"
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        if os.path.isfile(dataset_paths(prefix)["bin"]) and os.path.isfile(
                dataset_paths(prefix)["idx"]):
            raise PreprocessError(
                f"{path} does not exist, but {os.fspath(prefix)}.bin and .idx do: a dataset "
                "written by another tool (Megatron-LM's preprocess_data.py) or an unfinished "
                f"run; adopt it with: python tools/preprocess_data.py --adopt "
                f"{os.fspath(prefix)} [--tokenizer ...], or {redo}") from None
        raise PreprocessError(f"{path} does not exist, so {os.fspath(prefix)} is not a complete "
                              f"megaphi dataset (wrong prefix, or an unfinished run); check the "
                              f"prefix or {redo}") from None
    except (OSError, ValueError) as e:
        raise PreprocessError(f"{path} is not readable JSON ({e}); {redo}") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise PreprocessError(f"{path} has format {found!r}, expected {META_FORMAT!r}; {redo}")
    tok = meta.get("tokenizer")
    missing = [k for k in ("documents", "tokens", "inputs") if k not in meta]
    if not isinstance(tok, dict) or "fingerprint" not in tok:
        missing.append("tokenizer.fingerprint")
    if missing:
        raise PreprocessError(f"{path} lacks {', '.join(missing)}; {redo}")
    kind = meta.get("kind", "text")
    if kind not in KINDS:
        raise PreprocessError(f"{path} has kind {kind!r}, which this version of megaphi does not "
                              f"know (kinds: {', '.join(KINDS)}); update megaphi or {redo}")
    return meta


def dataset_kind(prefix: PathLike) -> str:
    """The kind of the dataset at ``prefix`` (one of :data:`KINDS`); ``"text"`` for datasets
    written before kinds were recorded.

    Raises:
        PreprocessError: as :func:`read_meta`.
    """
    return read_meta(prefix).get("kind", "text")


def default_workers() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def preprocess(
    inputs: Sequence[PathLike],
    output_prefix: PathLike,
    tokenizer: Any,
    *,
    format: str = "text",
    json_key: Optional[str] = None,
    workers: Optional[int] = None,
    skip_bad_lines: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: bool = False,
) -> PreprocessResult:
    """Tokenise JSON-lines files into the indexed dataset ``output_prefix`` (.bin/.idx/.meta.json).

    Args:
        inputs: JSON-lines files, plain or gzip (by ``.gz`` suffix or magic bytes), in order.
        output_prefix: where to write; its directory is created if missing.
        tokenizer: has ``tokenize(text) -> list[int]``, ``eod_id``, ``vocab_size`` and
            ``describe()`` (see :mod:`megaphi.data.tokenizer`), and for chat ``encode`` with
            Phi-4's chat special tokens; picklable when workers > 1.
        format: what each line holds (one of :data:`KINDS`, recorded as the meta's ``kind``):
            ``"text"``, a document's text under ``json_key``; ``"chat"``, a conversation
            (:func:`megaphi.data.chat.parse_conversation`), written as
            :func:`megaphi.data.chat.render_chat`'s ids.
            ``"preference"``, a DPO pair (:func:`megaphi.data.preference.parse_pair`), written
            as one document of 3 or 2 sequences without eod, its other fields to
            ``PREFIX.extra.jsonl``.
        json_key: key of each line's text (text only; default ``"text"``).
        workers: tokenising processes; ``None`` means one per CPU, 1 tokenises in this process.
        skip_bad_lines: skip (and count) bad lines (text: not JSON objects with a string under
            ``json_key``; chat: not valid conversations) instead of stopping at the first one.
        chunk_bytes: input bytes per unit of work (the output does not depend on it).
        progress: show a progress bar on stderr.

    Raises:
        PreprocessError: a missing input, a bad line (with file and line number), a bad argument.
            No output file is left behind.
    """
    inputs = [os.fspath(p) for p in inputs]
    workers = default_workers() if workers is None else workers
    lines = _line_format(format, tokenizer, json_key)
    _check_preprocess_args(inputs, output_prefix, tokenizer, lines, workers, chunk_bytes)
    dtype = _token_dtype(tokenizer.vocab_size)  # imports Megatron-Core: outside the timing
    start = time.perf_counter()
    job = _ChunkJob(lines, skip_bad_lines, dtype)
    total_bytes = sum(os.path.getsize(p) for p in inputs)
    described = tokenizer.describe()
    logger.info("tokenising %d file(s), %s, with %d worker(s) into %s (tokenizer %s, "
                "fingerprint %s)", len(inputs), _human_bytes(total_bytes), workers,
                os.fspath(output_prefix), described.get("name"), described.get("fingerprint"))

    bar = _LazyBar(total_bytes, progress, Path(output_prefix).name)
    with AtomicDataset(output_prefix, extra=lines.sequences) as out, bar, contextlib.closing(
            _ordered_results(job, _chunks(inputs, chunk_bytes), workers)) as results:
        builder = out.builder(dtype)
        docs = tokens = skipped = 0
        counts = dict.fromkeys(lines.counts, 0)
        for task, result in results:
            path = inputs[task.file_index]
            _report_bad_lines(path, result, skip_bad_lines, lines.rule, already=skipped)
            _check_token_range(path, result, tokenizer.vocab_size)
            skipped += result.skipped
            for name, value in result.counts.items():
                counts[name] += value
            offsets = np.cumsum(result.lengths)
            begin = 0
            if result.sequence_counts is None:  # one sequence per document
                for end, length in zip(offsets.tolist(), result.lengths.tolist()):
                    builder.add_document(result.tokens[begin:end], [length])
                    begin = end
            else:
                seq_lengths, seq = result.sequence_lengths.tolist(), 0
                for end, n_seqs in zip(offsets.tolist(), result.sequence_counts.tolist()):
                    builder.add_document(result.tokens[begin:end], seq_lengths[seq:seq + n_seqs])
                    begin, seq = end, seq + n_seqs
                out.write_extra(result.extra)
            docs += len(result.lengths)
            tokens += len(result.tokens)
            bar.update(task.progress_bytes, docs, tokens, start)
        if docs == 0:
            logger.warning("no documents in %s: the dataset at %s is empty",
                           ", ".join(inputs), os.fspath(output_prefix))
        meta = {"format": META_FORMAT, "kind": lines.kind, "tokenizer": described,
                "documents": docs, "tokens": tokens, **counts, "skipped_lines": skipped,
                "inputs": inputs, **lines.meta(), "dtype": np.dtype(dtype).name}
        written = out.commit(meta)
    return PreprocessResult(os.fspath(output_prefix), docs, tokens, skipped, written,
                            time.perf_counter() - start, lines.kind, counts)


def merge(prefixes: Sequence[PathLike], output_prefix: PathLike, *,
          progress: bool = False) -> PreprocessResult:
    """Concatenate datasets into ``output_prefix``, in order (``IndexedDatasetBuilder.add_index``).

    The result is what preprocessing the inputs of all of them in one run would give. Its meta
    sums documents, tokens, skipped lines and the counts of the kind (chat: assistant tokens;
    preference: pairs) and lists every input file; preference sidecars are concatenated.

    Raises:
        PreprocessError: a prefix is not a complete dataset, the datasets are of different kinds
            (text and chat), or they were tokenised with different tokenizers (fingerprints
            differ). No output file is left behind.
    """
    prefixes = [os.fspath(p) for p in prefixes]
    if not prefixes:
        raise PreprocessError("nothing to merge; pass at least one dataset prefix to --merge")
    check_output_prefix(output_prefix)
    metas = [read_meta(p) for p in prefixes]
    dtype = _check_mergeable(prefixes, metas)
    start = time.perf_counter()

    kind = metas[0].get("kind", "text")
    sequences = _LINE_FORMATS[kind].sequences
    with AtomicDataset(output_prefix, extra=sequences) as out, progress_bar(
            len(prefixes), progress, Path(output_prefix).name, unit="dataset") as bar:
        builder = out.builder(dtype)
        for prefix in prefixes:
            builder.add_index(prefix)
            if sequences:
                with open(extra_path(prefix), "rb") as f:
                    out.write_extra(f.read())
            bar.update(1)
        counts = {name: sum(m.get(name, 0) for m in metas) for name in _LINE_FORMATS[kind].counts}
        meta = {"format": META_FORMAT, "kind": kind, "tokenizer": metas[0]["tokenizer"],
                "documents": sum(m["documents"] for m in metas),
                "tokens": sum(m["tokens"] for m in metas), **counts,
                "skipped_lines": sum(m.get("skipped_lines", 0) for m in metas),
                "inputs": [p for m in metas for p in m["inputs"]]}
        if kind == "text":
            keys = {m.get("json_key") for m in metas}
            meta["json_key"] = keys.pop() if len(keys) == 1 else sorted(map(str, keys))
        meta.update({"dtype": np.dtype(dtype).name, "merged_from": prefixes})
        written = out.commit(meta)
    return PreprocessResult(os.fspath(output_prefix), meta["documents"], meta["tokens"],
                            meta["skipped_lines"], written, time.perf_counter() - start, kind,
                            counts)


def open_jsonl(path: PathLike):
    """A binary file object over ``path``'s lines, decompressed if it is gzip (suffix or magic)."""
    return gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb")


def _is_gzip(path: PathLike) -> bool:
    path = os.fspath(path)
    with open(path, "rb") as f:
        return path.endswith(".gz") or f.read(2) == _GZIP_MAGIC


# ----------------------------------------------------------------------------------------------
# Checks


def _check_preprocess_args(inputs, output_prefix, tokenizer, lines, workers, chunk_bytes):
    if not inputs:
        raise PreprocessError("no input files; pass JSON-lines files with --input")
    for path in inputs:
        if not os.path.exists(path):
            raise PreprocessError(f"input file {path} does not exist; check the path")
        if not os.path.isfile(path):
            raise PreprocessError(f"input {path} is not a file; pass JSON-lines files")
        if not os.access(path, os.R_OK):
            raise PreprocessError(f"input file {path} is not readable; check its permissions")
    if not isinstance(workers, int) or workers < 1:
        raise PreprocessError(f"workers must be a positive integer, got {workers!r}; fix --workers")
    if chunk_bytes < 1:
        raise PreprocessError(f"chunk_bytes must be positive, got {chunk_bytes}")
    for attr in ("tokenize", "eod_id", "vocab_size", "describe"):
        if not hasattr(tokenizer, attr):
            raise PreprocessError(f"tokenizer {tokenizer!r} has no {attr!r}; use one from "
                                  "megaphi.data.tokenizer.load_tokenizer")
    lines.check()
    check_output_prefix(output_prefix)


def check_output_prefix(prefix: PathLike) -> None:
    prefix = os.fspath(prefix)
    if not prefix or prefix.endswith(("/", os.sep)) or os.path.isdir(prefix):
        raise PreprocessError(f"output prefix {prefix!r} is a directory; give a file prefix such "
                              f"as {os.path.join(prefix or '.', 'corpus')!r} (writes corpus.bin, "
                              "corpus.idx and corpus.meta.json)")


def _check_mergeable(prefixes: List[str], metas: List[dict]) -> Any:
    """The common token dtype of the datasets; refuses differing tokenizers or broken indexes."""
    first_kind = metas[0].get("kind", "text")
    for prefix, meta in zip(prefixes, metas):
        if meta.get("kind", "text") != first_kind:
            raise PreprocessError(
                f"cannot merge {prefix} (kind {meta.get('kind', 'text')}) with {prefixes[0]} "
                f"(kind {first_kind}): a dataset holds one kind of document; merge datasets of "
                "one kind, and mix kinds in training's data mixture instead")
    first_tok = metas[0]["tokenizer"]
    for prefix, meta in zip(prefixes, metas):
        tok = meta["tokenizer"]
        if tok["fingerprint"] != first_tok["fingerprint"]:
            raise PreprocessError(
                f"cannot merge {prefix} (tokenizer {tok.get('name')}, fingerprint "
                f"{tok['fingerprint']}) with {prefixes[0]} (tokenizer {first_tok.get('name')}, "
                f"fingerprint {first_tok['fingerprint']}): they were tokenised with different "
                "tokenizers; preprocess all inputs again with the same --tokenizer")
    dtypes = {check_complete(prefix, meta) for prefix, meta in zip(prefixes, metas)}
    if len(dtypes) != 1:
        raise PreprocessError(f"datasets {', '.join(prefixes)} store tokens as different dtypes "
                              f"({', '.join(sorted(np.dtype(d).name for d in dtypes))}); "
                              "preprocess them again with the same --tokenizer")
    return dtypes.pop()


def check_complete(prefix: PathLike, meta: dict) -> Any:
    """The files of the dataset ``meta`` describes are all there and agree with it (the .bin,
    the sidecar of kinds that have one, the .idx's document count); returns the token dtype.

    Raises:
        PreprocessError: naming the file and the fix.
    """
    prefix = os.fspath(prefix)
    paths = dataset_paths(prefix)
    if not os.path.isfile(paths["bin"]):
        raise PreprocessError(f"{paths['bin']} does not exist though {paths['meta']} does; "
                              f"preprocess {prefix} again")
    if _LINE_FORMATS[meta.get("kind", "text")].sequences and not os.path.isfile(
            extra_path(prefix)):
        raise PreprocessError(f"{extra_path(prefix)} does not exist though {paths['meta']} "
                              f"does; preprocess {prefix} again")
    dtype, documents = _read_idx_header(paths["idx"])
    if documents != meta["documents"]:
        raise PreprocessError(f"{paths['idx']} holds {documents} documents but "
                              f"{paths['meta']} says {meta['documents']}; the files are from "
                              f"different runs: preprocess {prefix} again")
    return dtype


def _read_idx_header(idx_path: str) -> Tuple[Any, int]:
    """(token dtype, number of documents) from a Megatron-Core .idx header."""
    from megatron.core.datasets.indexed_dataset import DType

    try:
        with open(idx_path, "rb") as f:
            header = f.read(len(_IDX_HEADER) + 8 + 1 + 8 + 8)
    except FileNotFoundError:
        raise PreprocessError(f"{idx_path} does not exist; preprocess that dataset again") from None
    if len(header) < len(_IDX_HEADER) + 25 or not header.startswith(_IDX_HEADER):
        raise PreprocessError(f"{idx_path} is not a Megatron-Core index file; preprocess that "
                              "dataset again")
    offset = len(_IDX_HEADER) + 8
    dtype = DType.dtype_from_code(header[offset])
    _, document_count = struct.unpack("<QQ", header[offset + 1:offset + 17])
    return dtype, document_count - 1  # document_indices starts with a leading 0


def _token_dtype(vocab_size: int):
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


def _report_bad_lines(path: str, result: "_ChunkResult", skip_bad_lines: bool, rule: str,
                      already: int) -> None:
    """Raise on a chunk's first bad line, or (skipping) log the run's first few of them.
    ``rule`` says what a line must be and how to fix one (the line format's :attr:`rule`)."""
    for number, (line_number, reason) in enumerate(result.bad_lines, start=already):
        if not skip_bad_lines:
            raise PreprocessError(f"{path}:{line_number}: {reason}; {rule}")
        if number < _MAX_REPORTED_BAD_LINES:
            logger.warning("skipping bad line %s:%d: %s", path, line_number, reason)
        elif number == _MAX_REPORTED_BAD_LINES:
            logger.warning("skipping more bad lines without reporting each")


def _check_token_range(path: str, result: "_ChunkResult", vocab_size: int) -> None:
    if result.out_of_range is not None:
        raise PreprocessError(f"the tokenizer produced id {result.out_of_range} on {path}, outside "
                              f"its vocabulary of {vocab_size}; fix the tokenizer's vocab_size")


# ----------------------------------------------------------------------------------------------
# Reading and tokenising chunks


@dataclass(frozen=True)
class _Task:
    file_index: int
    first_line: int
    data: bytes
    progress_bytes: int  # input-file bytes (compressed, for gzip) this chunk accounts for


def _chunks(inputs: List[str], chunk_bytes: int) -> Iterator[_Task]:
    """Whole lines of every input in order, ``chunk_bytes`` at a time, with 1-based line numbers."""
    for file_index, path in enumerate(inputs):
        compressed = _is_gzip(path)
        with open(path, "rb") as raw:
            stream = gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw
            line, carry, reported = 1, b"", 0
            while True:
                try:
                    block = stream.read(chunk_bytes)
                except (OSError, EOFError, zlib.error) as e:
                    if not compressed:
                        raise
                    raise PreprocessError(f"{path} is not a valid gzip file ({e}); check the "
                                          "file or decompress it") from None
                if not block:
                    break
                cut = block.rfind(b"\n") + 1
                if cut == 0:  # one line longer than a chunk: keep reading
                    carry += block
                    continue
                data, carry = carry + block[:cut], block[cut:]
                position = raw.tell()
                yield _Task(file_index, line, data, position - reported)
                line += data.count(b"\n")
                reported = position
            size = os.fstat(raw.fileno()).st_size
            if carry or size > reported:  # a last line without a newline, or only progress
                yield _Task(file_index, line, carry, size - reported)


@dataclass(frozen=True)
class _ChunkResult:
    tokens: np.ndarray  # [tokens in chunk], the builder's dtype, documents back to back
    lengths: np.ndarray  # [documents in chunk], int64, eod included
    skipped: int
    bad_lines: List[Tuple[int, str]]  # (1-based line number, reason), the first few
    out_of_range: Optional[int]  # a token id outside the vocabulary, if any
    counts: Dict[str, int]  # the line format's counts over the chunk
    # formats whose documents are several sequences (lines.sequences), else None and b"":
    sequence_lengths: Optional[np.ndarray] = None  # [sequences in chunk], int64
    sequence_counts: Optional[np.ndarray] = None  # [documents in chunk], sequences of each
    extra: bytes = b""  # the sidecar's lines of the chunk's documents (JSON objects)


@dataclass
class _BadLines:
    """The bad lines of a chunk: how many, and the first few as (1-based line, reason)."""

    skipped: int = 0
    first: List[Tuple[int, str]] = field(default_factory=list)


@dataclass(frozen=True)
class _ChunkJob:
    """Tokenises one chunk of lines; runs in a worker process (or here with one worker)."""

    lines: "_LineFormat"
    skip_bad_lines: bool
    dtype: Any

    def __call__(self, task: _Task) -> _ChunkResult:
        if self.lines.sequences:
            return self._sequences(task)
        eod = self.lines.tokenizer.eod_id
        # ids go straight into a C array of the output dtype: no big list of Python ints, and
        # the main process receives bytes to write, not objects to convert
        flat = array.array(_ARRAY_TYPECODES[np.dtype(self.dtype)])
        lengths: List[int] = []
        out_of_range = None
        counts = dict.fromkeys(self.lines.counts, 0)
        bad = _BadLines()
        for docs in self._documents_of_lines(task, counts, bad):
            for ids in docs:
                try:
                    flat.fromlist(ids if type(ids) is list else list(ids))
                    flat.append(eod)
                except OverflowError:  # an id that does not fit the dtype: certainly out of range
                    limits = np.iinfo(self.dtype)
                    out_of_range = next(i for i in [*ids, eod]
                                        if not limits.min <= i <= limits.max)
                    break
                lengths.append(len(ids) + 1)
            if out_of_range is not None:
                break
        tokens = np.frombuffer(flat, dtype=self.dtype)
        if out_of_range is None:
            out_of_range = self._outside_vocabulary(tokens)
        return _ChunkResult(tokens, np.asarray(lengths, dtype=np.int64), bad.skipped,
                            bad.first, out_of_range, counts)

    def _documents_of_lines(self, task: _Task, counts: Dict[str, int], bad: "_BadLines"):
        """The line format's documents of each usable line of the chunk, in order. A bad line
        is tallied in ``bad`` and ends the chunk unless bad lines are skipped."""
        for offset, line in enumerate(task.data.split(b"\n")):
            if not line or line.isspace():
                continue
            try:
                docs = self.lines.documents(line, counts)
            except _BadLine as e:
                bad.skipped += 1
                if len(bad.first) < _MAX_REPORTED_BAD_LINES:
                    bad.first.append((task.first_line + offset, e.args[0]))
                if not self.skip_bad_lines:
                    return
                continue
            yield docs

    def _outside_vocabulary(self, tokens: np.ndarray) -> Optional[int]:
        """An id of ``tokens`` outside the tokenizer's vocabulary, or None."""
        if not len(tokens):
            return None
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.lines.tokenizer.vocab_size:
            return low if low < 0 else high
        return None

    def _sequences(self, task: _Task) -> _ChunkResult:
        """For formats whose documents are several sequences, with no eod, and a sidecar."""
        flat = array.array(_ARRAY_TYPECODES[np.dtype(self.dtype)])
        lengths: List[int] = []
        seq_lengths: List[int] = []
        seq_counts: List[int] = []
        extra: List[bytes] = []
        counts = dict.fromkeys(self.lines.counts, 0)
        bad = _BadLines()
        for docs in self._documents_of_lines(task, counts, bad):
            for sequences, metadata in docs:  # ids checked against the vocabulary already
                for ids in sequences:
                    flat.fromlist(ids)
                    seq_lengths.append(len(ids))
                seq_counts.append(len(sequences))
                lengths.append(sum(map(len, sequences)))
                extra.append(json.dumps(metadata, ensure_ascii=False).encode("utf-8") + b"\n")
        tokens = np.frombuffer(flat, dtype=self.dtype)
        return _ChunkResult(tokens, np.asarray(lengths, dtype=np.int64), bad.skipped,
                            bad.first, self._outside_vocabulary(tokens), counts, np.asarray(seq_lengths, dtype=np.int64),
                            np.asarray(seq_counts, dtype=np.int64), b"".join(extra))


# ----------------------------------------------------------------------------------------------
# Line formats: what one input line holds, per kind of dataset. A new kind is a class with the
# attributes and methods of _TextLines, registered in _LINE_FORMATS (and named in KINDS).


class _BadLine(Exception):
    """A line its format cannot use; the one argument says why (for ``file:line: why``)."""


@dataclass(frozen=True)
class _TextLines:
    """``text``: the string under ``json_key`` is one document, tokenised as ordinary text."""

    tokenizer: Any
    json_key: str = "text"
    kind: ClassVar[str] = "text"
    counts: ClassVar[Tuple[str, ...]] = ()  # names of the per-run counts recorded in the meta
    # False: documents() gives each document's ids, written as one sequence followed by eod.
    # True: it gives (sequences, metadata) per document, written as several sequences with no
    # eod, and metadata (a dict) as one line of the sidecar PREFIX.extra.jsonl.
    sequences: ClassVar[bool] = False

    @property
    def rule(self) -> str:
        """What a line must be, and the fixes, for a bad line's error."""
        return (f"each line must be a JSON object with a string under {self.json_key!r}: fix "
                "the line, choose the key with --json-key, or pass --skip-bad-lines to skip "
                "such lines")

    def check(self) -> None:
        """Refuse settings or a tokenizer this format cannot use (PreprocessError)."""
        if not isinstance(self.json_key, str) or not self.json_key:
            raise PreprocessError(f"json key {self.json_key!r} must be a non-empty string; fix "
                                  "--json-key")

    def meta(self) -> Dict[str, Any]:
        """Fields of the dataset's meta particular to this format."""
        return {"json_key": self.json_key}

    def documents(self, line: bytes, counts: Dict[str, int]) -> List[List[int]]:
        """The token ids of the line's documents (without eod); adds to ``counts``.

        Raises:
            _BadLine: the line is not what this format expects.
        """
        text = _text_of(line, self.json_key)
        if not isinstance(text, str):
            raise _BadLine(text[0])
        return [self.tokenizer.tokenize(text)]


@dataclass(frozen=True)
class _ChatLines:
    """``chat``: a conversation, rendered in Phi-4's chat format (megaphi.data.chat)."""

    tokenizer: Any
    kind: ClassVar[str] = "chat"
    counts: ClassVar[Tuple[str, ...]] = ("assistant_tokens",)
    sequences: ClassVar[bool] = False

    @property
    def rule(self) -> str:
        return (f"each line must be a JSON object {CONVERSATION_FORMAT}: fix the line or pass "
                "--skip-bad-lines to skip such lines")

    def check(self) -> None:
        if not hasattr(self.tokenizer, "encode"):
            raise PreprocessError(f"tokenizer {self.tokenizer!r} has no 'encode', which chat "
                                  "needs for its special tokens; use one from "
                                  "megaphi.data.tokenizer.load_tokenizer")
        try:
            chat_token_ids(self.tokenizer)
        except ChatFormatError as e:
            raise PreprocessError(str(e)) from None

    def meta(self) -> Dict[str, Any]:
        return {}

    def documents(self, line: bytes, counts: Dict[str, int]) -> List[List[int]]:
        try:
            messages = parse_conversation(_json_of(line))
        except ChatFormatError as e:
            raise _BadLine(e.reason) from None
        ids, mask = render_chat(messages, self.tokenizer)
        counts["assistant_tokens"] += sum(mask)
        return [ids]


@dataclass(frozen=True)
class _PreferenceLines(_ChatLines):
    """``preference``: a DPO pair (megaphi.data.preference), one document of several sequences.
    Its tokenizer needs what chat needs (the inherited :meth:`check` and :meth:`meta`)."""

    kind: ClassVar[str] = "preference"
    counts: ClassVar[Tuple[str, ...]] = ("pairs", "full_pairs", "token_pairs")
    sequences: ClassVar[bool] = True

    @property
    def rule(self) -> str:
        return (f"each line must be a JSON object {PAIR_FORMAT}: fix the line or pass "
                "--skip-bad-lines to skip such lines")

    def documents(self, line: bytes, counts: Dict[str, int]):
        obj = _json_of(line)
        try:
            kind, sequences = parse_pair(obj, self.tokenizer)
        except ChatFormatError as e:
            raise _BadLine(e.reason) from None
        counts["pairs"] += 1
        counts["full_pairs" if kind == FULL else "token_pairs"] += 1
        return [(sequences, pair_metadata(obj))]


_LineFormat = Union[_TextLines, _ChatLines, _PreferenceLines]
_LINE_FORMATS = {"text": _TextLines, "chat": _ChatLines, "preference": _PreferenceLines}
assert tuple(_LINE_FORMATS) == KINDS


def _line_format(format: str, tokenizer: Any, json_key: Optional[str]) -> _LineFormat:
    """The line format of :func:`preprocess`'s ``format``, checking that the arguments fit it."""
    if format not in _LINE_FORMATS:
        raise PreprocessError(f"unknown format {format!r}; formats are {', '.join(KINDS)}: fix "
                              "--format")
    if format == "text":
        return _TextLines(tokenizer, "text" if json_key is None else json_key)
    if json_key is not None:
        raise PreprocessError(f"a json key ({json_key!r}) applies to format 'text' only; "
                              f"{format} lines are read whole: drop --json-key")
    return _LINE_FORMATS[format](tokenizer)


def _json_of(line: bytes) -> Any:
    """The line's JSON value; raises _BadLine if it is not JSON (or not UTF-8)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise _BadLine(f"invalid JSON ({e.msg} at column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise _BadLine(f"not UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})") \
            from None


def _text_of(line: bytes, key: str):
    """The line's text, or a 1-tuple holding why the line is bad."""
    try:
        obj = _json_of(line)
    except _BadLine as e:
        return (e.args[0],)
    if not isinstance(obj, dict):
        return (f"the line is {_JSON_TYPE_NAMES.get(type(obj), 'not an object')}, "
                "not a JSON object",)
    if key not in obj:
        keys = ", ".join(repr(k) for k in list(obj)[:8]) or "none"
        return (f"no key {key!r} (keys: {keys})",)
    text = obj[key]
    if not isinstance(text, str):
        return (f"the value of {key!r} is {_JSON_TYPE_NAMES.get(type(text), 'not a string')}, "
                "not a string",)
    return text


# ----------------------------------------------------------------------------------------------
# Workers


_WORKER_JOB: Optional[_ChunkJob] = None


def _init_worker(job: _ChunkJob) -> None:
    global _WORKER_JOB
    # Ctrl-C reaches the whole process group; the main process alone handles it and cleans up.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER_JOB = job


def _run_in_worker(task: _Task) -> _ChunkResult:
    return _WORKER_JOB(task)


def _mp_context():
    # fork starts workers instantly with the tokenizer already loaded; elsewhere (macOS,
    # Windows) fork is unsafe or missing and the tokenizer travels by pickle.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    return multiprocessing.get_context(method)


def _ordered_results(job: _ChunkJob, tasks: Iterator[_Task],
                     workers: int) -> Iterator[Tuple[_Task, _ChunkResult]]:
    """``(task, job(task))`` in task order, computed by ``workers`` processes."""
    if workers == 1:
        for task in tasks:
            yield task, job(task)
        return
    pool = concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=_mp_context(), initializer=_init_worker, initargs=(job,))
    window = collections.deque()  # bounded read-ahead: memory stays a few chunks per worker
    try:
        for task in tasks:
            window.append((task, pool.submit(_run_in_worker, task)))
            if len(window) >= 3 * workers:
                task, future = window.popleft()
                yield task, future.result()
        while window:
            task, future = window.popleft()
            yield task, future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------------------
# Output


def content_hash(idx_path: str, bin_path: str) -> str:
    """SHA-256 of an indexed dataset's ``.idx`` then ``.bin`` bytes."""
    import hashlib

    digest = hashlib.sha256()
    for path in (idx_path, bin_path):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


class AtomicDataset:
    """Temp files next to the final ones; renamed on :meth:`commit`, removed on any failure."""

    def __init__(self, prefix: PathLike, extra: bool = False):
        self.final = dataset_paths(prefix)
        if extra:  # the sidecar of a preference dataset, PREFIX.extra.jsonl
            self.final["extra"] = extra_path(prefix)
        self.temp = {kind: path + ".tmp" for kind, path in self.final.items()}
        self._builder = None
        self._extra = None

    def __enter__(self) -> "AtomicDataset":
        directory = os.path.dirname(self.final["bin"])
        if directory:
            try:
                os.makedirs(directory, exist_ok=True)
            except OSError as e:
                raise PreprocessError(f"cannot create output directory {directory} ({e}); "
                                      "choose another --output-prefix") from None
        return self

    def builder(self, dtype):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self._builder = IndexedDatasetBuilder(self.temp["bin"], dtype=dtype)
        if "extra" in self.temp:
            self._extra = open(self.temp["extra"], "wb")
        return self._builder

    def write_extra(self, data: bytes) -> None:
        """Append lines (JSON objects, one per document) to the sidecar."""
        self._extra.write(data)

    def commit(self, meta: dict) -> int:
        """Finish the index, write the meta and rename all three; returns .bin + .idx bytes.
        A preference dataset's meta records the SHA-256 of its contents (``sha256``), which
        fingerprints the data of DPO's stored reference log-probs without rereading it."""
        self._builder.finalize(self.temp["idx"])
        if self._extra is not None:
            self._extra.close()
        if meta.get("kind") == "preference":
            meta = {**meta, "sha256": content_hash(self.temp["idx"], self.temp["bin"])}
        with open(self.temp["meta"], "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
        written = os.path.getsize(self.temp["bin"]) + os.path.getsize(self.temp["idx"])
        # The meta marks a complete dataset: drop the old one first, add the new one last, so no
        # moment shows a meta next to a .bin/.idx pair it does not describe.
        if os.path.exists(self.final["meta"]):
            os.remove(self.final["meta"])
        stale = extra_path(self.final["bin"][:-len(".bin")])
        if "extra" not in self.final and os.path.exists(stale):
            os.remove(stale)  # the sidecar of the preference dataset this one replaces
        for kind in ("bin", "idx", "extra", "meta"):
            if kind in self.final:
                os.replace(self.temp[kind], self.final[kind])
        return written

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            return
        if self._builder is not None:
            self._builder.data_file.close()
        if self._extra is not None:
            self._extra.close()
        for path in self.temp.values():
            try:
                os.remove(path)
            except FileNotFoundError:
                pass


# ----------------------------------------------------------------------------------------------
# Progress


def progress_bar(total: int, enabled: bool, desc: str, unit: str = "B"):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit=unit, unit_scale=unit == "B",
                unit_divisor=1024, file=sys.stderr, mininterval=0.5, dynamic_ncols=True)


class _LazyBar:
    """A byte progress bar with docs/s and tok/s, made at the first update: by then the workers
    are forked, and tqdm's monitor thread must not exist when a process forks."""

    def __init__(self, total: int, enabled: bool, desc: str):
        self._args = (total, enabled, desc)
        self._bar = None

    def update(self, n_bytes: int, docs: int, tokens: int, start: float) -> None:
        if self._bar is None:
            self._bar = progress_bar(*self._args)
        self._bar.update(n_bytes)
        if not self._bar.disable:
            secs = max(time.perf_counter() - start, 1e-9)
            self._bar.set_postfix_str(
                f"{_human_rate(docs / secs)} docs/s, {_human_rate(tokens / secs)} tok/s",
                refresh=False)

    def __enter__(self) -> "_LazyBar":
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()


def _human_rate(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _human_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
