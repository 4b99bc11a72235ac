"""Next-token language-modelling phases: ``pretrain`` and ``midtrain``, and the token loss and
forward step they share with ``sft``.

The loss of a step is the sum of the per-token cross-entropies of every loss token of the global
batch divided by their number (:func:`token_loss` returns the sum and the count; Megatron's
schedule and ``finalize_model_grads`` do the rest, see :mod:`megaphi.training.step`). With
context parallelism each rank holds a slice of every row and reports its own tokens' sum and
count: the sums and counts add up over the context-parallel ranks like over data-parallel ones.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Dict, Tuple

import torch

from megaphi.phases.base import Phase


def token_loss(loss_mask: torch.Tensor, output: torch.Tensor):
    """``(loss_sum, num_tokens, report)`` of per-token losses ``output`` (``[b, s]``) over the
    positions where ``loss_mask`` is 1."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = (output.reshape(-1).float() * mask).sum()
    count = mask.sum()
    report = {"loss": torch.stack([loss_sum.detach(), count]).double()}
    return loss_sum, count.to(torch.int), report


def token_forward_step(data_iterator, model):
    """Megatron ``forward_step_func`` for a micro-batch of rows: ``tokens``, ``labels``,
    ``loss_mask``, ``position_ids`` and, for packed rows, ``seq_ids``.

    Packed rows attend within each segment only, with positions restarting at 0 (an explicit
    mask with the local spec, THD with Transformer Engine; :mod:`megaphi.model.packed`). Every
    pipeline stage runs this with the same batch, so middle stages get the boundaries too.
    With context parallelism (unpacked rows), the rank keeps its two of the ``2 * cp``
    sequence chunks (Megatron's load-balanced causal split)."""
    from megatron.core import parallel_state as ps

    batch: Dict[str, torch.Tensor] = next(data_iterator)
    if batch.get("seq_ids") is None:
        if ps.get_context_parallel_world_size() > 1:
            from megatron.core.utils import get_batch_on_this_cp_rank

            batch = get_batch_on_this_cp_rank(dict(batch))
        output = model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                       attention_mask=None, labels=batch["labels"])
    else:
        output = packed_forward(model, batch, batch["labels"])
    return output, partial(token_loss, batch["loss_mask"])


def packed_forward(model, batch: Dict[str, torch.Tensor], labels=None):
    """The model on a micro-batch of packed rows (``seq_ids`` gives the segments): per-token
    losses of ``labels``, or without labels the last stage's logits (``[b, s, V/tp]``, or
    ``[1, b * s, V/tp]`` in THD format); hidden states on the other pipeline stages."""
    from megatron.core.utils import unwrap_model

    from megaphi.model.packed import block_causal_mask, rotary_positions, thd_params

    seq_ids = batch["seq_ids"]
    b, s = batch["tokens"].shape
    if getattr(unwrap_model(model), "packed_format", "mask") == "thd":
        return model(input_ids=batch["tokens"].reshape(1, b * s),
                     position_ids=batch["position_ids"].reshape(1, b * s), attention_mask=None,
                     labels=None if labels is None else labels.reshape(1, b * s),
                     packed_seq_params=thd_params(seq_ids))
    with rotary_positions(model, batch["position_ids"]):
        return model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                     attention_mask=block_causal_mask(seq_ids), labels=labels)


class LMPhase(Phase):
    """``pretrain`` / ``midtrain``: every token of text datasets, Megatron's ``GPTDataset``
    samples blended from the mixture."""

    dataset_kind = "text"

    def __init__(self, cfg, name: str = "pretrain"):
        super().__init__(cfg)
        self.name = name

    def build_datasets(self, tokenizer, mixture, samples, cache_dir):
        from megaphi.data.datasets import build_gpt_datasets

        train, valid, _ = build_gpt_datasets(
            mixture, tokenizer, seq_length=self.cfg.model.seq_length, seed=self.cfg.train.seed,
            samples=[*samples, 0], cache_dir=cache_dir, model_vocab_size=self.cfg.model.vocab_size)
        return [train, valid]

    def forward_step(self, data_iterator, model):
        return token_forward_step(data_iterator, model)


def default_cache_dir(cfg) -> str:
    return cfg.data.cache_dir or str(Path(cfg.train.run_dir) / "data_cache")


def packed_shape(cfg, chunks) -> Tuple[int, int]:
    """Pipeline activation shape of packed rows: THD concatenates a micro-batch's rows."""
    from megatron.core.utils import unwrap_model

    s, b = cfg.model.seq_length, cfg.train.micro_batch_size
    if getattr(unwrap_model(chunks[0]), "packed_format", "mask") == "thd":
        return s * b, 1
    return s, b
