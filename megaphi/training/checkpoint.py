"""Distributed checkpoints: save, resume, and load into another parallel layout.

A checkpoint is ``<run_dir>/checkpoints/iter_NNNNNNN/``, written by every rank with
``megatron.core.dist_checkpointing``: the model and optimizer state as sharded tensors with
global shapes (so they load at any TP / PP / DP layout; the distributed optimizer state is saved in
Megatron's "fully reshardable" form, one canonical tensor per parameter), plus common state: the LR schedule,
the train state (iteration, consumed samples), the resolved config, and the megaphi and
Megatron-Core versions (``megaphi.json``). RNG states are saved per rank and restored when the
layout is unchanged.

Saving is atomic for readers: ``checkpoints/latest`` names the newest complete checkpoint and is
rewritten (temp file + rename) only after every rank finished writing, so a crash during a save
leaves ``latest`` on the previous checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

logger = logging.getLogger("megaphi.train")

LATEST = "latest"
META = "megaphi.json"  # written last: marks a complete checkpoint
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def checkpoints_root(run_dir: str) -> Path:
    return Path(run_dir) / "checkpoints"


def iteration_dir(root: Path, iteration: int) -> Path:
    return root / f"iter_{iteration:07d}"


class CheckpointNotFound(ValueError):
    """A path that is not a megaphi checkpoint; the message names the path and the fix."""


def latest_checkpoint(root: Path) -> Optional[Path]:
    """The checkpoint ``latest`` points at, or None when there is none."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    target = root / pointer.read_text().strip()
    if not (target / META).is_file():
        raise CheckpointNotFound(f"{pointer} names {target}, which is not a complete checkpoint; "
                                 "point it at an existing iter_* directory or delete it")
    return target


def resolve_checkpoint(path) -> Path:
    """The ``iter_*`` directory of a checkpoint given as that directory, a checkpoints directory
    (with a ``latest`` pointer) or a run directory (with ``checkpoints/latest``)."""
    path = Path(path)
    if (path / META).is_file():
        return path
    for root in (path, checkpoints_root(str(path))):
        target = latest_checkpoint(root)
        if target is not None:
            return target
    if not path.exists():
        raise CheckpointNotFound(f"checkpoint {path} does not exist; pass a run directory, its "
                                 "checkpoints/ directory or one iter_* directory")
    raise CheckpointNotFound(f"{path} is not a megaphi checkpoint (no {META}, no {LATEST} "
                             "pointer, no checkpoints/latest); pass a run directory, its "
                             "checkpoints/ directory or one complete iter_* directory")


def read_meta(iter_dir: Path) -> dict:
    """The ``megaphi.json`` of a checkpoint (iteration, layout, versions, resolved config)."""
    return json.loads((Path(iter_dir) / META).read_text())


def _sharded_state(chunks, optimizer, is_loading: bool) -> dict:
    from megatron.core.utils import unwrap_model

    state = {f"model{i}": chunk.sharded_state_dict()
             for i, chunk in enumerate(unwrap_model(list(chunks)))}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading,
                                                          metadata=_OPTIM_METADATA)
    return state


def _rng_object(layout: dict):
    """This rank's RNG states as a ShardedObject indexed by (pp rank, tp rank)."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    states = {"torch": torch.get_rng_state(),
              "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return ShardedObject("rng_state", states, (layout["pp"], layout["tp"]),
                         (ps.get_pipeline_model_parallel_rank(),
                          ps.get_tensor_model_parallel_rank()),
                         replica_id=ps.get_data_parallel_rank())


def save_checkpoint(run_dir: str, chunks, optimizer, scheduler, train_state, config_dict: dict,
                    layout: dict, keep_last: int) -> Path:
    """Save a checkpoint of every rank's state; collective over the whole job."""
    import megatron.core
    from megatron.core import dist_checkpointing

    import megaphi

    root = checkpoints_root(run_dir)
    target = iteration_dir(root, train_state.iteration)
    if dist.get_rank() == 0:
        if target.exists():  # a partial save of this iteration from a crashed run
            shutil.rmtree(target)
        target.mkdir(parents=True)
    dist.barrier()
    state = _sharded_state(chunks, optimizer, is_loading=False)
    state["rng_state"] = _rng_object(layout)
    state["scheduler"] = scheduler.state_dict()
    state["train_state"] = dataclasses.asdict(train_state)
    state["layout"] = layout
    dist_checkpointing.save(state, str(target))
    dist.barrier()
    if dist.get_rank() == 0:
        meta = {"iteration": train_state.iteration, "megaphi_version": megaphi.__version__,
                "megatron_core_version": megatron.core.__version__, "layout": layout,
                "config": config_dict}
        (target / META).write_text(json.dumps(meta, indent=2, default=str))
        tmp = root / (LATEST + ".tmp")
        tmp.write_text(target.name + "\n")
        os.replace(tmp, root / LATEST)  # the checkpoint becomes visible only now
        _prune(root, keep_last)
    dist.barrier()
    logger.info("saved checkpoint %s", target)
    return target


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    done = sorted(p for p in root.glob("iter_*") if (p / META).is_file())
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _materialize_optimizer_state(optimizer) -> None:
    """Give a fresh optimizer its state tensors before a load overwrites them: Megatron's
    distributed optimizer (torch AdamW without Apex/TE) cannot describe an empty state. Uses
    Megatron's own dummy-step initialisation; at step 0 the LR is 0, and the load replaces
    parameters and moments anyway."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


@contextlib.contextmanager
def _torch_adam_step_fix():
    """Work around Megatron-Core 0.16.1 loading a "fully reshardable" distributed-optimizer
    state into torch's AdamW (no Apex/TE): ``load_state_dict`` first sets every parameter's
    ``step`` from the checkpoint, then copies the loaded tensors, which omit ``step``, over
    every state key and raises ``KeyError: 'step'``. For the duration of a load, a missing
    ``step`` is supplied from the value Megatron has just set. Megatron also gives every
    parameter the same ``step`` tensor object, which torch's AdamW increments in place once
    per parameter; after the load each parameter gets its own copy."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def with_step(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        step = self.optimizer.state.get(main_param, {}).get("step")
        if "step" not in tensors and step is not None:
            tensors = {**tensors, "step": step.clone()}
        return original(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = with_step
    try:
        yield
    finally:
        DistributedOptimizer._set_main_param_and_optimizer_states = original


def _unshare_adam_steps(optimizer) -> None:
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for state in getattr(inner, "state", {}).values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()


def load_checkpoint(path: Path, chunks, optimizer, scheduler, layout: dict,
                    load_optimizer: bool = True, load_progress: bool = True) -> Optional[dict]:
    """Load a checkpoint into this rank's (possibly differently laid out) model and optimizer.

    Args:
        load_optimizer: also load the optimizer state (parameters' Adam moments and steps).
        load_progress: also restore the LR schedule and RNG states and return the train state
            (resuming a run); off when a new run starts from the checkpoint.

    Returns the saved train state, or ``None`` when progress was not loaded."""
    from megatron.core import dist_checkpointing, tensor_parallel
    from megatron.core.utils import unwrap_model

    meta = read_meta(path)
    same_layout = meta["layout"] == layout
    if load_optimizer:
        _materialize_optimizer_state(optimizer)
    state = _sharded_state(chunks, optimizer if load_optimizer else None, is_loading=True)
    load_progress = load_progress and load_optimizer
    if same_layout and load_progress:
        state["rng_state"] = _rng_object(layout)
    loaded = dist_checkpointing.load(state, str(path))
    for i, chunk in enumerate(unwrap_model(list(chunks))):
        chunk.load_state_dict(loaded[f"model{i}"])
    if not load_optimizer:
        return None
    with _torch_adam_step_fix():
        optimizer.load_state_dict(loaded["optimizer"])
    _unshare_adam_steps(optimizer)
    if not load_progress:
        return None
    scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        rng = loaded["rng_state"]
        torch.set_rng_state(rng["torch"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    else:
        logger.info("layout changed (%s -> %s): weights and optimizer state resharded, RNG "
                    "states reseeded", meta["layout"], layout)
    return loaded["train_state"]
