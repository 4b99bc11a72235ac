"""Packed rows: several documents in one row, each attending only to itself, with RoPE positions
restarting at 0 for each document.

A packed micro-batch carries ``seq_ids`` ``[b, s]``: the index of the document each position
belongs to within its row (0, 1, 2, ...; padding at the end of a row is one more segment whose
tokens carry no loss). It is read by every pipeline stage (each stage's forward step reads the
batch), so middle stages see the document boundaries too.

Two implementations give the same numbers:

- **mask** (the local layer spec, CPU): an explicit block-diagonal causal attention mask
  ``[b, 1, s, s]``, and RoPE from per-token positions. Megatron-Core's ``GPTModel`` derives RoPE
  angles from positions ``0..s-1`` and ignores ``position_ids``, so :func:`rotary_positions`
  makes the model's rotary embedding gather its table by ``position_ids`` for one forward pass.
- **thd** (Transformer Engine, GPU): the micro-batch's rows are concatenated into one sequence
  of ``b * s`` tokens described by ``cu_seqlens`` (``PackedSeqParams``); TE's attention and
  Megatron's RoPE restart at every boundary natively.

:func:`build_model` records which of the two a model chunk uses (``chunk.packed_format``).
"""

from __future__ import annotations

import contextlib
from typing import Tuple

import torch


def block_causal_mask(seq_ids: torch.Tensor) -> torch.Tensor:
    """Megatron's attention mask (``True`` = masked) for packed rows: position ``i`` attends to
    ``j <= i`` of the same document only. ``seq_ids`` is ``[b, s]``; returns ``[b, 1, s, s]``."""
    s = seq_ids.shape[1]
    same = seq_ids[:, :, None] == seq_ids[:, None, :]  # [b, s, s]
    causal = torch.ones(s, s, dtype=torch.bool, device=seq_ids.device).tril()
    return ~(same & causal).unsqueeze(1)


@contextlib.contextmanager
def rotary_positions(model: torch.nn.Module, position_ids: torch.Tensor):
    """Within the block, ``model``'s rotary embedding uses ``position_ids`` (``[b, s]``) instead
    of ``0..s-1``: it builds its usual table up to the largest position (so linear and YaRN
    rescaling apply as usual) and gathers one row per token, ``[s, b, 1, d]``."""
    from megatron.core.utils import unwrap_model

    rope = getattr(unwrap_model(model), "rotary_pos_emb", None)
    if rope is None:  # a model without RoPE
        yield
        return
    original = rope.forward
    table_length = int(position_ids.max().item()) + 1

    def forward(max_seq_len, *args, **kwargs):
        out = original(table_length, *args, **kwargs)
        table, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, None)
        per_token = table[position_ids.t()].squeeze(2)  # [s, b, 1, 1, d] -> [s, b, 1, d]
        return per_token if rest is None else (per_token, *rest)

    rope.forward = forward
    try:
        yield
    finally:
        del rope.forward  # the class's method again


def cu_seqlens(seq_ids: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """``(cu_seqlens, max_seqlen)`` of the rows of ``seq_ids`` concatenated into one sequence:
    int32 offsets ``[0, end_1, ..., b * s]`` of every segment, each row starting a new one."""
    b, s = seq_ids.shape
    flat = seq_ids.reshape(-1)
    starts = torch.ones_like(flat, dtype=torch.bool)
    starts[1:] = flat[1:] != flat[:-1]
    starts[::s] = True  # a new row always starts a new segment
    offsets = torch.nonzero(starts).flatten()
    cu = torch.cat([offsets, offsets.new_tensor([b * s])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max().item())


def thd_params(seq_ids: torch.Tensor):
    """Transformer Engine's packed-sequence description (``PackedSeqParams``, THD format)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu, longest = cu_seqlens(seq_ids)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=longest, max_seqlen_kv=longest)
