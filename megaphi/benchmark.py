"""Training throughput of megaphi, and of a Hugging Face baseline of the same shape.

:func:`run_megaphi` times full training steps of the real trainer (Megatron-Core's pipeline
schedule over the global batch, DDP reductions, the distributed optimizer step) on random token
ids after warm-up steps; :func:`run_hf` times the same steps of a ``transformers``
``Phi3ForCausalLM`` of the same shape (fp32 master weights with bf16 autocast, SDPA attention,
torch AdamW, optionally ``torch.compile``) in the same process. Model TFLOP/s use Megatron's
causal formula (:mod:`megaphi.model.arithmetic`) for both, so their ratio is a ratio of speeds.

``tools/benchmark_throughput.py`` is the command line; launch it with torchrun for several GPUs.

:func:`run_sft` times SFT steps on packed against padded rows of chat data
(``tools/benchmark_sft.py``); :func:`run_dpo` times DPO steps: token pairs in one forward pass
against two segments per pair, precomputed reference log-probs against a reference forward
every step, and packed against padded pairs (``tools/benchmark_dpo.py``).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from megaphi.config.schema import ConfigError, MegaphiConfig

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


# ---------------------------------------------------------------------------------------------
# DPO: token pairs in one forward pass, precomputed reference log-probs, packed pairs


@dataclass
class DPOMeasurement:
    """One timed DPO variant: training steps of the real trainer (phase ``dpo``)."""

    name: str  # one_segment, two_segments, precomputed, reference_forward, padded
    description: str
    seq_length: int
    global_batch: int  # rows per step
    pairs_per_epoch: int  # pairs that fit a row
    rows_per_epoch: int
    pack_efficiency: float  # real tokens / row tokens, over an epoch
    pairs_per_step: float  # mean over the timed steps
    step_time_s: float  # median of the timed steps (robust to other processes' load)
    pairs_per_s: float  # pairs per step / step time
    real_tokens_per_s: float  # non-padding positions (seq_ids >= 0) of the policy's rows
    row_tokens_per_s: float
    loss: float  # of the last timed step
    step_times_s: List[float]  # every timed step


@dataclass
class DPOResult:
    """The DPO variants timed side by side and the three comparisons drawn from them."""

    measurements: List[DPOMeasurement]
    token_pairs: int
    """Token pairs in comparison 1 (those whose two-segment layout fits a row too)."""
    token_pair_speedup: float
    """Pairs/s of token pairs as one segment each over the same pairs as two segments each."""
    token_logps_max_diff: float
    """Largest |difference| of a token pair's chosen or rejected log-prob between the two
    layouts (reference model, pairs seen in both; 0 when none was)."""
    token_logps_pairs_compared: int
    reference_step_ratio: float
    """Step time with a reference forward pass each step over the step with precomputed
    reference log-probs (same micro-batches)."""
    reference_pass_pairs_per_s: float
    """Forward-only speed of the reference pass that precomputes the log-probs (once a run)."""
    packing_speedup: float
    """Real tokens/s of packed pairs over padded pairs (one pair per row)."""

    def figures(self) -> dict:
        return dataclasses.asdict(self)


def token_pairs_kept(source, seq_length: int) -> np.ndarray:
    """Indices of the token pairs of the :class:`~megaphi.data.preference.PreferencePairs`
    ``source`` whose two-segment form (twice the context) fits a row of ``seq_length``.

    Raises:
        ConfigError: there is none."""
    from megaphi.data.preference import TOKEN

    token = source.kinds == TOKEN
    keep = np.flatnonzero(token & (2 * source.prompt_lengths <= seq_length)
                          & (source.prompt_lengths > 0))
    if not token.any():
        raise ConfigError("data", f"{source.prefix} holds no token pairs, which the first "
                          "comparison times", "pass a preference dataset with token pairs "
                          "(Pivotal Token Search output: prefix_ids, chosen_token_id, "
                          "rejected_token_id)")
    if not len(keep):
        raise ConfigError("model.seq_length", f"no token pair of {source.prefix} has a context "
                          f"of at most {seq_length // 2} tokens, so none fits a row of "
                          f"{seq_length} as two segments", "raise model.seq_length")
    return keep


def token_pair_datasets(prefix: str, out_prefix: str, seq_length: int) -> Tuple[str, str, int]:
    """The token pairs of the preference dataset ``prefix`` in two layouts, as two datasets:
    ``OUT.one`` keeps them as token pairs (one attention segment each: the context, whose last
    position gives both next-token log-probs) and ``OUT.two`` writes each as a full-length pair
    whose chosen and rejected responses are the single tokens (two segments, context + token
    each: what a row per response computes). Only pairs whose two-segment form fits a row of
    ``seq_length`` are kept, so both hold the same pairs in the same order (pair ``k`` of one
    is pair ``k`` of the other). Returns the two prefixes and the number of pairs."""
    from megaphi.data.preference import PreferencePairs
    from megaphi.data.preprocess import AtomicDataset

    source = PreferencePairs(prefix)
    keep = token_pairs_kept(source, seq_length)
    dtype = np.dtype(source.meta.get("dtype", "int32")).type  # the builder takes the type
    out = {}
    for layout in ("one", "two"):
        path, tokens = f"{out_prefix}.{layout}", 0
        with AtomicDataset(path, extra=True) as data:
            builder = data.builder(dtype)
            for i in keep.tolist():
                pair = source[i]
                if layout == "one":
                    seqs = [pair.context, [pair.chosen_id, pair.rejected_id]]
                else:
                    seqs = [pair.context, [pair.chosen_id], [pair.rejected_id]]
                builder.add_document(np.concatenate(seqs).astype(dtype), [len(s) for s in seqs])
                data.write_extra(b"{}\n")
                tokens += sum(len(s) for s in seqs)
            meta = {**source.meta, "documents": len(keep), "tokens": tokens, "pairs": len(keep),
                    "full_pairs": len(keep) if layout == "two" else 0,
                    "token_pairs": len(keep) if layout == "one" else 0, "skipped_lines": 0,
                    "inputs": [f"{prefix} (token pairs as {layout} segment"
                               f"{'s' if layout == 'two' else ''} each)"]}
            data.commit(meta)
        out[layout] = path
    return out["one"], out["two"], len(keep)


def _reference_logps(chunks, micro: List[dict], shape: Tuple[int, int]) -> List[dict]:
    """A forward-only pass of the reference ``chunks`` over the DPO micro-batches ``micro``
    (the phase's own collect pass: :func:`megaphi.phases.dpo.logps_loss`), writing each pair's
    reference log-probs into its row (``ref_chosen`` / ``ref_rejected``) in place. Returns the
    reports (rows of ``(pair_index, chosen, rejected)``; on the last pipeline stage only)."""
    from functools import partial

    from megaphi.phases.dpo import dpo_forward_step, logps_loss
    from megaphi.training.step import forward_backward

    with torch.no_grad():
        reports = forward_backward(chunks, micro, len(micro), seq_length=shape[0],
                                   micro_batch_size=shape[1],
                                   forward_step_func=partial(dpo_forward_step, logps_loss),
                                   forward_only=True)
        for batch, report in zip(micro, reports):
            used = batch["pair_index"] >= 0  # row slots in the order logps_loss reports them
            pairs = report["pairs"].to(batch["ref_chosen"].device)
            batch["ref_chosen"][used] = pairs[:, 1].to(batch["ref_chosen"].dtype)
            batch["ref_rejected"][used] = pairs[:, 2].to(batch["ref_rejected"].dtype)
    return reports


@dataclass
class _Variant:
    name: str
    description: str
    segments: object
    rows: object
    batches: List[List[dict]]
    reference_forward: bool = False
    times: List[float] = dataclasses.field(default_factory=list)
    pairs: float = 0.0
    tokens: int = 0
    loss: float = float("nan")


def run_dpo(cfg: MegaphiConfig, rt, prefix: str, warmup: int, steps: int,
            work_dir: str) -> DPOResult:
    """Time DPO steps of the real trainer (:class:`megaphi.phases.dpo.DPOPhase`'s forward step
    and loss, Megatron's schedule, DDP, the optimizer) for five variants at one config, their
    steps interleaved (one step of each in turn) so a change in the machine's load hits all
    alike:

    1. ``one_segment`` / ``two_segments``: the token pairs of ``prefix`` as megaphi lays them
       out (one segment per pair) and the same pairs as full pairs with one-token responses
       (two segments per pair, what a row per response computes), packed; pairs/s;
    2. ``precomputed`` / ``reference_forward``: the pairs of ``prefix`` packed, with the
       reference log-probs precomputed in the rows, and the same micro-batches with a
       forward-only pass of a second model instance (the reference) before each step;
    3. ``precomputed`` / ``padded``: packed rows against one pair per row; real tokens/s.

    The policy and the reference start from the same random weights (``train.seed``), as a
    DPO run starts the policy from its reference; every row carries its pairs' reference
    log-probs, computed before the timed loop by the reference's forward-only pass (the
    ``reference_forward`` variant recomputes them each step). ``work_dir`` (shared by the
    ranks) receives the two token-pair datasets. ``warmup`` untimed steps precede ``steps``
    timed ones per variant; a variant's step time is the median of its timed steps (robust to
    other processes' load), its pairs/s and real tokens/s the mean per step over that."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megaphi.data.loader import build_loader
    from megaphi.data.preference import PairSegments, PreferencePairs
    from megaphi.data.tokenizer import load_tokenizer
    from megaphi.model.builder import build_model
    from megaphi.model.init import initialize_weights
    from megaphi.phases.dpo import DPOPhase, pair_rows
    from megaphi.training.metrics import MetricsWriter
    from megaphi.training.optim import build_optimizer, build_scheduler
    from megaphi.training.step import wrap_for_training
    from megaphi.training.trainer import Trainer

    t, seq = cfg.train, cfg.model.seq_length
    phase = DPOPhase(cfg)  # refuses configs the phase refuses (cp > 1, data.overlong)
    pad_id = load_tokenizer(cfg.data.tokenizer).pad_id
    token_pairs_kept(PreferencePairs(prefix), seq)  # every rank refuses data without any
    if rt.is_main:
        logger.info("writing the token pairs of %s in both layouts to %s", prefix, work_dir)
        token_pair_datasets(prefix, str(Path(work_dir) / "token_pairs"), seq)
    dist.barrier()
    one, two = (str(Path(work_dir) / f"token_pairs.{k}") for k in ("one", "two"))

    policy = build_model(cfg)
    initialize_weights(policy, cfg.model, seed=t.seed)
    policy = wrap_for_training(policy, distributed_optimizer=cfg.optimizer.distributed)
    optimizer = build_optimizer(cfg, policy)
    trainer = Trainer(cfg, rt, policy, optimizer, build_scheduler(cfg, optimizer),
                      MetricsWriter("", False, enabled=False), phase)
    reference = build_model(cfg)
    initialize_weights(reference, cfg.model, seed=t.seed)
    for chunk in reference:
        chunk.eval()
        chunk.requires_grad_(False)
    shape = phase.pipeline_shape(policy)

    def variant(name, description, segments, packing, reference_forward=False, like=None):
        if like is not None:  # the same rows and micro-batches as another variant
            return _Variant(name, description, like.segments, like.rows, like.batches,
                            reference_forward)
        run = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, packing=packing))
        rows = pair_rows(run, segments, pad_id, num_samples=(warmup + steps) * t.global_batch_size)
        logger.info("%s: %s", name, rows.describe())
        loader = iter(build_loader(rows, 0, t.micro_batch_size, ps.get_data_parallel_rank(),
                                   rt.dp, num_workers=cfg.data.num_workers))
        batches = [[trainer._to_device(next(loader)) for _ in range(trainer.num_microbatches)]
                   for _ in range(warmup + steps)]  # loaded up front: the loop times steps only
        return _Variant(name, description, segments, rows, batches)

    try:
        token_one = variant("one_segment", "token pairs, one segment per pair (megaphi)",
                            PairSegments(one, seq), True)
        token_two = variant("two_segments", "token pairs, two segments per pair (two rows)",
                            PairSegments(two, seq), True)
        mixed = PairSegments(prefix, seq)
        packed = variant("precomputed", "pairs packed, reference log-probs precomputed "
                         "(megaphi)", mixed, True)
        with_ref = variant("reference_forward", "pairs packed, reference forward every step "
                           "(NeMo-RL)", mixed, True, reference_forward=True, like=packed)
        padded = variant("padded", "pairs padded, one per row, reference precomputed",
                         mixed, False)
        variants = [token_one, token_two, packed, with_ref, padded]

        # The precomputed reference log-probs of every row (megaphi's one forward-only pass).
        logps = {}
        pass_time, pass_pairs = 0.0, 0
        for v in (token_one, token_two, packed, padded):
            logger.info("%s: reference log-probs of %d steps' rows (forward only)", v.name,
                        len(v.batches))
            found = logps.setdefault(v.name, {})
            for micro in v.batches:
                _sync(rt.device)
                start = time.perf_counter()
                reports = _reference_logps(reference, micro, shape)
                _sync(rt.device)
                if v is packed:
                    pass_time += time.perf_counter() - start
                    pass_pairs += sum(int((b["pair_index"] >= 0).sum()) for b in micro)
                for report in reports:
                    for index, chosen, rejected in report["pairs"].tolist():
                        found[int(index)] = (chosen, rejected)
        common = sorted(set(logps["one_segment"]) & set(logps["two_segments"]))
        diff = max((abs(a - b) for k in common for a, b in zip(logps["one_segment"][k],
                                                               logps["two_segments"][k])),
                   default=0.0)
        check = torch.tensor([diff, float(len(common)), pass_time], dtype=torch.float64,
                             device=rt.device)
        dist.all_reduce(check, op=dist.ReduceOp.MAX)  # only last-stage ranks have reports
        diff, compared, pass_time = check.tolist()
        one_copy = ps.get_tensor_model_parallel_rank() == 0 and \
            ps.get_pipeline_model_parallel_rank() == 0  # each data-parallel rank's rows once
        pass_pairs = torch.tensor(float(pass_pairs if one_copy else 0), dtype=torch.float64,
                                  device=rt.device)
        dist.all_reduce(pass_pairs)
        pass_speed = pass_pairs.item() / max(pass_time, 1e-9)

        def one_step(v, micro):
            if v.reference_forward:
                _reference_logps(reference, micro, shape)
            return trainer.step(micro)

        for i in range(warmup):
            logger.info("warm-up step %d of %d of each variant", i + 1, warmup)
            for v in variants:
                one_step(v, v.batches[i])
        for i in range(warmup, warmup + steps):
            logger.info("timed step %d of %d of each variant", i - warmup + 1, steps)
            for v in variants:
                _sync(rt.device)
                start = time.perf_counter()
                result = one_step(v, v.batches[i])
                _sync(rt.device)
                v.times.append(time.perf_counter() - start)
                v.pairs += result.metrics["pairs"]
                v.tokens += result.data_tokens
                v.loss = result.loss
    finally:
        trainer.preemption.restore()

    out = []
    for v in variants:
        step_time = float(np.median(v.times))
        out.append(DPOMeasurement(
            name=v.name, description=v.description, seq_length=seq,
            global_batch=t.global_batch_size, pairs_per_epoch=len(v.segments.sizes),
            rows_per_epoch=v.rows.stats.rows, pack_efficiency=v.rows.stats.efficiency(seq),
            pairs_per_step=v.pairs / steps, step_time_s=step_time,
            pairs_per_s=v.pairs / steps / step_time,
            real_tokens_per_s=v.tokens / steps / step_time,
            row_tokens_per_s=t.global_batch_size * seq / step_time, loss=v.loss,
            step_times_s=v.times))
    by = {m.name: m for m in out}
    return DPOResult(
        measurements=out, token_pairs=by["one_segment"].pairs_per_epoch,
        token_pair_speedup=by["one_segment"].pairs_per_s / by["two_segments"].pairs_per_s,
        token_logps_max_diff=diff, token_logps_pairs_compared=int(compared),
        reference_step_ratio=by["reference_forward"].step_time_s / by["precomputed"].step_time_s,
        reference_pass_pairs_per_s=pass_speed,
        packing_speedup=by["precomputed"].real_tokens_per_s / by["padded"].real_tokens_per_s)
