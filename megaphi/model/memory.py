"""Per-GPU memory of a training layout, before the job is queued (``megaphi-train --dry-run``).

Static memory is counted from the model the config defines: the whole ``GPTModel`` is built on
the meta device (:func:`megaphi.model.builder.build_meta_model`, as for the parameter count), every parameter is
assigned to the pipeline stage that holds it (Megatron-Core's layer assignment, interleaved
included) and divided by TP when Megatron marks it tensor-parallel. Per rank:

- weights: the parameters in the compute dtype (bf16: 2 bytes; fp32: 4; FP8 runs keep bf16
  weights);
- gradients: Megatron DDP's contiguous buffer, fp32 (megaphi reduces gradients in fp32);
- optimizer state: Adam's two moments in fp32, plus fp32 main weights when the weights are not
  fp32; the distributed optimizer divides them over the data-parallel ranks (DP x CP).

Activations follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", Table 2): the tensors each layer keeps for its backward pass, per
micro-batch, with TP and sequence parallelism dividing all of them by t and context parallelism
dividing the sequence. The paper counts a GPT block (GeLU MLP of 4h, dropout); the same
accounting for Phi-4's block (no dropout, RMSNorm, GQA with kv heads, SwiGLU of width f, and TE's
flash attention, which keeps no s x s scores), in elements of s*b*h / t per layer:

    attention: norm input 1, QKV input 1, Q 1, K and V 2*kv/a, attention output 1   = 4 + 2kv/a
    MLP:       norm input 1, FC1 input 1, FC1 output (gate, up) 2f/h, FC2 input f/h = 2 + 3f/h

at 2 bytes each (4 in fp32 runs). For Phi-4 (kv/a = 1/4, f/h = 3.5) that is 17 elements, 34
bytes: the paper's 34 sbh by coincidence. ``selective`` recomputation (the attention core) saves
nothing more with flash attention; ``full`` keeps only each layer's input (1 element) plus one
layer's full set while it is recomputed. The last stage adds its output layer: the final norm's
and the output layer's inputs and the fp32 logits (s*b*V/t, 4 bytes), for one micro-batch.

A pipeline stage holds several micro-batches' activations at once. With 1F1B, stage k of p
holds min(p - k, m) of m micro-batches; with the interleaved schedule (v chunks) the first stage
holds p * (1 + (p - 1) / (p * v)) micro-batches' worth (Megatron-LM's penalty), and stage k
scales with it. The estimate is reported for the stage whose total is largest.

It leaves out the CUDA context and NCCL buffers (~1-3 GB), the allocator's fragmentation, and
temporary tensors of a single kernel; hence the margin in the warning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional

GIB = 1 << 30
FIT_MARGIN = 0.9  # warn above 90% of the device: CUDA context, NCCL and fragmentation live there


@dataclass
class StageMemory:
    stage: int
    params: int  # this rank's parameters
    weights: int  # bytes
    grads: int
    optimizer: int
    activations: int
    in_flight: float  # micro-batches whose activations the stage holds at the peak

    @property
    def static(self) -> int:
        return self.weights + self.grads + self.optimizer

    @property
    def total(self) -> int:
        return self.static + self.activations


@dataclass
class MemoryEstimate:
    stages: List[StageMemory]
    dp: int
    microbatches: int
    per_layer: int  # activation bytes of one layer for one micro-batch
    layers_per_stage: int
    notes: List[str]

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    def report(self, device_gb: Optional[float] = None, device_name: str = "") -> str:
        p = self.peak
        gib = gib_text
        lines = [
            f"# memory per GPU (the most loaded pipeline stage: {p.stage} of "
            f"{len(self.stages)}; dp={self.dp}, {self.microbatches} micro-batches per step)",
            f"parameters on this rank: {p.params:,}",
            f"weights:          {gib(p.weights)}",
            f"gradients (fp32): {gib(p.grads)}",
            f"optimizer state:  {gib(p.optimizer)}",
            f"activations:      {gib(p.activations)} ({self.layers_per_stage} layers x "
            f"{p.in_flight:g} micro-batches in flight x {self.per_layer / (1 << 20):,.1f} MiB "
            "per layer and micro-batch, plus the output layer on the last stage)",
            f"total:            {gib(p.total)}",
        ]
        if len(self.stages) > 1:
            lines.append("per stage: " + ", ".join(f"{s.stage}: {s.total / GIB:,.1f} GiB"
                                                   for s in self.stages))
        lines += [f"note: {n}" for n in self.notes]
        if device_gb:
            share = p.total / (device_gb * GIB)
            where = f"{device_name} " if device_name else ""
            lines.append(f"device: {where}{device_gb:,.1f} GiB; the estimate is {share:.0%} of it")
            if share > FIT_MARGIN:
                lines.append(
                    f"WARNING: this layout needs ~{gib(p.total)} per GPU, more than "
                    f"{FIT_MARGIN:.0%} of {device_gb:,.1f} GiB (CUDA context, NCCL buffers and "
                    "fragmentation need the rest): expect out-of-memory at step 1. Raise "
                    "parallel.tp/pp/cp, lower train.micro_batch_size, or set "
                    "train.recompute=full")
        return "\n".join(lines)


def gib_text(n: float) -> str:
    return f"{n / GIB:,.2f} GiB"


def stage_of_layers(num_layers: int, pp: int, vpp: Optional[int]) -> List[int]:
    """The pipeline stage holding each layer (Megatron-Core's assignment: with v virtual chunks,
    chunk c of stage k holds layers c*L/v + k*L/(p*v) ...)."""
    chunks = vpp or 1
    per = num_layers // (pp * chunks)
    stage = []
    for layer in range(num_layers):
        within_chunk = layer % (num_layers // chunks)
        stage.append(within_chunk // per)
    return stage


def static_parameters(cfg, model=None) -> Dict[int, int]:
    """Parameters each pipeline stage's rank holds (TP rank 0), from the meta-device model
    (:func:`megaphi.model.builder.build_meta_model`, or ``model`` already built by it)."""
    from megaphi.model.builder import build_meta_model

    p = cfg.parallel
    model = model if model is not None else build_meta_model(cfg)
    stage_of = stage_of_layers(cfg.model.num_layers, p.pp, p.vpp)
    counts = {k: 0 for k in range(p.pp)}
    for name, param in model.named_parameters():
        if name.startswith("embedding."):
            stage = 0
        elif name.startswith(("output_layer.", "decoder.final_layernorm.")):
            stage = p.pp - 1
        else:
            stage = stage_of[int(name.split("decoder.layers.")[1].split(".")[0])]
        n = param.numel()
        if getattr(param, "tensor_model_parallel", False):
            n //= p.tp
        counts[stage] += n
        if name.startswith("embedding.") and cfg.model.tie_embeddings and p.pp > 1:
            counts[p.pp - 1] += n  # the last stage keeps its own copy for the output layer
    return counts


def layer_activation_bytes(cfg, recompute: Optional[str] = None) -> int:
    """Activation bytes one layer keeps for one micro-batch, on one rank (module docstring)."""
    m, p = cfg.model, cfg.parallel
    recompute = recompute or cfg.train.recompute
    s = m.seq_length // p.cp
    sbh = s * cfg.train.micro_batch_size * m.hidden_size
    kv_ratio = m.num_kv_heads / m.num_attention_heads
    q_width = m.kv_channels * m.num_attention_heads / m.hidden_size  # 1 for Phi-4
    f = m.ffn_hidden_size / m.hidden_size
    kept = 2 + q_width * (2 + 2 * kv_ratio) + 2 + 3 * f  # attention, then MLP
    elements = {"none": kept, "selective": kept, "full": 1.0}[recompute]
    tp_split = p.tp if (p.sequence_parallel or p.tp == 1) else 1
    # without sequence parallelism the norm inputs and the linear inputs are full on every rank
    if not p.sequence_parallel and p.tp > 1:
        replicated = 4.0 if recompute != "full" else 1.0  # 2 norm inputs, QKV and FC1 inputs
        sharded = elements - replicated
        per_rank = replicated + sharded / p.tp
    else:
        per_rank = elements / tp_split
    return int(sbh * per_rank * _act_bytes(cfg))


def _act_bytes(cfg) -> int:
    return 4 if cfg.precision.dtype == "fp32" else 2


def output_activation_bytes(cfg) -> int:
    """The last stage's output layer for one micro-batch: final norm and output layer inputs and
    the fp32 logits of the cross-entropy (vocabulary split over TP)."""
    m, p = cfg.model, cfg.parallel
    sb = (m.seq_length // p.cp) * cfg.train.micro_batch_size
    return int(2 * sb * m.hidden_size * _act_bytes(cfg) / p.tp + sb * m.vocab_size * 4 / p.tp)


def in_flight(cfg, stage: int, microbatches: int) -> float:
    p = cfg.parallel
    if p.pp == 1:
        return 1.0
    if p.vpp:
        penalty = 1 + (p.pp - 1) / (p.pp * p.vpp)
        return (p.pp - stage) * penalty
    return float(min(p.pp - stage, microbatches))


def data_parallel_size(parallel, world_size: Optional[int]) -> int:
    """``world_size / (tp * pp * cp)``, 1 when ``world_size`` is None (one replica);
    :class:`ValueError` when it does not divide."""
    world = world_size or parallel.model_parallel_size
    if world % parallel.model_parallel_size:
        raise ValueError(f"world size {world} is not a multiple of tp*pp*cp = "
                         f"{parallel.model_parallel_size}")
    return world // parallel.model_parallel_size


def estimate_memory(cfg, world_size: Optional[int] = None,
                    params: Optional[Dict[int, int]] = None) -> MemoryEstimate:
    """The per-GPU memory of every pipeline stage of ``cfg`` on ``world_size`` GPUs (default:
    one data-parallel replica)."""
    p = cfg.parallel
    dp = data_parallel_size(p, world_size)
    micro = cfg.train.micro_batch_size
    microbatches = max(1, cfg.train.global_batch_size // (micro * dp))
    params = params if params is not None else static_parameters(cfg)
    fp32 = cfg.precision.dtype == "fp32"
    weight_bytes = 4 if fp32 else 2
    # Adam moments (and fp32 main weights unless the weights are fp32), sharded over DP x CP
    optimizer_bytes = 8 if fp32 else 12
    shard = dp * p.cp if cfg.optimizer.distributed else 1
    per_layer = layer_activation_bytes(cfg)
    layers = cfg.model.num_layers // p.pp
    full_layer = layer_activation_bytes(cfg, "none")
    stages = []
    for k in range(p.pp):
        n = params[k]
        flight = in_flight(cfg, k, microbatches)
        act = layers * flight * per_layer
        if cfg.train.recompute == "full":
            act += full_layer  # the layer being recomputed in the backward pass
        if k == p.pp - 1:
            act += output_activation_bytes(cfg)
        stages.append(StageMemory(k, n, n * weight_bytes, n * 4,
                                  math.ceil(n * optimizer_bytes / shard), int(act), flight))
    notes = [
        "activations assume TE's flash attention (no s x s scores); the CUDA context, NCCL "
        "buffers and allocator fragmentation are not included",
        "the optimizer step assumes a fused Adam (Transformer Engine's or Apex's, as on a GPU "
        "install); without them PyTorch's foreach AdamW briefly adds ~4 bytes per parameter of "
        f"this rank's optimizer shard ({gib_text(4 * max(params.values()) / shard)} here)",
    ]
    if cfg.phase.name == "dpo":
        notes.append("DPO rows pack each pair's chosen and rejected side by side: a micro-batch "
                     "is train.micro_batch_size rows as in SFT; the reference log-probs are "
                     "precomputed, so no second model is resident")
    return MemoryEstimate(stages, dp, microbatches, per_layer, layers, notes)


__all__ = ["estimate_memory", "data_parallel_size", "MemoryEstimate", "StageMemory", "static_parameters",
           "layer_activation_bytes", "output_activation_bytes", "stage_of_layers", "in_flight"]
