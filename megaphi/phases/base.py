"""What a phase is, and what every phase shares.

A phase is three things (POSTTRAIN.md section 1):

- what a micro-batch holds: :meth:`Phase.build_datasets` makes the training and validation
  datasets whose samples the loader collates into micro-batches (:attr:`Phase.batch_keys`);
- a forward step and its loss: :meth:`Phase.forward_step` is Megatron's ``forward_step_func``;
  its loss function returns ``(loss_sum, count, report)`` for Megatron's per-token loss
  normalisation (the count is loss tokens for LM and SFT, pairs for DPO);
- its metrics: ``report`` maps each name of :attr:`Phase.report_keys` to a ``[sum, count]``
  pair; the trainer sums the pairs over micro-batches and data/context-parallel ranks and logs
  ``sum / count``, so signed quantities (DPO margins) reduce correctly. The first key is the
  loss.

Everything else (the model, layouts, optimizer, checkpoints, resume, metrics plumbing) is the
trainer's and the same for every phase.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megaphi.config.schema import ConfigError, MegaphiConfig

KIND_OF_DATA = {"text": "text (tools/preprocess_data.py --format text)",
                "chat": "chat conversations (tools/preprocess_data.py --format chat)",
                "preference": "preference pairs (tools/preprocess_data.py --format preference)"}


class Phase:
    """The base of every phase; subclasses set the class attributes and the data."""

    name: str = ""
    dataset_kind: str = "text"
    """The kind of indexed dataset this phase trains on (``kind`` in ``PREFIX.meta.json``)."""
    report_keys: Tuple[str, ...] = ("loss",)
    batch_keys: Tuple[str, ...] = ("tokens", "labels", "loss_mask", "position_ids", "seq_ids")

    def __init__(self, cfg: MegaphiConfig):
        self.cfg = cfg

    # -- data ----------------------------------------------------------------------------
    def check_data(self, mixture) -> None:
        """Refuse datasets of another kind than this phase trains on, naming the field; run
        before any process group is set up."""
        from megaphi.data.preprocess import dataset_kind

        for prefix in mixture.all_prefixes():
            kind = dataset_kind(prefix)
            if kind != self.dataset_kind:
                raise ConfigError(
                    "data.mixture",
                    f"{prefix} holds {KIND_OF_DATA.get(kind, kind)}, but phase.name={self.name} "
                    f"trains on {KIND_OF_DATA[self.dataset_kind]}",
                    f"point the mixture {self.cfg.data.mixture} at {self.dataset_kind} datasets "
                    "or choose the phase that trains on this data")

    def build_datasets(self, tokenizer, mixture, samples: Sequence[int],
                       cache_dir: str) -> List[Optional[torch.utils.data.Dataset]]:
        """``[train, valid]`` datasets with at least ``samples[i]`` samples (None for 0)."""
        raise NotImplementedError

    # -- the step ------------------------------------------------------------------------
    def forward_step(self, data_iterator, model):
        """Megatron's ``forward_step_func``: ``(output, loss_func)`` for one micro-batch."""
        raise NotImplementedError

    def pipeline_shape(self, chunks) -> Tuple[int, int]:
        """``(seq_length, micro_batch_size)`` of the activations sent between pipeline
        stages."""
        return self.cfg.model.seq_length, self.cfg.train.micro_batch_size

    def data_tokens(self, batch: Dict[str, torch.Tensor]):
        """Real (non-padding) tokens in a micro-batch, for throughput (a number or a 0-d
        tensor on the batch's device)."""
        seq_ids = batch.get("seq_ids")
        return batch["tokens"].numel() if seq_ids is None else (seq_ids >= 0).sum()

    # -- metrics -------------------------------------------------------------------------
    def metrics(self, totals: Dict[str, Tuple[float, float]]) -> Dict[str, float]:
        """Logged values from the reduced ``[sum, count]`` of every report key."""
        out = {key: (s / c if c else float("nan")) for key, (s, c) in totals.items()}
        out["loss_tokens"] = totals[self.report_keys[0]][1]
        return out
