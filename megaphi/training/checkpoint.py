"""Distributed checkpoints: save, resume, and load into another parallel layout.

A checkpoint is ``<run_dir>/checkpoints/iter_NNNNNNN/``, written by every rank with
``megatron.core.dist_checkpointing``: the model and optimizer state as sharded tensors with
global shapes (so they load at any TP / PP / DP layout; the distributed optimizer state is saved
in Megatron's "fully reshardable" form, one canonical tensor per parameter), plus common state:
the LR schedule, the train state (iteration, consumed samples), the resolved config, and the
megaphi and Megatron-Core versions (``megaphi.json``). RNG states are saved per (pipeline, tensor) parallel
rank, replicated over data x context parallel ranks (their RNG states are equal), and restored when
the layout is unchanged.

The layout (``{"tp", "pp", "vpp", "cp", "dp"}``) is recorded in ``megaphi.json`` and compared on
load (:func:`same_layout`; a layout saved before ``cp`` was recorded means ``cp=1``, see
:func:`normalize_layout`). Every sharded tensor and object numbers its replicas by the
data-parallel rank *with* context parallelism, as Megatron-Core's model and distributed-optimizer
state do: context-parallel ranks hold the same weights, so a replica id from the data-parallel
rank alone would give two CP ranks the same main replica of one key (a save error).

The save protocol, collective over the whole job:

1. rank 0 removes a leftover directory of the same iteration (a killed save) and creates it;
2. every rank writes its shards (``dist_checkpointing.save``), then all meet at a barrier;
3. rank 0 writes ``megaphi.json`` (the completion marker: an ``iter_*`` directory without it is a
   killed save), then rewrites ``checkpoints/latest`` (temp file + rename), then prunes: the
   oldest complete checkpoints beyond ``keep_last``, and incomplete directories older than the
   one just written (:func:`prune_incomplete`).

So saving is atomic for readers: ``latest`` only ever names a complete checkpoint, and a crash
during a save leaves it on the previous one. The half-written directory a killed save leaves is
ignored by resume, and removed by :func:`prune_incomplete`, which the run assembly calls once at
start-up (rank 0, before any save) and which runs after every completed save.
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


def normalize_layout(layout: dict) -> dict:
    """``layout`` with every key a comparison needs: a layout without ``cp`` (a checkpoint saved
    before megaphi recorded context parallelism, or a caller that does not set it) is ``cp=1``."""
    return {**layout, "cp": layout.get("cp") or 1}


def same_layout(saved: dict, current: dict) -> bool:
    """Whether a checkpoint saved at layout ``saved`` is loaded at the same layout (then its
    per-rank RNG states are restored); both are compared through :func:`normalize_layout`."""
    return normalize_layout(saved) == normalize_layout(current)


def _this_layout(layout: dict) -> dict:
    """The caller's layout of this job, with ``cp`` taken from Megatron's process groups when
    the caller left it out."""
    if layout.get("cp") is None:
        from megatron.core import parallel_state as ps

        layout = {**layout, "cp": ps.get_context_parallel_world_size()}
    return normalize_layout(layout)


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
    """This rank's RNG states as a ShardedObject indexed by (pp rank, tp rank), replicated over
    the data x context parallel ranks (as in Megatron-LM: their RNG states are equal; keying the
    replicas by the data-parallel rank alone gives two context-parallel ranks the same key)."""
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
                         replica_id=ps.get_data_parallel_rank(with_context_parallel=True))


def save_checkpoint(run_dir: str, chunks, optimizer, scheduler, train_state, config_dict: dict,
                    layout: dict, keep_last: int) -> Path:
    """Save a checkpoint of every rank's state; collective over the whole job (the protocol is
    in the module docstring). ``layout`` is this job's ``{"tp", "pp", "vpp", "cp", "dp"}``; a
    missing ``cp`` is read from Megatron's process groups."""
    import megatron.core
    from megatron.core import dist_checkpointing

    import megaphi

    layout = _this_layout(layout)
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
        _prune(root, keep_last, train_state.iteration)
    dist.barrier()
    logger.info("saved checkpoint %s", target)
    return target


def _iteration_dirs(root: Path) -> list:
    """The ``iter_NNNNNNN`` directories under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.name.startswith("iter_") and p.name[5:].isdigit() and p.is_dir()
             and not p.is_symlink()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def prune_incomplete(root: Path, before: Optional[int] = None) -> list:
    """Remove the ``iter_*`` directories under ``root`` (a ``checkpoints/`` directory) that have
    no ``megaphi.json``: saves that were killed before they completed. Returns the removed paths.

    Call it only when no save is in progress, on one rank: at the start of a run (rank 0,
    before the first save) and after a completed save (:func:`save_checkpoint` does, with
    ``before`` set to the iteration it just wrote, so only older directories are touched). The
    directory ``latest`` names is never removed (it is complete unless someone edited it by hand,
    and then resuming reports it)."""
    root = Path(root)
    pointer = root / LATEST
    named = pointer.read_text().strip() if pointer.is_file() else None
    removed = []
    for path in _iteration_dirs(root):
        if before is not None and int(path.name[5:]) >= before:
            continue
        if (path / META).is_file() or path.name == named:
            continue
        shutil.rmtree(path, ignore_errors=True)
        logger.info("removed incomplete checkpoint %s (no %s: a save that did not finish)",
                    path, META)
        removed.append(path)
    return removed


def _prune(root: Path, keep_last: int, just_saved: int) -> None:
    """After a completed save of iteration ``just_saved``: remove the complete checkpoints
    beyond the newest ``keep_last`` (none when ``keep_last <= 0``), and the incomplete
    directories older than ``just_saved``."""
    if keep_last > 0:
        done = [p for p in _iteration_dirs(root) if (p / META).is_file()]
        for old in done[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    prune_incomplete(root, before=just_saved)


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

    ``layout`` is this job's layout (a missing ``cp`` is read from Megatron's process groups);
    it is compared with the saved one (:func:`same_layout`) to decide whether the RNG states
    can be restored.

    Returns the saved train state, or ``None`` when progress was not loaded."""
    from megatron.core import dist_checkpointing, tensor_parallel
    from megatron.core.utils import unwrap_model

    meta = read_meta(path)
    layout = _this_layout(layout)
    saved_layout = normalize_layout(meta["layout"])
    unchanged = same_layout(saved_layout, layout)
    if load_optimizer:
        _materialize_optimizer_state(optimizer)
    state = _sharded_state(chunks, optimizer if load_optimizer else None, is_loading=True)
    load_progress = load_progress and load_optimizer
    if unchanged and load_progress:
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
    if unchanged:
        rng = loaded["rng_state"]
        torch.set_rng_state(rng["torch"])
        tensor_parallel.get_cuda_rng_tracker().set_states(rng["tracker"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    else:
        logger.info("layout changed (%s -> %s): weights and optimizer state resharded, RNG "
                    "states reseeded", saved_layout, layout)
    return loaded["train_state"]
