"""Build the Phi-4 decoder as a Megatron-Core ``GPTModel`` from a megaphi config.

The model is a spec plus a config: :func:`transformer_config` maps megaphi's config onto
Megatron's ``TransformerConfig``, :func:`decoder_block_spec` picks the Transformer Engine layers
(GPU, FP8-capable) or the local ones (CPU) with megaphi's sequence-parallel RMSNorm, and
:func:`build_model` is the one function that instantiates it, one module per virtual pipeline
stage of this rank. Weights are then set by :mod:`megaphi.model.init`, identically at any layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from typing import TYPE_CHECKING, List, Optional

import torch
import torch.nn.functional as F

from megaphi.config.schema import MegaphiConfig

if TYPE_CHECKING:
    from megatron.core.models.gpt import GPTModel

    from megaphi.model.arithmetic import ParamCounts

logger = logging.getLogger(__name__)


def te_available() -> bool:
    """True when Transformer Engine imports and a GPU is present (its layers need CUDA)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        return False
    return True


def transformer_config(cfg: MegaphiConfig, use_te: bool, on_gpu: bool):
    """Megatron's ``TransformerConfig`` for this model, layout and precision.

    Args:
        cfg: the run config.
        use_te: whether the Transformer Engine layer spec is used (enables FP8 and TE fusions).
        on_gpu: whether the model lives on a CUDA device (enables the CUDA-only fusions).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    m, p, prec = cfg.model, cfg.parallel, cfg.precision
    bf16 = prec.dtype == "bf16"
    interleaved = p.pp > 1 and (p.vpp or 1) > 1
    dtype = torch.bfloat16 if bf16 else torch.float32
    fp8 = prec.fp8.megatron_fields() if use_te else {}
    if prec.fp8.recipe is not None and not use_te:
        from megaphi.config.schema import ConfigError

        raise ConfigError("precision.fp8.recipe",
                          "FP8 needs Transformer Engine layers, which are not available here "
                          "(no CUDA GPU, or transformer-engine is not installed)",
                          "set precision.fp8.recipe=null, or install megaphi[gpu] on a GPU machine")
    if p.cp > 1 and not use_te:
        from megaphi.config.schema import ConfigError

        raise ConfigError("parallel.cp",
                          f"context parallelism (cp={p.cp}) runs in Transformer Engine's "
                          "attention, which is not available here (no CUDA GPU, or "
                          "transformer-engine is not installed)",
                          "set parallel.cp=1, or install megaphi[gpu] on a GPU machine")
    recompute = {
        "none": {},
        "selective": dict(recompute_granularity="selective"),
        "full": dict(recompute_granularity="full", recompute_method="uniform",
                     recompute_num_layers=1),
    }[cfg.train.recompute]
    config_class, rope = TransformerConfig, {}
    if m.rope_scaling == "yarn":
        config_class, rope = _yarn_config_class(), dict(
            yarn_rotary_scaling_factor=m.rope_scaling_factor,
            yarn_original_max_position_embeddings=m.rope_original_seq_length)
    return config_class(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_kv_heads,
        kv_channels=m.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_std,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp if p.pp > 1 else None,
        sequence_parallel=p.sequence_parallel,
        context_parallel_size=p.cp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=bf16,
        autocast_dtype=dtype,
        # Megatron's own initialisation also tags tensor-parallel attributes (partition_dim, ...)
        # that grad clipping and checkpointing read, so it stays on; megaphi.model.init then
        # overwrites every weight with values that are identical at any layout.
        perform_initialization=True,
        use_cpu_initialization=not on_gpu,
        # CUDA-only fusions: off on the CPU.
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        # TE's fused RoPE cannot apply YaRN's attention scaling.
        apply_rope_fusion=use_te and m.rope_scaling != "yarn",
        gradient_accumulation_fusion=use_te,
        cross_entropy_loss_fusion=on_gpu,
        # The loss of a step is the sum of per-token losses over the global batch divided by
        # the number of loss tokens (pairs, for DPO): loss functions return (sum, count,
        # report), and finalize_model_grads divides the summed gradients by the total count.
        calculate_per_token_loss=True,
        deallocate_pipeline_outputs=True,
        # Interleaved schedules exchange activations and gradients with the same peer when
        # pp=2, and the batched p2p path can match the two same-shaped messages in the wrong
        # order; Megatron-LM's default for interleaving (unbatched p2p, separate communicators
        # per direction) is exact. Its overlapped variant frees a sent activation before an
        # async gloo send has read it, so it is used on GPUs only (NCCL is stream-ordered).
        overlap_p2p_comm=interleaved and on_gpu,
        batch_p2p_comm=not interleaved,
        **fp8,
        **rope,
        **recompute,
    )


@functools.lru_cache(maxsize=None)
def _yarn_config_class():
    """``TransformerConfig`` with the YaRN fields ``GPTModel`` reads for
    ``position_embedding_type="yarn"`` (Megatron-Core 0.16.1 declares them only on its
    multi-latent-attention config). Defaults are YaRN's: beta_fast 32, beta_slow 1, and an
    attention scale of 0.1 ln(factor) + 1 on queries and keys."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    @dataclasses.dataclass
    class YarnTransformerConfig(TransformerConfig):
        yarn_rotary_scaling_factor: float = 1.0
        yarn_original_max_position_embeddings: int = 4096
        yarn_beta_fast: float = 32.0
        yarn_beta_slow: float = 1.0
        yarn_mscale: float = 1.0
        yarn_mscale_all_dim: float = 0.0
        yarn_correction_range_round_to_int: bool = True

    return YarnTransformerConfig


def rope_arguments(model) -> dict:
    """``GPTModel`` keyword arguments of the model's RoPE and its rescaling method."""
    return dict(
        position_embedding_type="yarn" if model.rope_scaling == "yarn" else "rope",
        rotary_percent=1.0,
        rotary_base=int(model.rotary_base),
        seq_len_interpolation_factor=(model.rope_scaling_factor
                                      if model.rope_scaling == "linear" else None),
    )


def decoder_block_spec(config, use_te: bool, vp_stage: Optional[int] = None):
    """The decoder block of this pipeline (virtual) stage: its layers and the final RMSNorm."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        layer = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
        final_norm = TENorm
    else:
        from megaphi.model.norm import RMSNorm

        layer = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
        layer = dataclasses.replace(layer, submodules=dataclasses.replace(
            layer.submodules, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm))
        final_norm = RMSNorm
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=final_norm)


def build_model(cfg: MegaphiConfig, use_te: Optional[bool] = None,
                device: Optional[torch.device] = None) -> List[torch.nn.Module]:
    """Build this rank's part of the model: one ``GPTModel`` per virtual pipeline stage.

    Parallel state must be initialised (:func:`megaphi.platform.init_runtime`). Megatron's
    initialisation depends on the layout; call :func:`megaphi.model.init.initialize_weights` next.

    Args:
        cfg: the run config.
        use_te: force the Transformer Engine spec on or off (default: on when TE is usable).
        device: where to allocate; ``torch.device("meta")`` builds without memory.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if use_te is None:
        use_te = te_available()
    on_gpu = torch.cuda.is_available() and (device is None or device.type == "cuda")
    config = transformer_config(cfg, use_te=use_te, on_gpu=on_gpu)
    vpp = config.virtual_pipeline_model_parallel_size
    stages = range(vpp) if vpp else [None]
    ctx = torch.device(device) if device is not None else contextlib.nullcontext()
    chunks = []
    with ctx:
        for vp_stage in stages:
            chunks.append(GPTModel(
                config=config,
                transformer_layer_spec=decoder_block_spec(config, use_te, vp_stage),
                vocab_size=cfg.model.vocab_size,
                max_sequence_length=cfg.model.seq_length,
                pre_process=parallel_state.is_pipeline_first_stage(
                    ignore_virtual=False, vp_stage=vp_stage),
                post_process=parallel_state.is_pipeline_last_stage(
                    ignore_virtual=False, vp_stage=vp_stage),
                parallel_output=True,
                share_embeddings_and_output_weights=cfg.model.tie_embeddings,
                **rope_arguments(cfg.model),
                vp_stage=vp_stage,
            ))
    for chunk in chunks:  # how packed rows reach attention (megaphi.model.packed)
        chunk.packed_format = "thd" if use_te else "mask"
    if device is None and on_gpu:
        for chunk in chunks:
            chunk.cuda(torch.cuda.current_device())
    return chunks


def build_meta_model(cfg: MegaphiConfig) -> "GPTModel":
    """The whole ``GPTModel`` this config defines (TP=1, PP=1) on the meta device, built in a
    private single-process group, so nothing is allocated. Must be called when no Megatron
    parallel state is initialised in this process."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megaphi.platform import install_cpu_compat, single_process_group

    if dist.is_initialized():
        raise RuntimeError("build_meta_model() needs a process without torch.distributed")
    if not torch.cuda.is_available():
        install_cpu_compat()
    whole = dataclasses.replace(cfg, parallel=dataclasses.replace(
        cfg.parallel, tp=1, pp=1, vpp=None, cp=1, sequence_parallel=False))
    with single_process_group():
        parallel_state.initialize_model_parallel()
        try:
            (model,) = build_model(whole, use_te=False, device=torch.device("meta"))
        finally:
            parallel_state.destroy_model_parallel()
    return model


def count_parameters(cfg: MegaphiConfig, model=None) -> "ParamCounts":
    """Count the parameters of the ``GPTModel`` this config defines, without allocating it:
    those of :func:`build_meta_model` (or ``model``, already built by it), so the count is that
    of the real Megatron-Core model, not of a formula."""
    from megaphi.model.arithmetic import ParamCounts

    model = model if model is not None else build_meta_model(cfg)
    total = non_embedding = 0
    for name, param in model.named_parameters():
        total += param.numel()
        if not name.startswith(("embedding.", "output_layer.")):
            non_embedding += param.numel()
    return ParamCounts(total=total, non_embedding=non_embedding)
