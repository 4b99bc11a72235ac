"""Packed rows of whole documents (SFT conversations, evaluation windows) for the trainer.

A *segment* is a token sequence with a 0/1 loss mask: a chat conversation (loss on its
assistant tokens, :mod:`megaphi.data.chat`), or a window of a text document (loss on every
token). A segment of ``n + 1`` tokens fills ``n`` positions of a row: inputs ``ids[:-1]``,
labels ``ids[1:]``, loss mask ``mask[1:]``.

:func:`pack` puts segments into rows of ``seq_length`` positions: a seeded shuffle, then
best-fit decreasing (each segment, longest first, goes into the open row with the least room
that still fits it), then a seeded shuffle of the rows. Packing looks only at the segment
lengths and the seed, so every data-parallel rank, every layout and every resumed run computes
the same rows. Each epoch is packed with its own seed. A :class:`PackedRows` dataset returns one
row as a micro-batch sample: ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` (restarting
at 0 for each segment) and ``seq_ids`` (the segment index of each position; -1 for the padding
at the end of a row), which :mod:`megaphi.model.packed` turns into attention boundaries.

With ``packing=False`` every segment gets a row of its own, padded: the baseline.

:class:`BlendedRows` mixes several datasets' rows by weight with Megatron-Core's blending
helper (its exact greedy interleaving), as pre-training mixtures blend ``GPTDataset`` samples.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

logger = logging.getLogger(__name__)

PAD_SEGMENT = -1  # seq_ids value of the padding at the end of a row


def pack(sizes: np.ndarray, capacity: int, seed) -> List[np.ndarray]:
    """Rows of segment indices whose ``sizes`` sum to at most ``capacity`` each.

    Best-fit decreasing over a seeded shuffle (so equal sizes are taken in a random order), the
    rows then shuffled with the same generator. Deterministic in ``(sizes, capacity, seed)``.
    Every size must be in ``[1, capacity]``.
    """
    rng = np.random.default_rng(seed)
    sizes = np.asarray(sizes, dtype=np.int64)
    order = rng.permutation(len(sizes))
    order = order[np.argsort(-sizes[order], kind="stable")]
    rows: List[List[int]] = []
    by_room: Dict[int, List[int]] = {}  # room left -> open rows with that much room
    rooms: List[int] = []  # the keys of by_room, sorted
    for item in order.tolist():
        size = int(sizes[item])
        k = bisect.bisect_left(rooms, size)
        if k < len(rooms):
            room = rooms[k]
            row = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(k)
        else:
            row, room = len(rows), capacity
            rows.append([])
        rows[row].append(item)
        left = room - size
        if left > 0:
            if left not in by_room:
                bisect.insort(rooms, left)
                by_room[left] = []
            by_room[left].append(row)
    return [np.asarray(rows[i], dtype=np.int64) for i in rng.permutation(len(rows))]


class Segments:
    """What a :class:`PackedRows` packs: ``sizes[k]`` positions per segment and
    :meth:`get` for its ``(ids, mask)``. A segment is one attention segment unless
    :meth:`write` says otherwise (a DPO pair is two, :mod:`megaphi.data.preference`)."""

    name: str
    sizes: np.ndarray
    dropped: int = 0
    unit: str = "segments"  # what a segment is, for logs

    def get(self, k: int) -> Tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def empty_row(self, seq_length: int, pad_id: int) -> Dict[str, np.ndarray]:
        """A row of padding: every field of a sample, ``[seq_length]`` each. ``position_ids``
        and ``seq_ids`` (-1 on padding) are filled in by :class:`PackedRows`."""
        return {"tokens": np.full(seq_length, pad_id, dtype=np.int64),
                "labels": np.full(seq_length, pad_id, dtype=np.int64),
                "loss_mask": np.zeros(seq_length, dtype=np.float32)}

    def write(self, row: Dict[str, np.ndarray], at: int, k: int, slot: int) -> List[int]:
        """Write segment ``k`` into ``row`` from position ``at`` (it fills ``sizes[k]``
        positions); ``slot`` is its place among the row's segments (0, 1, ...). Returns the
        lengths of the attention segments it is made of, in order."""
        ids, mask = self.get(k)
        n = len(ids) - 1
        row["tokens"][at:at + n], row["labels"][at:at + n] = ids[:-1], ids[1:]
        row["loss_mask"][at:at + n] = mask[1:]
        return [n]


class ChatSegments(Segments):
    """The conversations of a chat dataset (``tools/preprocess_data.py --format chat``): one
    segment per conversation, without its end-of-document token (which never gets loss), its
    loss mask recovered from the token ids. A conversation that needs more than ``seq_length``
    positions is dropped (counted in :attr:`dropped`) or, with ``truncate``, cut to fit."""

    def __init__(self, prefix: str, tokenizer, seq_length: int, truncate: bool = False):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.name, self.tokenizer, self.seq_length = prefix, tokenizer, seq_length
        self.dataset = IndexedDataset(prefix)
        lengths = self.dataset.sequence_lengths.astype(np.int64)
        needed = lengths - 2  # minus the end-of-document token and the shift of the labels
        keep = needed <= seq_length
        if truncate:
            self.index = np.flatnonzero(needed > 0)
            self.sizes = np.minimum(needed[self.index], seq_length)
        else:
            self.index = np.flatnonzero(keep & (needed > 0))
            self.sizes = needed[self.index]
        self.dropped = len(lengths) - len(self.index)
        self.truncated = int((~keep).sum()) if truncate else 0

    def get(self, k: int) -> Tuple[np.ndarray, np.ndarray]:
        from megaphi.data.chat import loss_mask_from_ids

        ids = np.asarray(self.dataset[int(self.index[k])], dtype=np.int64)
        if ids[-1] == self.tokenizer.eod_id:
            ids = ids[:-1]
        mask = np.asarray(loss_mask_from_ids(ids, self.tokenizer), dtype=np.float32)
        n = int(self.sizes[k]) + 1
        return ids[:n], mask[:n]


class TextSegments(Segments):
    """The documents of a text dataset cut into windows of ``seq_length + 1`` tokens that
    overlap by one, so every token but a document's first is predicted exactly once."""

    def __init__(self, prefix: str, seq_length: int):
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.name, self.seq_length = prefix, seq_length
        self.dataset = IndexedDataset(prefix)
        docs, starts, sizes = [], [], []
        for doc, length in enumerate(self.dataset.sequence_lengths.tolist()):
            for start in range(0, max(length - 1, 0), seq_length):
                docs.append(doc)
                starts.append(start)
                sizes.append(min(seq_length, length - 1 - start))
        self.windows = np.asarray([docs, starts], dtype=np.int64).reshape(2, -1)
        self.sizes = np.asarray(sizes, dtype=np.int64)

    def get(self, k: int) -> Tuple[np.ndarray, np.ndarray]:
        doc, start = self.windows[:, k].tolist()
        n = int(self.sizes[k]) + 1
        ids = np.asarray(self.dataset.get(doc, offset=start, length=n), dtype=np.int64)
        return ids, np.ones(n, dtype=np.float32)


@dataclass(frozen=True)
class PackingStats:
    """What one epoch of packing gave."""

    segments: int
    rows: int
    real_tokens: int  # positions filled by segments
    dropped: int

    def efficiency(self, seq_length: int) -> float:
        """Real tokens over row tokens."""
        return self.real_tokens / max(1, self.rows * seq_length)


class PackedRows(torch.utils.data.Dataset):
    """Rows of packed segments: ``num_samples`` rows over as many epochs as that takes (each
    packed with seed ``(seed, epoch)``; with ``repack=False`` every epoch has the first
    epoch's rows, reordered), or exactly one epoch when ``num_samples`` is None."""

    def __init__(self, segments: Segments, seq_length: int, seed: int,
                 num_samples: Optional[int] = None, packing: bool = True, pad_id: int = 0,
                 shuffle: bool = True, repack: bool = True):
        self.segments, self.seq_length, self.pad_id = segments, seq_length, pad_id
        if len(segments.sizes) == 0:
            raise ValueError(f"{segments.name}: no segment fits a row of {seq_length} tokens "
                             f"({segments.dropped} dropped); raise model.seq_length or set "
                             "data.overlong=truncate")
        epochs, total = [], 0
        while not epochs or (num_samples is not None and total < num_samples):
            if repack or not epochs:
                epochs.append(self._epoch(len(epochs), seed, packing, shuffle))
            else:  # the first epoch's rows again, in another order
                order = np.random.default_rng([seed, len(epochs), 0x5F8]).permutation(
                    len(epochs[0]))
                epochs.append([epochs[0][i] for i in order])
            total += len(epochs[-1])
        rows = [row for epoch in epochs for row in epoch]
        if num_samples is not None:
            rows = rows[:num_samples]
        self.offsets = np.cumsum([0] + [len(r) for r in rows]).astype(np.int64)
        self.items = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
        first = epochs[0]
        self.stats = PackingStats(segments=len(segments.sizes), rows=len(first),
                                  real_tokens=int(segments.sizes.sum()),
                                  dropped=segments.dropped)

    def _epoch(self, epoch: int, seed: int, packing: bool, shuffle: bool) -> List[np.ndarray]:
        sizes = self.segments.sizes
        epoch_seed = [seed, epoch, 0x5F7]
        if packing:
            return pack(sizes, self.seq_length, seed=epoch_seed)
        order = (np.random.default_rng(epoch_seed).permutation(len(sizes)) if shuffle
                 else np.arange(len(sizes)))
        return [np.asarray([k]) for k in order]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row_segments(self, i: int) -> np.ndarray:
        return self.items[self.offsets[i]:self.offsets[i + 1]]

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return self.row(self.row_segments(i).tolist())

    def row(self, segments: Sequence[int]) -> Dict[str, torch.Tensor]:
        """The row holding ``segments`` (indices into the segments) in order, then padding;
        ``row([])`` is all padding (no loss), which fills out an evaluation's last step."""
        s = self.seq_length
        row = self.segments.empty_row(s, self.pad_id)
        position_ids = np.zeros(s, dtype=np.int64)
        seq_ids = np.full(s, PAD_SEGMENT, dtype=np.int64)
        at, seq = 0, 0
        for slot, k in enumerate(segments):
            for n in self.segments.write(row, at, int(k), slot):
                position_ids[at:at + n] = np.arange(n)
                seq_ids[at:at + n] = seq
                at, seq = at + n, seq + 1
        position_ids[at:] = np.arange(s - at)  # the padding is a segment of its own
        row["position_ids"], row["seq_ids"] = position_ids, seq_ids
        return {k: torch.from_numpy(v) for k, v in row.items()}

    def describe(self) -> str:
        st = self.stats
        dropped = f", {st.dropped} dropped (longer than {self.seq_length} tokens)" \
            if st.dropped else ""
        return (f"{self.segments.name}: {st.segments} {self.segments.unit}{dropped} in "
                f"{st.rows} rows of "
                f"{self.seq_length} per epoch, pack efficiency "
                f"{100 * st.efficiency(self.seq_length):.1f}%")


class BlendedRows(torch.utils.data.Dataset):
    """``size`` rows drawn from several datasets by weight (Megatron-Core's greedy blending
    index: after ``n`` rows, each dataset has given ``weight * n`` rows, rounded)."""

    def __init__(self, datasets: Sequence[torch.utils.data.Dataset], weights: Sequence[float],
                 size: int):
        from megatron.core.datasets import helpers

        self.datasets = list(datasets)
        self.dataset_index = np.zeros(size, dtype=np.int16)
        self.sample_index = np.zeros(size, dtype=np.int64)
        w = np.asarray(weights, dtype=np.float64)
        helpers.build_blending_indices(self.dataset_index, self.sample_index, w / w.sum(),
                                       len(self.datasets), size, False)

    @staticmethod
    def rows_needed(weights: Sequence[float], size: int) -> List[int]:
        """How many rows each dataset must provide for :class:`BlendedRows` of ``size``."""
        from megatron.core.datasets import helpers

        index = np.zeros(size, dtype=np.int16)
        sample = np.zeros(size, dtype=np.int64)
        w = np.asarray(weights, dtype=np.float64)
        helpers.build_blending_indices(index, sample, w / w.sum(), len(weights), size, False)
        return np.bincount(index, minlength=len(weights)).tolist()

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int):
        return self.datasets[self.dataset_index[i]][int(self.sample_index[i])]


def build_packed_rows(blend: Tuple[List[str], List[float]], rows_of, num_samples: int):
    """Rows from a weighted blend of datasets: ``rows_of(i, prefix, n)`` makes the
    :class:`PackedRows` of the ``i``-th prefix with at least ``n`` rows; they are blended when
    there are several. Logs each one's packing."""
    prefixes, weights = blend
    counts = [num_samples] if len(prefixes) == 1 else BlendedRows.rows_needed(weights,
                                                                              num_samples)
    datasets = []
    for i, (prefix, n) in enumerate(zip(prefixes, counts)):
        rows = rows_of(i, prefix, max(n, 1))
        logger.info("%s", rows.describe())
        datasets.append(rows)
    if len(datasets) == 1:
        return datasets[0]
    return BlendedRows(datasets, weights, num_samples)
