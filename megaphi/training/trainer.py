"""The training loop shared by every phase.

:class:`Trainer` holds the loop (:mod:`megaphi.phases.run` assembles a run around it). One step
runs Megatron's pipeline schedule over the global batch (gradient accumulation over
micro-batches) with the phase's forward step, then one all-reduce shares the step's metrics,
whether loss and gradients are finite on every rank (a non-finite step is skipped and logged;
too many in a row stop the run) and any pre-emption signal; then the optimizer and the schedule
step.

Metrics are exact sums: each loss report is a ``[sum, count]`` pair per name, summed over
micro-batches and over the data- and context-parallel ranks of the last pipeline stage (tensor-
parallel ranks hold copies and contribute once), so the logged loss is the token-weighted mean
over the global batch, and signed values (DPO margins) reduce correctly.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional

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
    metrics: Dict[str, float]  # the phase's metrics (``loss`` first), reduced over the job
    grad_norm: Optional[float]
    skipped: bool
    signal: int = 0  # a pre-emption signal received by any rank before the step's reduction
    data_tokens: int = 0  # real (non-padding) tokens of the global batch

    @property
    def loss(self) -> float:
        return self.metrics["loss"]


class Trainer:
    """Runs training steps of one phase for one rank's model chunks."""

    def __init__(self, cfg: MegaphiConfig, rt: Runtime, chunks: List[torch.nn.Module], optimizer,
                 scheduler, writer, phase, state: Optional[TrainState] = None, save=None,
                 valid_batches=None):
        self.cfg, self.rt, self.chunks, self.phase = cfg, rt, chunks, phase
        self.optimizer, self.scheduler, self.writer = optimizer, scheduler, writer
        self.state = state or TrainState()
        self.save = save or (lambda: None)  # writes a checkpoint of the current state
        self.preemption = PreemptionSignal()
        self.valid_batches = valid_batches  # () -> a fresh iterator over the validation data
        self.num_microbatches = cfg.train.global_batch_size // (cfg.train.micro_batch_size * rt.dp)

    def _run_schedule(self, micro_batches: List[dict], forward_only: bool) -> List[dict]:
        from megaphi.training.step import forward_backward

        seq_length, micro_batch_size = self.phase.pipeline_shape(self.chunks)
        return forward_backward(self.chunks, micro_batches, len(micro_batches),
                                seq_length=seq_length, micro_batch_size=micro_batch_size,
                                forward_step_func=self.phase.forward_step,
                                forward_only=forward_only)

    def step(self, micro_batches: List[dict]) -> StepResult:
        """One optimizer step over the global batch (this rank's share of it)."""
        for chunk in self.chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = self._run_schedule(micro_batches, forward_only=False)
        metrics, finite, signal, tokens = self._reduce(reports, micro_batches)
        if not finite:
            return StepResult(metrics, grad_norm=None, skipped=True, signal=signal,
                              data_tokens=tokens)
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=self.cfg.train.global_batch_size)
        return StepResult(metrics, grad_norm=grad_norm, skipped=False, signal=signal,
                          data_tokens=tokens)

    def _reduce(self, reports: List[dict], micro_batches: List[dict], check_grads: bool = True):
        """The step's metrics (known on every rank), whether loss and gradients are finite
        everywhere, any pre-emption signal a rank has received, and the real tokens of the
        global batch: one SUM all-reduce over the job."""
        from megatron.core import parallel_state as ps

        keys, signals, device = self.phase.report_keys, PreemptionSignal.SIGNALS, self.rt.device
        n = 2 * len(keys)  # stats: [sum, count] per key, data tokens, bad, one flag per signal
        stats = torch.zeros(n + 2 + len(signals), dtype=torch.float64, device=device)
        local = torch.zeros(n, dtype=torch.float64, device=device)
        for report in reports:  # the last pipeline stage's micro-batches
            local += torch.cat([report[k].detach().to(device, torch.float64).reshape(2)
                                for k in keys])
        bad = ~torch.isfinite(local).all()  # tensors, not bools: no device sync per check
        if check_grads:
            for chunk in self.chunks:
                for buffer in chunk.buffers:
                    bad |= ~torch.isfinite(buffer.grad_data).all()
        tp_first = ps.get_tensor_model_parallel_rank() == 0
        if reports and tp_first:  # TP ranks hold copies of the same losses
            stats[:n] = torch.nan_to_num(local, nan=0.0, posinf=0.0, neginf=0.0)
        if micro_batches and tp_first and ps.get_pipeline_model_parallel_rank() == 0 and \
                ps.get_context_parallel_rank() == 0:  # one copy of each DP rank's rows
            stats[n] = torch.stack([torch.as_tensor(self.phase.data_tokens(b), device=device)
                                    for b in micro_batches]).sum()
        stats[n + 1] = bad.double()
        for i, sig in enumerate(signals):
            stats[n + 2 + i] = float(self.preemption.received == sig)
        dist.all_reduce(stats)
        stats = stats.cpu().tolist()
        totals = {k: (stats[2 * i], stats[2 * i + 1]) for i, k in enumerate(keys)}
        bad = stats[n + 1] > 0
        received = [sig for i, sig in enumerate(signals) if stats[n + 2 + i] > 0]
        metrics = self.phase.metrics(totals)
        if bad:
            metrics[keys[0]] = float("nan")
        return metrics, not bad, int(received[0]) if received else 0, int(stats[n])

    def evaluate(self, batches: Iterator[dict]) -> Dict[str, float]:
        """The phase's metrics over ``train.eval_iters`` micro-batches, forward only."""
        micro = [self._to_device(next(batches)) for _ in range(self.cfg.train.eval_iters)]
        with torch.no_grad():
            reports = self._run_schedule(micro, forward_only=True)
        return self._reduce(reports, micro, check_grads=False)[0]

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.rt.device, non_blocking=True) for k, v in batch.items()
                if k in self.phase.batch_keys}

    def train(self, batches: Iterator[dict], iters: int) -> TrainState:
        """Train until ``iters`` steps are done; returns the final state. Step time (and so
        throughput and MFU) counts loading and the step itself, not validation or saving."""
        cfg, st = self.cfg, self.state
        tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
        window_time, window_steps, window_tokens = 0.0, 0, 0
        while st.iteration < iters:
            start = time.perf_counter()
            micro = [self._to_device(next(batches)) for _ in range(self.num_microbatches)]
            result = self.step(micro)
            if self.rt.device.type == "cuda":
                torch.cuda.synchronize()
            window_time += time.perf_counter() - start
            window_steps += 1
            window_tokens += result.data_tokens
            st.iteration += 1
            st.consumed_samples += cfg.train.global_batch_size
            self._track_skips(result)
            if st.iteration % cfg.train.log_interval == 0 or st.iteration == iters:
                self.writer.log(st.iteration, self._metrics(
                    result, window_time / window_steps, tokens_per_step,
                    window_tokens / max(window_time, 1e-9)))
                window_time, window_steps, window_tokens = 0.0, 0, 0
            interval = cfg.train.eval_interval
            if interval and self.valid_batches and st.iteration % interval == 0:
                valid = self.evaluate(self.valid_batches())
                self.writer.log(st.iteration, {f"val_{k}": v for k, v in valid.items()},
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

    def _metrics(self, result: StepResult, step_time: float, tokens_per_step: int,
                 real_tokens_per_s: float) -> dict:
        from megaphi.model.arithmetic import peak_precision, step_throughput
        from megaphi.platform import device_name

        return {
            **result.metrics,
            "lr": self.scheduler.get_lr(self.optimizer.param_groups[0]),
            "grad_norm": None if result.grad_norm is None else float(result.grad_norm),
            "skipped": int(result.skipped),
            "step_time_s": step_time,
            **step_throughput(self.cfg.model, tokens_per_step, step_time, self.rt.world_size,
                              device_name(self.rt.device), peak_precision(self.cfg.precision)),
            "real_tokens_per_s": real_tokens_per_s,
            "memory_gb": _memory_gb(self.rt.device),
            "consumed_samples": self.state.consumed_samples,
        }


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30
