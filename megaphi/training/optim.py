"""AdamW and its learning-rate schedule, on Megatron-Core's optimizer and scheduler.

The optimizer is Megatron's (``get_megatron_optimizer``): AdamW with decoupled weight decay,
no decay on 1-D parameters (the norms; the model has no biases), global-norm gradient clipping,
fp32 master weights under bf16, and optionally the distributed optimizer that shards its state
over data-parallel ranks. The schedule is Megatron's ``OptimizerParamScheduler``: linear warm-up,
then linear (Phi-4), cosine, or warmup-stable-decay down to ``optimizer.min_lr``. It advances
by samples, so it is exact across changes of batch size.
"""

from __future__ import annotations

from typing import List

import torch

from megaphi.config.schema import MegaphiConfig


def build_optimizer(cfg: MegaphiConfig, chunks: List[torch.nn.Module]):
    """Megatron's optimizer for the (DDP-wrapped) model chunks."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    o = cfg.optimizer
    bf16 = cfg.precision.dtype == "bf16"
    config = OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        clip_grad=o.clip_grad, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=o.distributed, decoupled_weight_decay=True,
    )
    return get_megatron_optimizer(config, chunks)


def build_scheduler(cfg: MegaphiConfig, optimizer):
    """Megatron's LR/WD scheduler, stepped in samples (``increment=global_batch_size``)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    s, o, gbs = cfg.schedule, cfg.optimizer, cfg.train.global_batch_size
    decay_iters = s.decay_iters or cfg.train.iters
    style = {"linear": "linear", "cosine": "cosine", "wsd": "WSD"}[s.style]
    wsd = {}
    if s.style == "wsd":
        # WSD: hold the peak until the last `decay_iters` steps, then decay linearly.
        wsd = {"wsd_decay_steps": decay_iters * gbs, "lr_wsd_decay_style": "linear"}
        decay_iters = cfg.train.iters
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=s.warmup_iters * gbs, lr_decay_steps=max(decay_iters, 1) * gbs,
        lr_decay_style=style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=cfg.train.iters * gbs, wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=True, override_opt_param_scheduler=False, **wsd)
