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
    count_name: str = "loss_tokens"
    """The logged name of the loss's count (what the loss is averaged over)."""

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

    def prepare(self, rt, chunks, layout: dict) -> None:
        """Work the phase does with the model before the policy's weights are loaded (DPO:
        the reference log-probs); nothing by default."""

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
        out[self.count_name] = totals[self.report_keys[0]][1]
        return out


def rows_once(rows, micro_batch_size: int, dp_rank: int, dp: int, device):
    """This data-parallel rank's micro-batches covering every row of ``rows`` (a
    :class:`~megaphi.data.packing.PackedRows`) exactly once; rows past the end are padding
    (no loss), so every rank runs the same number of micro-batches."""
    per_step = micro_batch_size * dp
    for step in range(-(-len(rows) // per_step)):
        first = step * per_step + dp_rank * micro_batch_size
        items = [rows[i] if i < len(rows) else rows.row([])
                 for i in range(first, first + micro_batch_size)]
        yield {k: torch.stack([it[k] for it in items]).to(device) for k in items[0]}


def forward_once(cfg: MegaphiConfig, rt, chunks, rows, forward_step_func, shape,
                 what: str = "rows") -> list:
    """Run ``forward_step_func`` forward only over every row of ``rows`` once (spread over the
    data-parallel ranks, ``train.micro_batch_size`` rows per micro-batch), logging progress;
    returns the loss reports of this rank's last pipeline stage (empty on other stages).
    ``shape`` is ``(seq_length, micro_batch_size)`` of the pipeline's activations."""
    import logging
    import time

    from megatron.core import parallel_state as ps

    from megaphi.training.step import forward_backward

    log = logging.getLogger("megaphi")
    mbs = cfg.train.micro_batch_size
    micro = list(rows_once(rows, mbs, ps.get_data_parallel_rank(), rt.dp, rt.device))
    reports, start, group = [], time.perf_counter(), 16
    with torch.no_grad():
        for i in range(0, len(micro), group):
            part = micro[i:i + group]
            reports += forward_backward(chunks, part, len(part), seq_length=shape[0],
                                        micro_batch_size=shape[1],
                                        forward_step_func=forward_step_func, forward_only=True)
            done = min(len(rows), (i + len(part)) * mbs * rt.dp)
            log.info("%s: %d of %d rows (%.1f rows/s)", what, done, len(rows),
                     done / max(time.perf_counter() - start, 1e-9))
    return reports
