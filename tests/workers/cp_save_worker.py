"""Save and load a checkpoint under real context-parallel process groups (cp=2) on CPU; launched
by torchrun on ``2 * dp`` processes.

Context-parallel attention needs Transformer Engine (GPU only), and megaphi refuses cp > 1 without
it, so this worker sets up the process groups itself: Megatron's parallel state at cp=2 (and
dp = world / 2), and in it the tiny model built from a cp=1 config (no forward pass is run, so its
attention never needs a CP implementation). What is exercised is everything a checkpoint holds
that depends on the groups: the model's sharded state dict (replicas over data x context parallel
ranks), the distributed optimizer, which shards its state over those same ranks, and the RNG
object. The worker takes one optimizer step on made-up gradients (so Adam moments are not zero),
saves with ``save_checkpoint``, builds a differently initialised model and optimizer, loads with
``load_checkpoint``, and checks weights, this rank's optimizer state shard, the schedule, the
train state and the RNG state round-trip exactly, and that the completed save removed an older
half-written ``iter_*`` directory (a killed save) but not a newer one. Rank 0 saves
``{"ok", "checks", "meta"}``.

    torchrun --nproc-per-node 2 tests/workers/cp_save_worker.py OUT.pt RUN_DIR
"""

import dataclasses
import datetime
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


@dataclasses.dataclass
class State:  # the fields save/load touch of megaphi's TrainState
    iteration: int = 0
    consumed_samples: int = 0


def build(cfg, seed: int):
    """The tiny model (initialised with ``seed``) wrapped in Megatron's DDP over the data x
    context parallel ranks, with megaphi's optimizer (distributed) and schedule."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megaphi.model.builder import build_model
    from megaphi.model.init import initialize_weights
    from megaphi.training.optim import build_optimizer, build_scheduler

    chunks = build_model(cfg, use_te=False)
    initialize_weights(chunks, cfg.model, seed=seed)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=True)
    chunks = [DistributedDataParallel(config=chunk.config, ddp_config=ddp_config, module=chunk)
              for chunk in chunks]
    optimizer = build_optimizer(cfg, chunks)
    return chunks, optimizer, build_scheduler(cfg, optimizer)


def weights(chunks) -> dict:
    return {name: p.detach().clone() for name, p in chunks[0].module.named_parameters()}


def optimizer_shard(optimizer) -> list:
    """This rank's shard of the distributed optimizer: main params and Adam moments, in order."""
    out = []
    for group in optimizer.optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.optimizer.state.get(p, {})
            out.append((p.detach().clone(), state["exp_avg"].clone(), state["exp_avg_sq"].clone()))
    return out


def main():
    out, run_dir = sys.argv[1], sys.argv[2]
    from megaphi.platform import configure_logging, install_cpu_compat

    configure_logging("WARNING")
    install_cpu_compat()
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from megaphi.config import load_config
    from megaphi.training.checkpoint import load_checkpoint, read_meta, save_checkpoint

    world = dist.get_world_size()
    ps.initialize_model_parallel(context_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    assert ps.get_context_parallel_world_size() == 2
    assert ps.get_data_parallel_world_size() == world // 2
    assert ps.get_data_parallel_world_size(with_context_parallel=True) == world

    cfg = load_config("tiny", overrides=["model.seq_length=32", "model.vocab_size=512",
                                         "precision.dtype=fp32",
                                         "train.micro_batch_size=1",
                                         f"train.global_batch_size={world // 2}"])
    chunks, optimizer, scheduler = build(cfg, seed=7)
    # One step on made-up gradients, equal on every rank (as after DDP's reduction).
    gen = torch.Generator().manual_seed(0)
    for _, p in sorted(chunks[0].module.named_parameters()):
        p.main_grad.copy_(torch.randn(p.shape, generator=gen) * 1e-2)
    scheduler.step(increment=cfg.train.global_batch_size * 3)  # a non-zero LR
    ok, _, _ = optimizer.step()
    assert ok
    saved_weights, saved_shard = weights(chunks), optimizer_shard(optimizer)
    saved_schedule = scheduler.state_dict()
    layout = {"tp": 1, "pp": 1, "vpp": None, "cp": 2, "dp": world // 2}
    saved_rng = torch.get_rng_state()
    saved_tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
    ckpts = Path(run_dir) / "checkpoints"
    if dist.get_rank() == 0:  # killed saves of an earlier attempt: one older, one newer
        for name in ("iter_0000001", "iter_0000005"):
            (ckpts / name).mkdir(parents=True)
            (ckpts / name / "__0_0.distcp").write_bytes(b"half a shard")
    dist.barrier()
    target = save_checkpoint(run_dir, chunks, optimizer, scheduler,
                             State(iteration=3, consumed_samples=3 * world // 2), cfg.to_dict(),
                             layout, keep_last=2)

    torch.rand(100)  # move the RNGs on: the load must restore them
    tensor_parallel.model_parallel_cuda_manual_seed(999)
    fresh, fresh_optimizer, fresh_scheduler = build(cfg, seed=8)
    assert not torch.equal(weights(fresh)["embedding.word_embeddings.weight"],
                           saved_weights["embedding.word_embeddings.weight"])
    # The current caller's layout leaves cp out: it is read from the process groups.
    train_state = load_checkpoint(target, fresh, fresh_optimizer, fresh_scheduler,
                                  {k: v for k, v in layout.items() if k != "cp"})

    checks = {}
    got = weights(fresh)
    checks["weights"] = (got.keys() == saved_weights.keys()
                         and all(torch.equal(got[k], saved_weights[k]) for k in got))
    shard = optimizer_shard(fresh_optimizer)
    checks["optimizer"] = (len(shard) == len(saved_shard) and len(shard) > 0 and all(
        torch.equal(a, b) for got_t, want_t in zip(shard, saved_shard)
        for a, b in zip(got_t, want_t)))
    checks["moments_nonzero"] = any(t[1].abs().sum() > 0 for t in saved_shard)
    checks["schedule"] = fresh_scheduler.state_dict() == saved_schedule
    checks["train_state"] = train_state == {"iteration": 3, "consumed_samples": 3 * world // 2}
    checks["rng"] = torch.equal(torch.get_rng_state(), saved_rng)
    tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
    # The completed save pruned the older killed save, not the newer one (no save is in
    # progress here, but a newer directory is left to the save of its own iteration).
    checks["pruned_incomplete"] = (not (ckpts / "iter_0000001").exists()
                                   and (ckpts / "iter_0000005").is_dir())
    checks["rng_tracker"] = (tracker.keys() == saved_tracker.keys()
                             and all(torch.equal(tracker[k], saved_tracker[k]) for k in tracker))
    results = [None] * world
    dist.all_gather_object(results, checks)
    if dist.get_rank() == 0:
        tmp = out + ".tmp"
        torch.save({"ok": all(all(c.values()) for c in results), "checks": results,
                    "meta": read_meta(target)}, tmp)
        os.replace(tmp, out)
    dist.barrier()
    ps.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":  # dist_checkpointing's writer processes re-import this module
    main()
