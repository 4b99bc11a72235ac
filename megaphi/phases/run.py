"""Assemble a training run around a phase: data, runtime, model, optimizer, schedule, resume,
then the loop (:class:`megaphi.training.trainer.Trainer`).

:func:`run_training` is what ``megaphi-train`` calls. Everything that can be checked without
process groups is checked first (the mixture, the kind of its datasets, the starting
checkpoint), so a bad config fails in a second with one message naming the field.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from megaphi.config.schema import ConfigError, MegaphiConfig
from megaphi.phases import Phase, get_phase
from megaphi.platform import Runtime

logger = logging.getLogger("megaphi.train")

# The fields Megatron's scheduler takes from a checkpoint when a run resumes
# (use_checkpoint_opt_param_scheduler): (section, field).
SCHEDULE_FIELDS = (("optimizer", "lr"), ("optimizer", "min_lr"), ("optimizer", "weight_decay"),
                   ("schedule", "style"), ("schedule", "warmup_iters"),
                   ("schedule", "decay_iters"))


def load_run_mixture(cfg: MegaphiConfig, phase: Phase):
    """The run's data mixture, validated (files exist, datasets of the phase's kind) before
    any process group is set up."""
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
    phase.check_data(mixture)
    from megaphi.data.datasets import check_datasets_tokenizer
    from megaphi.data.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(cfg.data.tokenizer)
    except ValueError as exc:
        raise ConfigError("data.tokenizer", str(exc), "fix data.tokenizer") from None
    check_datasets_tokenizer(mixture.all_prefixes(), tokenizer, cfg.model.vocab_size)
    return mixture


def data_iterators(cfg: MegaphiConfig, rt: Runtime, phase: Phase, mixture,
                   consumed_samples: int):
    """This rank's endless training micro-batches, and (when validation is on) a function
    returning a fresh iterator over the validation micro-batches."""
    from megatron.core import parallel_state as ps

    from megaphi.data.loader import build_loader
    from megaphi.data.tokenizer import load_tokenizer
    from megaphi.phases.lm import default_cache_dir

    t = cfg.train
    valid_samples = t.eval_iters * t.micro_batch_size * rt.dp if t.eval_interval else 0
    train, valid = phase.build_datasets(load_tokenizer(cfg.data.tokenizer), mixture,
                                        [t.iters * t.global_batch_size, valid_samples],
                                        default_cache_dir(cfg))
    dp_rank = ps.get_data_parallel_rank()
    loader = build_loader(train, consumed_samples, t.micro_batch_size, dp_rank, rt.dp,
                          num_workers=cfg.data.num_workers)
    if valid is None:
        return iter(loader), None
    return iter(loader), lambda: iter(build_loader(valid, 0, t.micro_batch_size, dp_rank, rt.dp,
                                                   num_workers=0))


def check_batch_layout(cfg: MegaphiConfig, dp: int) -> None:
    """The global batch must split into whole micro-batches on every data-parallel rank."""
    per_step = cfg.train.micro_batch_size * dp
    if cfg.train.global_batch_size % per_step:
        raise ConfigError("train.global_batch_size",
                          f"{cfg.train.global_batch_size} is not a multiple of micro_batch_size x "
                          f"data-parallel size = {cfg.train.micro_batch_size} x {dp}",
                          f"use a multiple of {per_step}")


def resumed_config(cfg: MegaphiConfig, saved: dict) -> MegaphiConfig:
    """The config a resumed run really follows: the LR schedule comes from the checkpoint
    (Megatron's scheduler state), so its fields take the saved values. Each value of ``cfg``
    that is ignored this way is logged as a warning."""
    changes = {}
    for section, name in SCHEDULE_FIELDS:
        old = saved.get(section, {}).get(name)
        new = getattr(getattr(cfg, section), name)
        if name == "decay_iters":  # unset means train.iters
            old = old if old is not None else saved.get("train", {}).get("iters")
            new = new if new is not None else cfg.train.iters
        if old is None or old == new:
            continue
        logger.warning("%s.%s=%s is ignored: this run resumes from its checkpoint, whose LR "
                       "schedule has %s.%s=%s (config.yaml records %s); start a new run with "
                       "checkpoint.load to change the schedule", section, name, new, section,
                       name, old, old)
        changes.setdefault(section, {})[name] = old
    for section, values in changes.items():
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section),
                                                                       **values)})
    return cfg


def _write_config(cfg: MegaphiConfig, run_dir: Path, rt: Runtime) -> None:
    from megaphi.config.loader import to_yaml

    if rt.is_main:
        tmp = run_dir / "config.yaml.tmp"
        tmp.write_text(to_yaml(cfg))
        tmp.replace(run_dir / "config.yaml")


def run_training(cfg: MegaphiConfig):
    """Set up the runtime, data, model, optimizer and schedule from ``cfg`` and train."""
    from megaphi.model.arithmetic import parameter_counts
    from megaphi.model.builder import build_model
    from megaphi.model.init import initialize_weights
    from megaphi.platform import init_runtime, shutdown_runtime
    from megaphi.training.checkpoint import (
        checkpoints_root,
        latest_checkpoint,
        load_checkpoint,
        prune_incomplete,
        read_meta,
        save_checkpoint,
    )
    from megaphi.training.metrics import MetricsWriter
    from megaphi.training.optim import build_optimizer, build_scheduler
    from megaphi.training.step import wrap_for_training
    from megaphi.training.trainer import Trainer, TrainState
    from megaphi.training.warm_start import prepare_warm_start, warm_start

    phase = get_phase(cfg)
    mixture = load_run_mixture(cfg, phase)
    start_from = prepare_warm_start(cfg)  # checked before any process group is set up
    rt = init_runtime(cfg.parallel, seed=cfg.train.seed)
    writer = None
    try:
        check_batch_layout(cfg, rt.dp)
        run_dir = Path(cfg.train.run_dir)
        root = checkpoints_root(str(run_dir))
        if rt.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            if root.is_dir():
                prune_incomplete(root)  # saves a killed attempt left unfinished
        chunks = build_model(cfg)
        initialize_weights(chunks, cfg.model, seed=cfg.train.seed)
        counts = parameter_counts(cfg.model)
        logger.info("phase %s; model: %s parameters (%s non-embedding), layout tp=%d pp=%d "
                    "cp=%d dp=%d", phase.name, f"{counts.total:,}", f"{counts.non_embedding:,}",
                    rt.tp, rt.pp, rt.cp, rt.dp)
        chunks = wrap_for_training(chunks, distributed_optimizer=cfg.optimizer.distributed)
        optimizer = build_optimizer(cfg, chunks)
        scheduler = build_scheduler(cfg, optimizer)
        layout = {"tp": rt.tp, "pp": rt.pp, "vpp": rt.vpp, "cp": rt.cp, "dp": rt.dp}
        phase.prepare(rt, chunks, layout)  # before the policy's weights are loaded
        state = TrainState()
        resume = latest_checkpoint(root)
        if resume is not None:
            saved = load_checkpoint(resume, chunks, optimizer, scheduler, layout)
            state = TrainState(**saved)
            logger.info("resumed from %s at step %d (%d samples consumed)", resume,
                        state.iteration, state.consumed_samples)
            cfg = resumed_config(cfg, read_meta(resume)["config"])
            if start_from is not None:
                logger.info("checkpoint.load (%s) is not used: this run resumes from its own "
                            "checkpoint", start_from)
        elif start_from is not None:
            warm_start(start_from, cfg, chunks, optimizer, scheduler, layout)
        _write_config(cfg, run_dir, rt)
        batches, valid_batches = data_iterators(cfg, rt, phase, mixture, state.consumed_samples)
        writer = MetricsWriter(str(run_dir), cfg.logging.tensorboard, enabled=rt.is_main,
                               resume_step=None if resume is None else state.iteration)

        def save():
            save_checkpoint(str(run_dir), chunks, optimizer, scheduler, trainer.state,
                            cfg.to_dict(), layout, cfg.checkpoint.keep_last)

        trainer = Trainer(cfg, rt, chunks, optimizer, scheduler, writer, phase, state, save=save,
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


def main_errors():
    """The exceptions ``megaphi-train`` reports as one error line."""
    from megaphi.data.mixture import MixtureError
    from megaphi.data.preprocess import PreprocessError
    from megaphi.training.checkpoint import CheckpointNotFound
    from megaphi.training.trainer import NonFiniteError

    return (ConfigError, MixtureError, NonFiniteError, CheckpointNotFound, PreprocessError)


__all__ = ["run_training", "load_run_mixture", "data_iterators", "check_batch_layout",
           "resumed_config", "main_errors"]
