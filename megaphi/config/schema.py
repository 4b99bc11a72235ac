"""The typed configuration of a megaphi run.

One frozen dataclass per section, composed into :class:`MegaphiConfig`. Every section validates
itself at construction and :class:`MegaphiConfig` checks what spans sections (heads against the
tensor-parallel size, layers against the pipeline size, ...). A config is never mutated after
validation: derive variants with :func:`dataclasses.replace`, which validates again.

Errors are :class:`ConfigError`, whose message names the dotted field (``parallel.tp``), what is
wrong with its value, and how to fix it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the field and the fix."""

    def __init__(self, field_name: str, problem: str, fix: str):
        self.field_name = field_name
        super().__init__(f"{field_name}: {problem}. Fix: {fix}")


def _require(cond: bool, field_name: str, problem: str, fix: str) -> None:
    if not cond:
        raise ConfigError(field_name, problem, fix)


def _positive(section: str, obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(value > 0, f"{section}.{name}", f"must be positive, got {value}",
                 f"set {section}.{name} to a value > 0")


@dataclass(frozen=True)
class ModelConfig:
    """The decoder architecture (Phi-4 / Phi-3 family: pre-norm, RMSNorm, SwiGLU, GQA, RoPE)."""

    num_layers: int
    """Number of transformer layers."""
    hidden_size: int
    """Model width."""
    ffn_hidden_size: int
    """Inner width of the SwiGLU MLP (each of gate and up has this many rows)."""
    num_attention_heads: int
    """Query heads."""
    num_kv_heads: int
    """Key/value heads (Megatron's ``num_query_groups``); must divide ``num_attention_heads``."""
    vocab_size: int = 100352
    """Rows of the embedding and output layer (the Phi-4 tokenizer's padded vocabulary)."""
    head_dim: Optional[int] = None
    """Per-head width (Megatron's ``kv_channels``); ``None`` means hidden_size / num_attention_heads."""
    seq_length: int = 4096
    """Training sequence length in tokens."""
    rotary_base: float = 10000.0
    """RoPE base (theta). Phi-4: 10,000 in pre-training, 250,000 after mid-training. Always taken
    from the run's config, never from a checkpoint it starts from."""
    rope_scaling: Literal["none", "linear", "yarn"] = "none"
    """How RoPE is stretched to a longer context on top of ``rotary_base``: ``none`` (the base
    alone decides, as in Phi-4's mid-training, which raises it to 250,000), ``linear`` (position
    interpolation: positions divided by ``rope_scaling_factor``) or ``yarn`` (YaRN: frequencies
    interpolated per dimension by ``rope_scaling_factor`` from ``rope_original_seq_length``,
    attention logits scaled by (0.1 ln factor + 1)^2)."""
    rope_scaling_factor: float = 1.0
    """Context extension factor of ``linear`` and ``yarn`` (e.g. 4.0 for 4K -> 16K)."""
    rope_original_seq_length: Optional[int] = None
    """``yarn`` only: the context the model was trained at before the extension (e.g. 4096)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of weight matrices."""
    tie_embeddings: bool = False
    """Share the input embedding with the output layer (Phi-4 does not)."""

    _section: ClassVar[str] = "model"

    def __post_init__(self):
        _positive("model", self, "num_layers", "hidden_size", "ffn_hidden_size",
                  "num_attention_heads", "num_kv_heads", "vocab_size", "seq_length",
                  "rotary_base", "norm_eps", "init_std")
        _require(self.num_attention_heads % self.num_kv_heads == 0, "model.num_kv_heads",
                 f"{self.num_kv_heads} KV heads do not divide {self.num_attention_heads} query heads",
                 "choose num_kv_heads that divides num_attention_heads")
        self._check_rope_scaling()
        if self.head_dim is None:
            _require(self.hidden_size % self.num_attention_heads == 0, "model.hidden_size",
                     f"{self.hidden_size} is not divisible by num_attention_heads="
                     f"{self.num_attention_heads}",
                     "make hidden_size a multiple of num_attention_heads or set model.head_dim")
        else:
            _positive("model", self, "head_dim")

    def _check_rope_scaling(self) -> None:
        if self.rope_scaling == "none":
            _require(self.rope_scaling_factor == 1.0, "model.rope_scaling_factor",
                     f"{self.rope_scaling_factor} has no effect with model.rope_scaling=none",
                     "set model.rope_scaling to linear or yarn, or leave the factor at 1.0")
            return
        _require(self.rope_scaling_factor > 1.0, "model.rope_scaling_factor",
                 f"{self.rope_scaling} RoPE scaling needs a factor > 1, got "
                 f"{self.rope_scaling_factor}", "set it to new context / old context, e.g. 4.0")
        if self.rope_scaling == "yarn":
            _require(self.rope_original_seq_length is not None
                     and self.rope_original_seq_length > 0, "model.rope_original_seq_length",
                     f"YaRN needs the pre-extension context length, got "
                     f"{self.rope_original_seq_length}", "set it to e.g. 4096")

    @property
    def kv_channels(self) -> int:
        """Per-head width, derived when not given."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class ParallelConfig:
    """The parallel layout. Data parallelism is derived: dp = world size / (tp * pp * cp)."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    vpp: Optional[int] = None
    """Virtual pipeline stages per pipeline rank (interleaved schedule); ``None`` disables it."""
    sequence_parallel: bool = False
    """Shard activations along the sequence in the non-tensor-parallel regions (needs tp > 1)."""
    cp: int = 1
    """Context-parallel size (splits the sequence across ranks in attention; GPU only)."""

    _section: ClassVar[str] = "parallel"

    def __post_init__(self):
        _positive("parallel", self, "tp", "pp", "cp")
        if self.vpp is not None:
            _require(self.vpp >= 1, "parallel.vpp", f"must be >= 1 or null, got {self.vpp}",
                     "set parallel.vpp=null to disable interleaving")
            _require(self.vpp == 1 or self.pp > 1, "parallel.vpp",
                     f"virtual pipeline stages (vpp={self.vpp}) need pipeline parallelism, but pp=1",
                     "set parallel.pp > 1 or parallel.vpp=null")
        _require(not self.sequence_parallel or self.tp > 1, "parallel.sequence_parallel",
                 "sequence parallelism shards along the tensor-parallel group, but tp=1",
                 "set parallel.tp > 1 or parallel.sequence_parallel=false")

    @property
    def model_parallel_size(self) -> int:
        """Ranks that hold one copy of the model: tp * pp * cp."""
        return self.tp * self.pp * self.cp


@dataclass(frozen=True)
class FP8Config:
    """FP8 training with Transformer Engine (GPU, TE layer spec only)."""

    recipe: Optional[Literal["delayed", "current", "blockwise"]] = None
    """``None`` disables FP8; ``delayed`` (amax history), ``current`` (per-tensor current
    scaling, Megatron's ``tensorwise``) or ``blockwise`` (needs a TE version that supports it)."""
    format: Literal["hybrid", "e4m3"] = "hybrid"
    """``hybrid``: E4M3 forward, E5M2 gradients; ``e4m3``: E4M3 everywhere."""
    amax_history_len: int = 1024
    """Length of the amax history (delayed scaling only)."""
    amax_compute_algo: Literal["max", "most_recent"] = "max"
    """How the scale is chosen from the amax history (delayed scaling only)."""
    margin: int = 0
    """Scaling-factor margin in powers of two."""

    _section: ClassVar[str] = "precision.fp8"

    def __post_init__(self):
        _positive("precision.fp8", self, "amax_history_len")
        _require(self.margin >= 0, "precision.fp8.margin", f"must be >= 0, got {self.margin}",
                 "set precision.fp8.margin to 0 or more")

    def megatron_fields(self) -> dict:
        """The ``TransformerConfig`` fields this recipe sets (empty when FP8 is off)."""
        if self.recipe is None:
            return {}
        return {
            "fp8": self.format,
            "fp8_recipe": {"delayed": "delayed", "current": "tensorwise",
                           "blockwise": "blockwise"}[self.recipe],
            "fp8_margin": self.margin,
            "fp8_amax_history_len": self.amax_history_len,
            "fp8_amax_compute_algo": self.amax_compute_algo,
        }


@dataclass(frozen=True)
class PrecisionConfig:
    """Numerical precision of parameters, activations and matmuls."""

    dtype: Literal["fp32", "bf16"] = "bf16"
    """Compute dtype: ``bf16`` mixed precision (fp32 master weights) or plain ``fp32``."""
    fp8: FP8Config = field(default_factory=FP8Config)
    """FP8 recipe on top of bf16 (Transformer Engine on Hopper or newer)."""

    _section: ClassVar[str] = "precision"

    def __post_init__(self):
        _require(self.fp8.recipe is None or self.dtype == "bf16", "precision.fp8.recipe",
                 f"FP8 runs on top of bf16 mixed precision, but precision.dtype={self.dtype}",
                 "set precision.dtype=bf16 or precision.fp8.recipe=null")


@dataclass(frozen=True)
class TrainConfig:
    """The run: length, batch sizes, seed and where it writes."""

    iters: int = 1000
    """Optimizer steps to train for."""
    micro_batch_size: int = 1
    """Sequences per micro-batch per data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all data-parallel ranks (with gradient accumulation)."""
    seed: int = 1234
    """Seed of the weight initialisation, dropout and data order."""
    run_dir: str = "runs/default"
    """Directory for the resolved config, metrics, TensorBoard logs and checkpoints."""
    log_interval: int = 10
    """Log metrics every this many steps."""
    eval_interval: int = 0
    """Compute validation loss every this many steps (0: never)."""
    eval_iters: int = 10
    """Micro-batches per validation."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation: ``none`` (fastest; enough memory for Phi-4 at tp=2 x pp=4,
    micro batch 1, 4K, and at 16K with cp=2), ``selective`` (recompute the attention core only:
    little extra compute, saves the score memory of non-flash attention) or ``full`` (recompute
    each layer from its input in the backward pass: ~1/3 more compute, least memory)."""
    exit_interval: Optional[int] = None
    """Save a checkpoint and exit when the step count is a multiple of this (for jobs shorter
    than the run); resuming continues the same schedule."""

    _section: ClassVar[str] = "train"

    def __post_init__(self):
        _positive("train", self, "iters", "micro_batch_size", "global_batch_size", "log_interval",
                  "eval_iters")
        _require(self.eval_interval >= 0, "train.eval_interval",
                 f"must be >= 0, got {self.eval_interval}", "use 0 to disable validation")
        _require(self.global_batch_size % self.micro_batch_size == 0, "train.global_batch_size",
                 f"{self.global_batch_size} is not a multiple of train.micro_batch_size="
                 f"{self.micro_batch_size}", "make the global batch a multiple of the micro batch")


@dataclass(frozen=True)
class DataConfig:
    """Training data: a weighted mixture of Megatron indexed datasets."""

    mixture: Optional[str] = None
    """Path of a mixture YAML file (sources, weights, dataset prefixes)."""
    tokenizer: str = "phi4"
    """``phi4`` (cl100k_base ranks plus the Phi-4 special tokens) or a Hugging Face tokenizer dir."""
    cache_dir: Optional[str] = None
    """Where dataset index caches are written (default: under the run directory)."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    packing: bool = True
    """Chat data (SFT) and preference pairs (DPO): pack whole conversations (pairs) into rows of
    ``model.seq_length`` tokens, with attention kept inside each sequence and positions
    restarting at 0 for each. ``false`` puts one conversation (pair) per row, padded (for
    comparison; much slower)."""
    overlong: Literal["drop", "truncate"] = "drop"
    """Chat data (SFT): what to do with a conversation longer than ``model.seq_length``:
    ``drop`` it (counted in the log) or ``truncate`` it to the row."""

    _section: ClassVar[str] = "data"

    def __post_init__(self):
        _require(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}",
                 "set data.num_workers to 0 or more")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with decoupled weight decay (norms and biases excluded) and gradient clipping."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clipping threshold (0 disables clipping)."""
    distributed: bool = True
    """Shard optimizer state over data-parallel ranks (Megatron's distributed optimizer)."""

    _section: ClassVar[str] = "optimizer"

    def __post_init__(self):
        _positive("optimizer", self, "lr", "adam_eps")
        for name in ("min_lr", "weight_decay", "clip_grad"):
            _require(getattr(self, name) >= 0, f"optimizer.{name}",
                     f"must be >= 0, got {getattr(self, name)}", f"set optimizer.{name} >= 0")
        _require(self.min_lr <= self.lr, "optimizer.min_lr",
                 f"{self.min_lr} exceeds the peak optimizer.lr={self.lr}", "set min_lr <= lr")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            _require(0.0 <= value < 1.0, f"optimizer.{name}", f"must be in [0, 1), got {value}",
                     f"set optimizer.{name} in [0, 1)")


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning-rate schedule: warm-up, then decay to ``optimizer.min_lr``."""

    style: Literal["linear", "cosine", "wsd"] = "linear"
    """``linear`` warm-up and linear decay (Phi-4), ``cosine``, or warmup-stable-decay."""
    warmup_iters: int = 0
    """Steps of linear warm-up from 0 to the peak LR."""
    decay_iters: Optional[int] = None
    """Steps over which to decay (default: train.iters). For ``wsd``, the length of the final decay."""

    _section: ClassVar[str] = "schedule"

    def __post_init__(self):
        _require(self.warmup_iters >= 0, "schedule.warmup_iters",
                 f"must be >= 0, got {self.warmup_iters}", "set schedule.warmup_iters >= 0")
        if self.decay_iters is not None:
            _positive("schedule", self, "decay_iters")


@dataclass(frozen=True)
class CheckpointConfig:
    """Distributed checkpoints under ``<run_dir>/checkpoints``."""

    interval: int = 0
    """Save every this many steps (0: only at the end and on pre-emption signals)."""
    keep_last: int = 3
    """Keep this many most recent checkpoints (0: keep all)."""
    load: Optional[str] = None
    """Checkpoint to start a new run from (a run directory, its ``checkpoints`` directory or
    one ``iter_*`` directory): its model weights (and, with ``load_optimizer``, its optimizer
    state) initialise this run, whose schedule and step count start at 0. Used only when the
    run has no checkpoint of its own: resuming from ``<run_dir>/checkpoints/latest`` is
    automatic and takes precedence."""
    load_optimizer: bool = False
    """Also take the optimizer state (Adam moments) from ``checkpoint.load``."""

    _section: ClassVar[str] = "checkpoint"

    def __post_init__(self):
        for name in ("interval", "keep_last"):
            _require(getattr(self, name) >= 0, f"checkpoint.{name}",
                     f"must be >= 0, got {getattr(self, name)}", f"set checkpoint.{name} >= 0")


@dataclass(frozen=True)
class LoggingConfig:
    """Where metrics go besides the console and ``metrics.jsonl``."""

    tensorboard: bool = True
    """Write TensorBoard event files under ``<run_dir>/tensorboard``."""
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Log level of the ``megaphi`` loggers."""

    _section: ClassVar[str] = "logging"


@dataclass(frozen=True)
class PhaseConfig:
    """Which stage of the recipe this run is; the phase decides the dataset and the loss."""

    name: Literal["pretrain", "midtrain", "sft", "dpo"] = "pretrain"
    """``pretrain`` and ``midtrain``: next-token loss on every token of text datasets. ``sft``:
    loss on the assistant tokens of chat datasets, packed. ``dpo``: preference pairs. Every
    phase but ``pretrain`` continues a checkpoint (``checkpoint.load``)."""

    CONTINUES: ClassVar[dict] = {
        "midtrain": "mid-training continues a pre-training checkpoint",
        "sft": "SFT fine-tunes a pre-trained (or mid-trained) checkpoint",
        "dpo": "DPO starts from an SFT checkpoint (the policy, and by default the reference)",
    }

    _section: ClassVar[str] = "phase"


@dataclass(frozen=True)
class DPOConfig:
    """Direct Preference Optimization (``phase.name=dpo``) on preference pairs.

    Per pair, with summed (or, with ``average_logps``, per-token averaged) response log-probs
    of the policy ``pi`` and the reference ``ref``: ``z = (pi_c - ref_c) - (pi_r - ref_r)``;
    ``sigmoid`` minimises ``-(1 - eps) log s(beta z) - eps log s(-beta z)`` (DPO, and cDPO
    with ``label_smoothing`` eps), ``ipo`` minimises ``(z - 1 / (2 beta))^2``. The loss is the
    mean over the pairs of the global batch. Phi-4's report leaves beta, the LR and the epochs
    unstated; beta=0.1 is TRL's default and the cDPO/DPO papers' value."""

    beta: float = 0.1
    """The DPO temperature beta (IPO's tau); rewards are ``beta * (pi - ref)``."""
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    """``sigmoid``: DPO (cDPO with ``label_smoothing`` > 0). ``ipo``: IPO's squared loss (use
    ``average_logps=true`` for the IPO paper's and TRL's per-token form)."""
    label_smoothing: float = 0.0
    """cDPO: the assumed probability that a pair's preference is flipped, in [0, 0.5)."""
    sft_weight: float = 0.0
    """Weight of an NLL term on the chosen responses (RPO): ``sft_weight`` times the per-token
    mean negative log-likelihood of each chosen response, averaged over pairs."""
    average_logps: bool = False
    """Average the response log-probs over its tokens instead of summing them."""
    reference: Optional[str] = None
    """The reference model: a run directory, its ``checkpoints/`` or an ``iter_*`` directory.
    Default: the starting checkpoint (``checkpoint.load``). Its log-probs are computed once,
    before the first step, and stored in ``<run_dir>/reference_logps.npz``."""

    _section: ClassVar[str] = "dpo"

    def __post_init__(self):
        _positive("dpo", self, "beta")
        _require(0.0 <= self.label_smoothing < 0.5, "dpo.label_smoothing",
                 f"must be in [0, 0.5), got {self.label_smoothing}",
                 "use 0 for DPO or a small flip probability such as 0.1 for cDPO")
        _require(self.label_smoothing == 0.0 or self.loss == "sigmoid", "dpo.label_smoothing",
                 f"label smoothing (cDPO) applies to the sigmoid loss, not dpo.loss={self.loss}",
                 "set dpo.label_smoothing=0 or dpo.loss=sigmoid")
        _require(self.sft_weight >= 0.0, "dpo.sft_weight", f"must be >= 0, got {self.sft_weight}",
                 "set dpo.sft_weight to 0 (off) or a positive weight such as 1.0")


@dataclass(frozen=True)
class MegaphiConfig:
    """A complete, validated run configuration."""

    model: ModelConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    phase: PhaseConfig = field(default_factory=PhaseConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)

    def __post_init__(self):
        self._check_layout()
        self._check_schedule()
        continues = PhaseConfig.CONTINUES.get(self.phase.name)
        _require(continues is None or self.checkpoint.load is not None, "checkpoint.load",
                 f"phase.name={self.phase.name}: {continues}, but none is given",
                 "set checkpoint.load to the previous phase's run directory (or its "
                 "checkpoints/ or an iter_* directory)")
        _require(self.checkpoint.load is not None or not self.checkpoint.load_optimizer,
                 "checkpoint.load_optimizer", "there is no checkpoint.load to take it from",
                 "set checkpoint.load or checkpoint.load_optimizer=false")

    def _check_schedule(self) -> None:
        s, iters = self.schedule, self.train.iters
        decay = s.decay_iters or iters
        if s.style == "wsd":
            _require(s.warmup_iters + decay <= iters, "schedule.decay_iters",
                     f"warm-up ({s.warmup_iters}) plus the final decay ({decay}) exceed "
                     f"train.iters={iters}", "shorten schedule.warmup_iters or schedule.decay_iters")
        else:
            _require(s.warmup_iters < decay, "schedule.warmup_iters",
                     f"warm-up of {s.warmup_iters} steps leaves nothing of the {decay}-step decay "
                     "(schedule.decay_iters, default train.iters)",
                     "make schedule.warmup_iters smaller than the decay length")

    def _check_layout(self) -> None:
        m, p = self.model, self.parallel
        _require(m.num_attention_heads % p.tp == 0, "parallel.tp",
                 f"{m.num_attention_heads} attention heads cannot be split over tp={p.tp}",
                 f"choose tp among the divisors of {m.num_attention_heads}: "
                 f"{_divisors(m.num_attention_heads)}")
        kv = m.num_kv_heads
        if not (kv % p.tp == 0 or p.tp % kv == 0):
            multiples = [t for t in range(2 * kv, m.num_attention_heads + 1, kv)
                         if m.num_attention_heads % t == 0]
            also = f", or a multiple of {kv} dividing the heads: {multiples}" if multiples else ""
            raise ConfigError(
                "parallel.tp",
                f"Megatron-Core needs the {kv} KV heads (model.num_kv_heads) to be a multiple or a "
                f"divisor of tp, and tp={p.tp} is neither",
                f"use tp in {_divisors(kv)}{also} (for 8-GPU nodes: tp=2 with pipeline parallelism)")
        if m.vocab_size % p.tp:
            padded = -(-m.vocab_size // (128 * p.tp)) * 128 * p.tp
            raise ConfigError(
                "model.vocab_size",
                f"the output layer splits the {m.vocab_size}-row vocabulary over tp={p.tp}, which "
                "does not divide it", f"pad model.vocab_size to {padded} (a multiple of 128*tp; the "
                "tokenizer never produces the extra ids) or choose a tp that divides it")
        stages = p.pp * (p.vpp or 1)
        _require(m.num_layers % stages == 0, "parallel.pp",
                 f"{m.num_layers} layers cannot be split evenly into pp={p.pp} x vpp={p.vpp or 1} "
                 f"= {stages} stages",
                 f"choose pp (x vpp) dividing {m.num_layers}: {_divisors(m.num_layers)}")
        if p.sequence_parallel:
            _require(m.seq_length % p.tp == 0, "model.seq_length",
                     f"sequence parallelism splits the {m.seq_length}-token sequence over tp={p.tp}, "
                     "which does not divide it", f"make model.seq_length a multiple of {p.tp}")
        if p.cp > 1:
            _require(m.seq_length % (2 * p.cp) == 0, "model.seq_length",
                     f"context parallelism needs the sequence length divisible by 2*cp={2 * p.cp}, "
                     f"got {m.seq_length}", f"make model.seq_length a multiple of {2 * p.cp}")

    def to_dict(self) -> dict:
        """Plain nested dict of every value (what ``config.yaml`` in a run directory holds)."""
        return dataclasses.asdict(self)


def _divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


SECTIONS = {f.name: f.type for f in dataclasses.fields(MegaphiConfig)}
