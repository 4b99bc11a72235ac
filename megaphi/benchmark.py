"""Training throughput of megaphi, and of a Hugging Face baseline of the same shape.

:func:`run_megaphi` times full training steps of the real trainer (Megatron-Core's pipeline
schedule over the global batch, DDP reductions, the distributed optimizer step) on random token
ids after warm-up steps; :func:`run_hf` times the same steps of a ``transformers``
``Phi3ForCausalLM`` of the same shape (fp32 master weights with bf16 autocast, SDPA attention,
torch AdamW, optionally ``torch.compile``) in the same process. Model TFLOP/s use Megatron's
causal formula (:mod:`megaphi.model.arithmetic`) for both, so their ratio is a ratio of speeds.

``tools/benchmark_throughput.py`` is the command line; launch it with torchrun for several GPUs.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import time
from dataclasses import dataclass
from typing import List, Optional

import torch

from megaphi.config.schema import MegaphiConfig

logger = logging.getLogger("megaphi.benchmark")

# --precision: (precision.dtype, precision.fp8.recipe)
PRECISIONS = {
    "fp32": ("fp32", None),
    "bf16": ("bf16", None),
    "fp8-delayed": ("bf16", "delayed"),
    "fp8-current": ("bf16", "current"),
    "fp8-blockwise": ("bf16", "blockwise"),
}


@dataclass
class Measurement:
    """One timed configuration; per-GPU figures are over all ranks of the run."""

    name: str
    spec: str
    precision: str
    layers: int
    seq_length: int
    micro_batch: int
    global_batch: int
    layout: str
    gpus: int
    step_time_s: float
    tokens_per_s_per_gpu: float
    tflops_per_gpu: float
    mfu: Optional[float]
    peak_memory_gb: float
    loss: float


def bench_overrides(num_layers: Optional[int], seq_length: Optional[int], micro_batch: int,
                    global_batch: int, tp: int, pp: int, cp: int, precision: str) -> List[str]:
    """The config overrides a benchmark run applies to its preset."""
    dtype, recipe = PRECISIONS[precision]
    out = [f"train.micro_batch_size={micro_batch}", f"train.global_batch_size={global_batch}",
           f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.cp={cp}",
           f"precision.dtype={dtype}", f"precision.fp8.recipe={recipe or 'null'}",
           "parallel.sequence_parallel=" + ("true" if tp > 1 else "false")]
    if num_layers is not None:
        out.append(f"model.num_layers={num_layers}")
    if seq_length is not None:
        out.append(f"model.seq_length={seq_length}")
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _random_sequences(cfg: MegaphiConfig, count: int, seed: int) -> torch.Tensor:
    """``[count, seq + 1]`` token ids, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.model.vocab_size, (count, cfg.model.seq_length + 1), generator=g)


def _measurement(name: str, cfg: MegaphiConfig, spec: str, precision: str, peak: str,
                 world: int, step_time: float, device: torch.device, loss: float) -> Measurement:
    from megaphi.model.arithmetic import step_throughput
    from megaphi.platform import device_name

    speed = step_throughput(cfg.model, cfg.train.global_batch_size * cfg.model.seq_length,
                            step_time, world, device_name(device), peak)
    p = cfg.parallel
    return Measurement(
        name=name, spec=spec, precision=precision, layers=cfg.model.num_layers,
        seq_length=cfg.model.seq_length, micro_batch=cfg.train.micro_batch_size,
        global_batch=cfg.train.global_batch_size,
        layout=f"tp{p.tp} pp{p.pp} cp{p.cp} dp{world // p.model_parallel_size}", gpus=world,
        step_time_s=step_time, tokens_per_s_per_gpu=speed["tokens_per_s_per_gpu"],
        tflops_per_gpu=speed["tflops_per_gpu"], mfu=speed["mfu"],
        peak_memory_gb=_peak_memory_gb(device), loss=loss)


def run_megaphi(cfg: MegaphiConfig, rt, use_te: bool, precision: str, warmup: int,
                steps: int) -> Measurement:
    """Time ``steps`` training steps of megaphi's trainer after ``warmup`` untimed ones."""
    from megatron.core import parallel_state as ps

    from megaphi.model.builder import build_model
    from megaphi.model.init import initialize_weights
    from megaphi.phases import get_phase
    from megaphi.training.metrics import MetricsWriter
    from megaphi.training.optim import build_optimizer, build_scheduler
    from megaphi.training.step import lm_batch, wrap_for_training
    from megaphi.training.trainer import Trainer

    chunks = build_model(cfg, use_te=use_te)
    initialize_weights(chunks, cfg.model, seed=cfg.train.seed)
    chunks = wrap_for_training(chunks, distributed_optimizer=cfg.optimizer.distributed)
    optimizer = build_optimizer(cfg, chunks)
    trainer = Trainer(cfg, rt, chunks, optimizer, build_scheduler(cfg, optimizer),
                      MetricsWriter("", False, enabled=False), get_phase(cfg))
    try:
        per_rank = cfg.train.global_batch_size // rt.dp
        sequences = _random_sequences(cfg, cfg.train.global_batch_size, cfg.train.seed)
        mine = sequences[ps.get_data_parallel_rank() * per_rank:][:per_rank]
        mbs = cfg.train.micro_batch_size
        micro = [lm_batch(mine[i:i + mbs], rt.device) for i in range(0, per_rank, mbs)]
        for _ in range(warmup):
            trainer.step(micro)
        _sync(rt.device)
        _reset_peak_memory(rt.device)
        start = time.perf_counter()
        for _ in range(steps):
            result = trainer.step(micro)
        _sync(rt.device)
        elapsed = (time.perf_counter() - start) / steps
    finally:
        trainer.preemption.restore()
    from megaphi.model.arithmetic import peak_precision

    measured = _measurement("megaphi", cfg, "te" if use_te else "local", precision,
                            peak_precision(cfg.precision), rt.world_size, elapsed, rt.device,
                            result.loss)
    del trainer, optimizer, chunks
    gc.collect()
    if rt.device.type == "cuda":
        torch.cuda.empty_cache()
    return measured


def hf_model(cfg: MegaphiConfig, device: torch.device):
    """A ``transformers`` ``Phi3ForCausalLM`` with this config's shape (fp32 weights)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    m = cfg.model
    config = Phi3Config(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_kv_heads, head_dim=m.kv_channels,
        max_position_embeddings=m.seq_length, original_max_position_embeddings=m.seq_length,
        rope_theta=m.rotary_base, rms_norm_eps=m.norm_eps,
        tie_word_embeddings=m.tie_embeddings, attention_dropout=0.0, resid_pdrop=0.0,
        embd_pdrop=0.0, use_cache=False, attn_implementation="sdpa")
    return Phi3ForCausalLM(config).to(device)


def run_hf(cfg: MegaphiConfig, device: torch.device, warmup: int, steps: int,
           compile_model: bool) -> Measurement:
    """Time the Hugging Face baseline: one process, gradient accumulation over the global batch."""
    model = hf_model(cfg, device)
    model.train()
    if compile_model:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95),
                                  weight_decay=0.1, fused=device.type == "cuda")
    bf16 = cfg.precision.dtype == "bf16"
    mbs, gbs = cfg.train.micro_batch_size, cfg.train.global_batch_size
    sequences = _random_sequences(cfg, gbs, cfg.train.seed).to(device)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(0, gbs, mbs):
            batch = sequences[i:i + mbs]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), batch[:, 1:].flatten()) / (gbs // mbs)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return total

    for _ in range(warmup):
        step()
    _sync(device)
    _reset_peak_memory(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    elapsed = (time.perf_counter() - start) / steps
    one = dataclasses.replace(cfg, parallel=dataclasses.replace(
        cfg.parallel, tp=1, pp=1, cp=1, vpp=None, sequence_parallel=False))
    dtype = "bf16" if bf16 else "fp32"
    measured = _measurement("hf" + ("+compile" if compile_model else ""), one, "hf-sdpa", dtype,
                            dtype, 1, elapsed, device, float(loss))
    del model, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return measured


COLUMNS = (("name", "{}"), ("spec", "{}"), ("precision", "{}"), ("layers", "{}"),
           ("seq_length", "{}"), ("micro_batch", "{}"), ("global_batch", "{}"), ("layout", "{}"),
           ("tokens_per_s_per_gpu", "{:,.0f}"), ("step_time_s", "{:.3f}"),
           ("tflops_per_gpu", "{:.4g}"), ("mfu", "{:.1%}"), ("peak_memory_gb", "{:.1f}"))


def format_table(measurements: List[Measurement]) -> str:
    """A plain-text table, one row per measurement, with the speed ratio to the first row."""
    rows = [[name for name, _ in COLUMNS] + ["x first"]]
    base = measurements[0].tokens_per_s_per_gpu
    for m in measurements:
        values = dataclasses.asdict(m)
        rows.append([("-" if values[k] is None else fmt.format(values[k])) for k, fmt in COLUMNS]
                    + [f"{m.tokens_per_s_per_gpu / base:.2f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


def to_json(measurements: List[Measurement]) -> str:
    return json.dumps([dataclasses.asdict(m) for m in measurements], indent=2)


@dataclass
class SFTMeasurement:
    """One timed SFT configuration (packed or padded rows of the same chat data)."""

    name: str
    seq_length: int
    global_batch: int
    rows_per_epoch: int
    pack_efficiency: float
    step_time_s: float
    real_tokens_per_s: float
    real_tokens_per_s_per_gpu: float
    row_tokens_per_s: float
    loss: float


def run_sft(cfg: MegaphiConfig, rt, prefix: str, warmup: int, steps: int) -> SFTMeasurement:
    """Time ``steps`` SFT steps of the real trainer (``phase.name=sft``) on the chat dataset
    ``prefix`` after ``warmup`` untimed ones; ``data.packing`` decides packed or padded rows.
    Real tokens are the positions that hold a conversation token (padding excluded)."""
    from megatron.core import parallel_state as ps

    from megaphi.data.loader import build_loader
    from megaphi.data.packing import ChatSegments, PackedRows
    from megaphi.data.tokenizer import load_tokenizer
    from megaphi.model.builder import build_model
    from megaphi.model.init import initialize_weights
    from megaphi.phases.sft import SFTPhase
    from megaphi.training.metrics import MetricsWriter
    from megaphi.training.optim import build_optimizer, build_scheduler
    from megaphi.training.step import wrap_for_training
    from megaphi.training.trainer import Trainer

    tokenizer = load_tokenizer(cfg.data.tokenizer)
    t, seq = cfg.train, cfg.model.seq_length
    rows = PackedRows(ChatSegments(prefix, tokenizer, seq, cfg.data.overlong == "truncate"),
                      seq, seed=t.seed, num_samples=(warmup + steps) * t.global_batch_size,
                      packing=cfg.data.packing, pad_id=tokenizer.pad_id)
    loader = iter(build_loader(rows, 0, t.micro_batch_size, ps.get_data_parallel_rank(), rt.dp,
                               num_workers=cfg.data.num_workers))
    chunks = build_model(cfg)
    initialize_weights(chunks, cfg.model, seed=t.seed)
    chunks = wrap_for_training(chunks, distributed_optimizer=cfg.optimizer.distributed)
    optimizer = build_optimizer(cfg, chunks)
    trainer = Trainer(cfg, rt, chunks, optimizer, build_scheduler(cfg, optimizer),
                      MetricsWriter("", False, enabled=False), SFTPhase(cfg))
    batches = [[trainer._to_device(next(loader)) for _ in range(trainer.num_microbatches)]
               for _ in range(warmup + steps)]  # loaded up front: the loop times steps only
    try:
        for micro in batches[:warmup]:
            trainer.step(micro)
        _sync(rt.device)
        start, real = time.perf_counter(), 0
        for micro in batches[warmup:]:
            result = trainer.step(micro)
            real += result.data_tokens
        _sync(rt.device)
        elapsed = time.perf_counter() - start
    finally:
        trainer.preemption.restore()
    del trainer, optimizer, chunks
    gc.collect()
    return SFTMeasurement(
        name="packed" if cfg.data.packing else "padded", seq_length=seq,
        global_batch=t.global_batch_size, rows_per_epoch=rows.stats.rows,
        pack_efficiency=rows.stats.efficiency(seq), step_time_s=elapsed / steps,
        real_tokens_per_s=real / elapsed, real_tokens_per_s_per_gpu=real / elapsed / rt.world_size,
        row_tokens_per_s=steps * t.global_batch_size * seq / elapsed, loss=result.loss)
