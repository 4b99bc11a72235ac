"""An NVIDIA DALI loader that yields exactly the torch loader's batches (optional ``dali`` extra).

The same :class:`~megaphi.data.loader.PretrainingSampler` chooses the samples, so resumption and
data-parallel sharding are identical; DALI's pipeline, fed through ``external_source``, does the
batching and hands out tensors. On a machine without a GPU the pipeline is CPU-only
(``device_id=None``).
"""

from __future__ import annotations

from typing import Dict, Iterator

import numpy as np
import torch

from megaphi.data.loader import PretrainingSampler

KEYS = ("tokens", "labels", "loss_mask", "position_ids")


class DaliLoader:
    """Iterates dicts of ``[micro_batch, seq]`` tensors with the torch loader's keys and dtypes."""

    def __init__(self, dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, num_threads: int = 2, device_id=None):
        try:
            from nvidia.dali import fn, pipeline_def
            from nvidia.dali.plugin.pytorch import DALIGenericIterator
        except ImportError:
            raise ImportError("the DALI loader needs NVIDIA DALI: pip install 'megaphi[dali]'") from None
        self.dataset = dataset
        self.sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size,
                                          dp_rank, dp_size)
        self._batches = iter(self.sampler)
        self._dtypes: Dict[str, torch.dtype] = {}

        @pipeline_def(batch_size=micro_batch_size, num_threads=num_threads, device_id=device_id,
                      exec_dynamic=True, prefetch_queue_depth=2)
        def pipeline():
            return tuple(fn.external_source(source=self._next_batch, num_outputs=len(KEYS),
                                            batch=True, batch_info=True))

        pipe = pipeline()
        pipe.build()
        self._iter = DALIGenericIterator([pipe], list(KEYS), auto_reset=False)

    def _next_batch(self, info):
        indices = next(self._batches, None)
        if indices is None:
            raise StopIteration
        samples = [self.dataset[i] for i in indices]
        if not self._dtypes:
            self._dtypes = {k: samples[0][k].dtype for k in KEYS}
        return tuple([np.ascontiguousarray(s[k].numpy()) for s in samples] for k in KEYS)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        for outputs in self._iter:
            batch = outputs[0]
            yield {k: batch[k].to(self._dtypes[k]) for k in KEYS}
