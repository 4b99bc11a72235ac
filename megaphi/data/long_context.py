"""Select the long documents of indexed datasets into new datasets: mid-training's long-context data.

Phi-4's mid-training (shared/PHI4.md, section 3.3) filters non-synthetic sources to documents
longer than 8K tokens and up-weights those of 16K and more: naturally long documents beat short
ones packed together. :func:`select_long_documents` does this for one dataset. A document's
length is its token count without the end-of-document token preprocessing appends; a document is
kept when it is *longer* than ``min_tokens``, and written ``upweight_factor`` times when it has
at least ``upweight_min_tokens``. The output is a complete megaphi dataset (``.bin``, ``.idx``,
``.meta.json`` with the input's tokenizer fingerprint), written atomically like preprocessing's.

``tools/build_long_context_data.py`` is the command line.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

from megaphi.data.preprocess import (
    META_FORMAT,
    AtomicDataset,
    PreprocessError,
    check_output_prefix,
    progress_bar,
    read_meta,
)

logger = logging.getLogger(__name__)

DEFAULT_MIN_TOKENS = 8192
DEFAULT_UPWEIGHT_MIN_TOKENS = 16384


@dataclass(frozen=True)
class LongContextResult:
    """What one selection kept, in documents and tokens (ends of document included)."""

    source: str
    input_prefix: str
    output_prefix: Optional[str]  # None when no document was long enough (nothing written)
    documents: int
    tokens: int
    kept_documents: int
    kept_tokens: int
    upweighted_documents: int
    written_documents: int
    written_tokens: int


def document_lengths(prefix: str, eod_id: Optional[int]) -> tuple:
    """Per document of the dataset at ``prefix``: its stored tokens, its length (stored tokens
    without a final ``eod_id``), and where its sequences start.

    Returns ``(stored, lengths, starts)``; document ``i`` is the sequences
    ``starts[i]:starts[i + 1]``."""
    from megatron.core.datasets.indexed_dataset import _IndexReader

    index = _IndexReader(prefix + ".idx", multimodal=False)
    # Copies: the reader's arrays are views of a memory map it closes when collected.
    starts = np.array(index.document_indices, dtype=np.int64)
    seq_lengths = np.array(index.sequence_lengths, dtype=np.int64)
    if len(starts) < 2:
        empty = np.zeros(0, np.int64)
        return empty, empty, starts
    stored = np.add.reduceat(seq_lengths, starts[:-1])
    if eod_id is None:
        return stored, stored, starts
    tokens = np.memmap(prefix + ".bin", dtype=index.dtype, mode="r")
    last_seq = starts[1:] - 1
    last = (np.asarray(index.sequence_pointers, dtype=np.int64)[last_seq]
            // np.dtype(index.dtype).itemsize + seq_lengths[last_seq] - 1)
    ends_with_eod = (seq_lengths[last_seq] > 0) & (np.array(tokens[np.maximum(last, 0)]) == eod_id)
    del tokens
    return stored, stored - ends_with_eod.astype(np.int64), starts


def select_long_documents(prefix: str, output_prefix: str, *, source: Optional[str] = None,
                          min_tokens: int = DEFAULT_MIN_TOKENS,
                          upweight_min_tokens: int = DEFAULT_UPWEIGHT_MIN_TOKENS,
                          upweight_factor: int = 1, progress: bool = False) -> LongContextResult:
    """Write the documents of ``prefix`` longer than ``min_tokens`` to ``output_prefix``, in
    their original order; those of at least ``upweight_min_tokens`` are written
    ``upweight_factor`` times (consecutively: training shuffles documents).

    Raises:
        PreprocessError: ``prefix`` is not a complete dataset, or an argument is out of range.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    check_selection(min_tokens, upweight_min_tokens, upweight_factor)
    check_output_prefix(output_prefix)
    meta = read_meta(prefix)
    stored, lengths, starts = document_lengths(prefix, meta["tokenizer"].get("eod_id"))
    kept = np.flatnonzero(lengths > min_tokens)
    repeats = np.where(lengths[kept] >= upweight_min_tokens, upweight_factor, 1)
    result = dict(source=source or os.path.basename(prefix), input_prefix=prefix,
                  documents=len(lengths), tokens=int(stored.sum()),
                  kept_documents=len(kept), kept_tokens=int(stored[kept].sum()),
                  upweighted_documents=int((repeats > 1).sum()),
                  written_documents=int(repeats.sum()),
                  written_tokens=int((stored[kept] * repeats).sum()))
    if len(kept) == 0:
        logger.warning("%s: no document is longer than %d tokens; nothing written", prefix,
                       min_tokens)
        return LongContextResult(output_prefix=None, **result)
    with AtomicDataset(output_prefix) as out, progress_bar(
            int(repeats.sum()), progress, os.path.basename(output_prefix), unit="doc") as bar:
        import torch

        dataset = IndexedDataset(prefix, mmap=True)
        seq_lengths = dataset.sequence_lengths
        builder = out.builder(dataset.index.dtype)
        for doc, times in zip(kept.tolist(), repeats.tolist()):
            seqs = range(int(starts[doc]), int(starts[doc + 1]))
            tokens = torch.from_numpy(np.concatenate([dataset[i] for i in seqs]).astype(np.int64))
            for _ in range(times):
                builder.add_document(tokens, [int(seq_lengths[i]) for i in seqs])
                bar.update(1)
        out.commit({"format": META_FORMAT, "tokenizer": meta["tokenizer"],
                    "documents": result["written_documents"], "tokens": result["written_tokens"],
                    "skipped_lines": 0, "inputs": meta["inputs"],
                    "json_key": meta.get("json_key"), "dtype": meta.get("dtype"),
                    "selected_from": prefix,
                    "selection": {"min_tokens": min_tokens,
                                  "upweight_min_tokens": upweight_min_tokens,
                                  "upweight_factor": upweight_factor}})
    return LongContextResult(output_prefix=output_prefix, **result)


def check_selection(min_tokens: int, upweight_min_tokens: int, upweight_factor: int) -> None:
    """Refuse out-of-range selection settings, naming the option."""
    if min_tokens < 0:
        raise PreprocessError(f"--min-tokens must be >= 0, got {min_tokens}")
    if upweight_factor < 1:
        raise PreprocessError(f"--upweight-factor must be a whole number >= 1, got "
                              f"{upweight_factor} (1 disables up-weighting)")
    if upweight_factor > 1 and upweight_min_tokens <= min_tokens:
        raise PreprocessError(f"--upweight-min-tokens ({upweight_min_tokens}) must exceed "
                              f"--min-tokens ({min_tokens}) for up-weighting to single out the "
                              "longest documents")
