"""Adopting an indexed dataset that another tool wrote (Megatron-LM's ``tools/preprocess_data.py``,
NeMo, a custom ``IndexedDatasetBuilder`` script): check it against the run's tokenizer and, if
it passes, write the ``PREFIX.meta.json`` that megaphi's preprocessing writes, marked adopted.

The checks, each reported:

- **readable**: Megatron-Core's ``IndexedDataset(PREFIX)`` opens it (any file name: Megatron-LM
  names its outputs ``PREFIX_text_document``), and the ``.bin`` holds exactly the tokens the
  ``.idx`` points at;
- **dtype**: an integer type wide enough for the tokenizer's vocabulary (Megatron-LM writes
  ``uint16`` below 65,500 ids and ``int32`` above);
- **ids in the vocabulary**: every token id is in ``[0, vocab_size)`` (the first document
  holding one that is not is named);
- **end of document**: every document ends with the tokenizer's end-of-document id (Megatron-LM
  appends it with ``--append-eod``). Without it documents run into each other in training's
  samples; ``allow_missing_eod`` accepts that knowingly, and the meta records it;
- **round trip**: a sample of documents (``roundtrip_samples``, spread over the dataset, at most
  ``ROUNDTRIP_TOKENS`` tokens each) decodes and re-encodes to the same ids. Ids from this
  tokenizer do so nearly always (BPE re-encoding is canonical for text it produced); ids from
  another tokenizer decode to other text, which re-encodes to other ids. Below
  ``min_roundtrip`` (default 0.9) the dataset is refused with the fraction in the message.

Only text (pre-training) datasets are adopted: chat and preference datasets carry structure that
a plain indexed dataset lacks. Nothing is written unless every check passes, and the ``.bin`` and
``.idx`` are only read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List

import numpy as np

from megaphi.data.preprocess import META_FORMAT, PreprocessError, dataset_paths

DEFAULT_MIN_ROUNDTRIP = 0.9
DEFAULT_ROUNDTRIP_SAMPLES = 64
ROUNDTRIP_TOKENS = 1024  # per sampled document; a cut document is compared short of the cut
_CUT_SLACK = 8  # tokens at a cut that re-encoding may merge differently


@dataclass
class AdoptReport:
    prefix: str
    documents: int = 0
    tokens: int = 0
    dtype: str = ""
    checks: Dict[str, str] = field(default_factory=dict)
    roundtrip: float = 0.0
    written: bool = False

    def summary(self) -> str:
        checks = "; ".join(f"{k}: {v}" for k, v in self.checks.items())
        return (f"{self.prefix}: {self.documents:,} documents, {self.tokens:,} tokens ({self.dtype}); "
                f"{checks}; {'adopted, wrote ' + dataset_paths(self.prefix)['meta'] if self.written else 'not adopted'}")


def _fail(prefix: str, message: str) -> None:
    raise PreprocessError(f"--adopt {prefix}: {message}")


def adopt(prefix: str, tokenizer, *, allow_missing_eod: bool = False,
          min_roundtrip: float = DEFAULT_MIN_ROUNDTRIP,
          roundtrip_samples: int = DEFAULT_ROUNDTRIP_SAMPLES) -> AdoptReport:
    """Check the indexed dataset at ``prefix`` against ``tokenizer`` and write its meta.json;
    raises :class:`PreprocessError` (writing nothing) on the first failed check."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = os.fspath(prefix)
    paths = dataset_paths(prefix)
    report = AdoptReport(prefix)
    for kind in ("bin", "idx"):
        if not os.path.isfile(paths[kind]):
            _fail(prefix, f"{paths[kind]} does not exist; give the prefix without .bin/.idx "
                          "(Megatron-LM names its outputs PREFIX_text_document)")
    if os.path.exists(paths["meta"]):
        _fail(prefix, f"{paths['meta']} exists already: the dataset is megaphi's (or adopted); "
                      "nothing to do")
    try:
        dataset = IndexedDataset(prefix, mmap=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read is the same answer
        _fail(prefix, f"Megatron-Core's IndexedDataset cannot read it ({type(exc).__name__}: "
                      f"{exc}); is it an indexed dataset?")
    index = dataset.index
    dtype = np.dtype(index.dtype)
    report.dtype = dtype.name
    lengths = np.asarray(index.sequence_lengths, dtype=np.int64)
    pointers = np.asarray(index.sequence_pointers, dtype=np.int64)
    doc_starts = np.asarray(index.document_indices, dtype=np.int64)
    report.documents, report.tokens = len(doc_starts) - 1, int(lengths.sum())
    bin_bytes = os.path.getsize(paths["bin"])
    if len(lengths) and (pointers[-1] + lengths[-1] * dtype.itemsize != bin_bytes
                         or np.any(np.diff(pointers) != lengths[:-1] * dtype.itemsize)):
        _fail(prefix, f"{paths['bin']} ({bin_bytes:,} bytes) does not hold the "
                      f"{report.tokens:,} {dtype.name} tokens {paths['idx']} points at, back "
                      "to back; the two files are from different runs")
    report.checks["readable"] = "ok"

    vocab = tokenizer.vocab_size
    if dtype.kind not in "iu":
        _fail(prefix, f"tokens are {dtype.name}, not integers")
    if np.iinfo(dtype).max < vocab - 1:
        _fail(prefix, f"tokens are {dtype.name}, which holds ids up to {np.iinfo(dtype).max:,}, "
                      f"but {tokenizer.name} has {vocab:,}: the ids were written for a smaller "
                      "vocabulary, so this tokenizer cannot be the one (pass --tokenizer)")
    report.checks["dtype"] = f"{dtype.name} ok"

    tokens = np.memmap(paths["bin"], dtype=dtype, mode="r")
    bad_at = _first_out_of_range(tokens, vocab)
    if bad_at is not None:
        seq = int(np.searchsorted(pointers // dtype.itemsize, bad_at, side="right") - 1)
        doc = int(np.searchsorted(doc_starts, seq, side="right") - 1)
        _fail(prefix, f"document {doc} holds token id {int(tokens[bad_at])}, outside the "
                      f"vocabulary of {tokenizer.name} ({vocab:,} ids): the data was tokenised "
                      "with another tokenizer; pass the right --tokenizer")
    report.checks["ids in vocabulary"] = f"all < {vocab:,}"

    eod = tokenizer.eod_id
    doc_ends = doc_starts[1:] - 1  # each document's last sequence
    nonempty = lengths[doc_ends] > 0 if len(doc_ends) else np.zeros(0, bool)
    last = (pointers[doc_ends] // dtype.itemsize + lengths[doc_ends] - 1)[nonempty]
    ending = int((tokens[last] == eod).sum()) if len(last) else 0
    if report.documents and ending < report.documents:
        missing = report.documents - ending
        if not allow_missing_eod:
            _fail(prefix, f"{missing:,} of {report.documents:,} documents do not end with the "
                          f"end-of-document id {eod} ({tokenizer.name}): without it training's "
                          "samples run documents together. Re-tokenise with Megatron-LM's "
                          "--append-eod, or pass --allow-missing-eod to adopt it as it is")
        report.checks["end of document"] = (f"{missing:,} of {report.documents:,} documents "
                                            "without it (allowed)")
    else:
        report.checks["end of document"] = "every document"

    report.roundtrip = _roundtrip(tokens, pointers // dtype.itemsize, lengths, doc_starts,
                                  tokenizer, roundtrip_samples)
    checked = min(roundtrip_samples, report.documents)
    if report.roundtrip < min_roundtrip:
        _fail(prefix, f"only {report.roundtrip:.0%} of {checked} sampled documents decode and "
                      f"re-encode to the same ids with {tokenizer.name} (at least "
                      f"{min_roundtrip:.0%} needed): the ids come from another tokenizer; pass "
                      "the one that wrote them with --tokenizer")
    report.checks["round trip"] = f"{report.roundtrip:.0%} of {checked} sampled documents"

    meta = {"format": META_FORMAT, "kind": "text", "tokenizer": tokenizer.describe(),
            "documents": report.documents, "tokens": report.tokens, "skipped_lines": 0,
            "inputs": [], "dtype": dtype.name,
            "adopted": {"checks": report.checks, "roundtrip": report.roundtrip,
                        "roundtrip_samples": checked, "min_roundtrip": min_roundtrip,
                        "eod_terminated": ending == report.documents,
                        "bin_bytes": bin_bytes}}
    tmp = Path(f"{paths['meta']}.tmp")
    tmp.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, paths["meta"])
    report.written = True
    return report


def _first_out_of_range(tokens: np.ndarray, vocab: int, chunk: int = 1 << 24):
    """The position of the first token outside ``[0, vocab)``, or None (reads in chunks)."""
    for start in range(0, len(tokens), chunk):
        part = np.asarray(tokens[start:start + chunk])
        bad = (part >= vocab) | (part < 0) if part.dtype.kind == "i" else part >= vocab
        if bad.any():
            return start + int(np.argmax(bad))
    return None


def _roundtrip(tokens, starts, lengths, doc_starts, tokenizer, samples: int) -> float:
    """The fraction of sampled documents whose ids survive decode -> encode."""
    n_docs = len(doc_starts) - 1
    if n_docs == 0:
        return 1.0
    picks = np.unique(np.linspace(0, n_docs - 1, num=min(samples, n_docs)).astype(np.int64))
    eod = tokenizer.eod_id
    same = 0
    for doc in picks.tolist():
        first, stop = doc_starts[doc], doc_starts[doc + 1]
        ids: List[int] = []
        for seq in range(first, stop):
            ids += np.asarray(tokens[starts[seq]:starts[seq] + lengths[seq]]).tolist()
        if ids and ids[-1] == eod:
            ids = ids[:-1]
        cut = len(ids) > ROUNDTRIP_TOKENS
        ids = ids[:ROUNDTRIP_TOKENS]
        again = tokenizer.tokenize(tokenizer.decode(ids))
        if cut:
            keep = len(ids) - _CUT_SLACK
            same += again[:keep] == ids[:keep]
        else:
            same += again == ids
    return same / len(picks)


__all__ = ["adopt", "AdoptReport", "DEFAULT_MIN_ROUNDTRIP", "DEFAULT_ROUNDTRIP_SAMPLES"]
