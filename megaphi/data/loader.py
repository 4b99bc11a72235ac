"""Data-parallel loading of fixed-length samples, resumable by consumed samples.

Samples are consumed in one global order: global batch ``i`` is samples
``[i * G, (i + 1) * G)`` of the dataset (G = global batch size). Each of its micro-batch
steps takes ``micro_batch_size * dp`` consecutive samples, of which data-parallel rank ``r``
gets slice ``r``. A run that resumes at ``consumed_samples = k`` (a multiple of the global batch)
therefore sees exactly the batches an uninterrupted run sees from ``k`` on, and a change of
data-parallel size changes only how each global batch is split across ranks, not its contents.
"""

from __future__ import annotations

from typing import Iterator, List

import torch


class PretrainingSampler:
    """Yields this data-parallel rank's index list for each micro-batch, from ``consumed``."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside data-parallel size {dp_size}")
        if consumed_samples > total_samples:
            raise ValueError(f"resuming at sample {consumed_samples}, but the dataset has only "
                             f"{total_samples}; train.iters grew past the data that was built")
        self.total, self.consumed = total_samples, consumed_samples
        self.mbs, self.rank, self.dp = micro_batch_size, dp_rank, dp_size

    def __len__(self) -> int:
        return (self.total - self.consumed) // (self.mbs * self.dp)

    def __iter__(self) -> Iterator[List[int]]:
        step = self.mbs * self.dp
        for start in range(self.consumed, self.total - step + 1, step):
            first = start + self.rank * self.mbs
            yield list(range(first, first + self.mbs))


def build_loader(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, num_workers: int = 2) -> torch.utils.data.DataLoader:
    """A DataLoader over ``dataset`` for one data-parallel rank, starting at ``consumed_samples``."""
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers,
        pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0)
