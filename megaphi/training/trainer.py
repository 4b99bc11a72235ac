"""The training loop shared by every phase.

:func:`run_training` sets up the runtime, data, model, optimizer and schedule from a config and
trains; :class:`Trainer` holds the loop. One step runs Megatron's pipeline schedule over the
global batch (gradient accumulation over micro-batches), checks that the loss and gradients
are finite on every rank (a non-finite step is skipped and logged; too many in a row stop the
run), then steps the optimizer and the schedule.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import torch
import torch.distributed as dist

from megaphi.config.schema import MegaphiConfig
from megaphi.platform import Runtime

logger = logging.getLogger("megaphi.train")

MAX_SKIPPED_IN_A_ROW = 10


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclass
class TrainState:
    """Where the run is; saved in checkpoints so a resumed run continues exactly."""

    iteration: int = 0
    consumed_samples: int = 0
    skipped_in_a_row: int = 0
    skipped_total: int = 0


class PreemptionSignal:
    """Records SIGTERM / SIGUSR1 (SLURM pre-emption and time limits) so the loop can save a
    checkpoint at the end of the current step and exit cleanly."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: Optional[int] = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class StepResult:
    loss: float
    grad_norm: Optional[float]
    skipped: bool
    signal: int = 0  # a pre-emption signal received by any rank before the step's reduction


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()
            if k in ("tokens", "labels", "loss_mask", "position_ids")}


class Trainer:
    """Runs training steps for one rank's model chunks."""

    def __init__(self, cfg: MegaphiConfig, rt: Runtime, chunks: List[torch.nn.Module], optimizer,
                 scheduler, writer, state: Optional[TrainState] = None, save=None,
                 valid_batches=None):
        self.cfg, self.rt, self.chunks = cfg, rt, chunks
        self.optimizer, self.scheduler, self.writer = optimizer, scheduler, writer
        self.state = state or TrainState()
        self.save = save or (lambda: None)  # writes a checkpoint of the current state
        self.preemption = PreemptionSignal()
        self.valid_batches = valid_batches  # () -> a fresh iterator over the validation data
        self.num_microbatches = cfg.train.global_batch_size // (cfg.train.micro_batch_size * rt.dp)

    def step(self, micro_batches: List[dict]) -> StepResult:
        """One optimizer step over the global batch (this rank's share of it)."""
        from megaphi.training.step import forward_backward

        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = forward_backward(self.chunks, micro_batches, self.num_microbatches,
                                  seq_length=self.cfg.model.seq_length,
                                  micro_batch_size=self.cfg.train.micro_batch_size)
        loss, finite, signal = self._reduce_loss_and_check(losses)
        if not finite:
            return StepResult(loss=loss, grad_norm=None, skipped=True, signal=signal)
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=self.cfg.train.global_batch_size)
        return StepResult(loss=loss, grad_norm=grad_norm, skipped=False, signal=signal)

    def _reduce_loss_and_check(self, losses: List[dict], check_grads: bool = True):
        """The step's loss (mean over micro-batches and data-parallel replicas, known on every
        rank), whether loss and gradients are finite everywhere, and any pre-emption signal a
        rank has received (shared in the same collective, so pre-emption costs no extra sync)."""
        from megatron.core import parallel_state as ps

        stats = torch.zeros(3, dtype=torch.float64, device=self.rt.device)
        if losses:  # last pipeline stage
            stats[0] = torch.stack([x["lm loss"] for x in losses]).double().mean()
            dist.all_reduce(stats[:1], group=ps.get_data_parallel_group())
            stats[0] /= self.rt.dp
        bad = ~torch.isfinite(stats[0])
        if check_grads:
            for chunk in self.chunks:
                for buffer in chunk.buffers:
                    bad |= ~torch.isfinite(buffer.grad_data).all()
        stats[1] = bad.double()
        stats[2] = float(self.preemption.received or 0)
        stats[0] = torch.nan_to_num(stats[0], nan=0.0, posinf=0.0, neginf=0.0)
        # Max over ranks: the last stage's loss (>= 0; 0 elsewhere) and any rank's flags.
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        loss, bad, signal = stats.tolist()
        return (float("nan") if bad else loss), not bad, int(signal)

    def evaluate(self, batches: Iterator[dict]) -> float:
        """Mean loss over ``train.eval_iters`` micro-batches, forward only."""
        from megaphi.training.step import forward_backward

        micro = [_to_device(next(batches), self.rt.device) for _ in range(self.cfg.train.eval_iters)]
        losses = forward_backward(self.chunks, micro, len(micro),
                                  seq_length=self.cfg.model.seq_length,
                                  micro_batch_size=self.cfg.train.micro_batch_size,
                                  forward_only=True)
        return self._reduce_loss_and_check(losses, check_grads=False)[0]

    def train(self, batches: Iterator[dict], iters: int) -> TrainState:
        """Train until ``iters`` steps are done; returns the final state."""
        cfg, st = self.cfg, self.state
        tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
        window_start, window_steps = time.perf_counter(), 0
        while st.iteration < iters:
            micro = [_to_device(next(batches), self.rt.device) for _ in range(self.num_microbatches)]
            result = self.step(micro)
            st.iteration += 1
            st.consumed_samples += cfg.train.global_batch_size
            window_steps += 1
            self._track_skips(result)
            if st.iteration % cfg.train.log_interval == 0 or st.iteration == iters:
                if self.rt.device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - window_start
                self.writer.log(st.iteration, self._metrics(result, elapsed / window_steps,
                                                            tokens_per_step))
                window_start, window_steps = time.perf_counter(), 0
            interval = cfg.train.eval_interval
            if interval and self.valid_batches and st.iteration % interval == 0:
                self.writer.log(st.iteration, {"val_loss": self.evaluate(self.valid_batches())},
                                prefix="valid")
            if self._should_stop(iters, result.signal):
                break
        return st

    def _should_stop(self, iters: int, signal: int) -> bool:
        """Save when a checkpoint is due; stop after saving at an exit interval or on a
        pre-emption signal (received by any rank, as reduced with the step's loss)."""
        it, train, ckpt = self.state.iteration, self.cfg.train, self.cfg.checkpoint
        preempted = bool(signal) and it < iters
        exiting = preempted or (bool(train.exit_interval) and it % train.exit_interval == 0
                                and it < iters)
        if it == iters or exiting or (ckpt.interval and it % ckpt.interval == 0):
            self.save()
        if preempted:
            logger.warning("received signal %d: saved a checkpoint at step %d and exiting; "
                           "relaunch to resume", signal, it)
        elif exiting:
            logger.info("exit interval reached at step %d; resume by relaunching", it)
        return exiting

    def _track_skips(self, result: StepResult) -> None:
        st = self.state
        if not result.skipped:
            st.skipped_in_a_row = 0
            return
        st.skipped_in_a_row += 1
        st.skipped_total += 1
        logger.warning("step %d skipped: non-finite loss or gradient (%d in a row)",
                       st.iteration, st.skipped_in_a_row)
        if st.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise NonFiniteError(
                f"{st.skipped_in_a_row} consecutive steps had a non-finite loss or gradient "
                f"(last at step {st.iteration}); lower optimizer.lr, check the data, or resume "
                "from an earlier checkpoint")

    def _metrics(self, result: StepResult, step_time: float, tokens_per_step: int) -> dict:
        from megaphi.model.arithmetic import peak_precision, step_throughput
        from megaphi.platform import device_name

        return {
            "loss": result.loss,
            "lr": self.scheduler.get_lr(self.optimizer.param_groups[0]),
            "grad_norm": None if result.grad_norm is None else float(result.grad_norm),
            "skipped": int(result.skipped),
            "step_time_s": step_time,
            **step_throughput(self.cfg.model, tokens_per_step, step_time, self.rt.world_size,
                              device_name(self.rt.device), peak_precision(self.cfg.precision)),
            "memory_gb": _memory_gb(self.rt.device),
            "consumed_samples": self.state.consumed_samples,
        }


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def load_run_mixture(cfg: MegaphiConfig):
    """The run's data mixture, validated (files exist) before any process group is set up."""
    from megaphi.config.schema import ConfigError
    from megaphi.data.mixture import load_mixture

    if cfg.data.mixture is None:
        raise ConfigError("data.mixture", "no training data given",
                          "set data.mixture to a mixture YAML file (see examples/)")
    mixture = load_mixture(cfg.data.mixture)
    if cfg.train.eval_interval and not mixture.sources("valid"):
        raise ConfigError("train.eval_interval",
                          f"validation every {cfg.train.eval_interval} steps needs a 'valid:' "
                          f"blend in the mixture {cfg.data.mixture}",
                          "add a valid: section to the mixture or set train.eval_interval=0")
    return mixture


def data_iterators(cfg: MegaphiConfig, rt: Runtime, mixture, consumed_samples: int):
    """This rank's endless training micro-batches from the run's mixture, and (when validation
    is on) a function returning a fresh iterator over the validation micro-batches."""
    from megatron.core import parallel_state as ps

    from megaphi.data.datasets import build_gpt_datasets
    from megaphi.data.loader import build_loader
    from megaphi.data.tokenizer import load_tokenizer

    t = cfg.train
    valid_samples = t.eval_iters * t.micro_batch_size * rt.dp if t.eval_interval else 0
    cache = cfg.data.cache_dir or str(Path(t.run_dir) / "data_cache")
    train, valid, _ = build_gpt_datasets(
        mixture, load_tokenizer(cfg.data.tokenizer), seq_length=cfg.model.seq_length,
        seed=t.seed, samples=[t.iters * t.global_batch_size, valid_samples, 0],
        cache_dir=cache, model_vocab_size=cfg.model.vocab_size)
    dp_rank = ps.get_data_parallel_rank()
    loader = build_loader(train, consumed_samples, t.micro_batch_size, dp_rank, rt.dp,
                          num_workers=cfg.data.num_workers)
    if valid is None:
        return iter(loader), None
    return iter(loader), lambda: iter(build_loader(valid, 0, t.micro_batch_size, dp_rank, rt.dp,
                                                   num_workers=0))


def check_batch_layout(cfg: MegaphiConfig, dp: int) -> None:
    """The global batch must split into whole micro-batches on every data-parallel rank."""
    from megaphi.config.schema import ConfigError

    per_step = cfg.train.micro_batch_size * dp
    if cfg.train.global_batch_size % per_step:
        raise ConfigError("train.global_batch_size",
                          f"{cfg.train.global_batch_size} is not a multiple of micro_batch_size x "
                          f"data-parallel size = {cfg.train.micro_batch_size} x {dp}",
                          f"use a multiple of {per_step}")


def run_training(cfg: MegaphiConfig) -> TrainState:
    """Set up the runtime, data, model, optimizer and schedule from ``cfg`` and train."""
    from megaphi.config.loader import to_yaml
    from megaphi.model.arithmetic import parameter_counts
    from megaphi.model.builder import build_model
    from megaphi.model.init import initialize_weights
    from megaphi.platform import init_runtime, shutdown_runtime
    from megaphi.training.metrics import MetricsWriter
    from megaphi.training.checkpoint import (
        checkpoints_root,
        latest_checkpoint,
        load_checkpoint,
        save_checkpoint,
    )
    from megaphi.training.optim import build_optimizer, build_scheduler
    from megaphi.training.step import wrap_for_training

    from megaphi.training.warm_start import prepare_warm_start, warm_start

    mixture = load_run_mixture(cfg)
    start_from = prepare_warm_start(cfg)  # checked before any process group is set up
    rt = init_runtime(cfg.parallel, seed=cfg.train.seed)
    writer = None
    try:
        check_batch_layout(cfg, rt.dp)
        run_dir = Path(cfg.train.run_dir)
        if rt.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(to_yaml(cfg))
        chunks = build_model(cfg)
        initialize_weights(chunks, cfg.model, seed=cfg.train.seed)
        counts = parameter_counts(cfg.model)
        logger.info("model: %s parameters (%s non-embedding), layout tp=%d pp=%d dp=%d",
                    f"{counts.total:,}", f"{counts.non_embedding:,}", rt.tp, rt.pp, rt.dp)
        chunks = wrap_for_training(chunks, distributed_optimizer=cfg.optimizer.distributed)
        optimizer = build_optimizer(cfg, chunks)
        scheduler = build_scheduler(cfg, optimizer)
        layout = {"tp": rt.tp, "pp": rt.pp, "vpp": rt.vpp, "dp": rt.dp}
        state = TrainState()
        resume = latest_checkpoint(checkpoints_root(str(run_dir)))
        if resume is not None:
            saved = load_checkpoint(resume, chunks, optimizer, scheduler, layout)
            state = TrainState(**saved)
            logger.info("resumed from %s at step %d (%d samples consumed)", resume,
                        state.iteration, state.consumed_samples)
            if start_from is not None:
                logger.info("checkpoint.load (%s) is not used: this run resumes from its own "
                            "checkpoint", start_from)
        elif start_from is not None:
            warm_start(start_from, cfg, chunks, optimizer, scheduler, layout)
        batches, valid_batches = data_iterators(cfg, rt, mixture, state.consumed_samples)
        writer = MetricsWriter(str(run_dir), cfg.logging.tensorboard, enabled=rt.is_main,
                               resume_step=None if resume is None else state.iteration)

        def save():
            save_checkpoint(str(run_dir), chunks, optimizer, scheduler, trainer.state,
                            cfg.to_dict(), layout, cfg.checkpoint.keep_last)

        trainer = Trainer(cfg, rt, chunks, optimizer, scheduler, writer, state, save=save,
                          valid_batches=valid_batches)
        try:
            state = trainer.train(batches, cfg.train.iters)
        finally:
            trainer.preemption.restore()
        logger.info("%s at step %d of %d (%d skipped); run directory: %s",
                    "finished" if state.iteration >= cfg.train.iters else "stopped",
                    state.iteration, cfg.train.iters, state.skipped_total, run_dir)
        return state
    finally:
        if writer is not None:
            writer.close()
        shutdown_runtime()
