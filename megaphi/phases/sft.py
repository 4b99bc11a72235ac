"""``sft``: supervised fine-tuning on chat conversations, packed.

The data are chat datasets (``tools/preprocess_data.py --format chat``) blended by weight from
the mixture. Conversations are packed into rows of ``model.seq_length`` tokens
(:mod:`megaphi.data.packing`); the loss falls on the assistant tokens only, token-weighted over
the global batch (:func:`megaphi.phases.lm.token_loss`). Attention stays inside each
conversation and positions restart at 0 for each (:mod:`megaphi.model.packed`).
"""

from __future__ import annotations

from megaphi.config.schema import ConfigError
from megaphi.phases.base import Phase
from megaphi.phases.lm import packed_shape, token_forward_step


class SFTPhase(Phase):
    name = "sft"
    dataset_kind = "chat"

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.parallel.cp > 1 and cfg.data.packing:
            raise ConfigError("parallel.cp", f"packed SFT rows are not split over context-"
                              f"parallel ranks yet (cp={cfg.parallel.cp})",
                              "set parallel.cp=1 (use train.recompute=full for 16K rows), or "
                              "data.packing=false (one padded conversation per row, which "
                              "context parallelism splits)")

    def build_datasets(self, tokenizer, mixture, samples, cache_dir):
        from megaphi.data.datasets import check_datasets_tokenizer
        from megaphi.data.packing import ChatSegments, PackedRows, build_packed_rows

        cfg = self.cfg
        check_datasets_tokenizer(mixture.all_prefixes(), tokenizer, cfg.model.vocab_size)
        seq = cfg.model.seq_length
        truncate = cfg.data.overlong == "truncate"

        def rows_of(seed):
            return lambda i, prefix, n: PackedRows(
                ChatSegments(prefix, tokenizer, seq, truncate=truncate), seq,
                seed=seed + 7919 * i, num_samples=n, packing=cfg.data.packing,
                pad_id=tokenizer.pad_id)

        out = []
        for split, n in zip(("train", "valid"), samples):
            blend = mixture.blend(split)
            out.append(None if not n or blend is None else build_packed_rows(
                blend, rows_of(cfg.train.seed + (split == "valid")), num_samples=n))
        return out

    def forward_step(self, data_iterator, model):
        if not self.cfg.data.packing:
            # One conversation per row, at its start: plain causal attention is exact (the
            # padding comes after it) and context parallelism splits the row as usual.
            data_iterator = (_without_segments(batch) for batch in data_iterator)
        return token_forward_step(data_iterator, model)

    def pipeline_shape(self, chunks):
        if not self.cfg.data.packing:
            return super().pipeline_shape(chunks)
        return packed_shape(self.cfg, chunks)


def _without_segments(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "seq_ids"}
