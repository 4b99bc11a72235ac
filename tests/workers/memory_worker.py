"""Build the tiny model, Megatron DDP and the distributed optimizer at the given layout, take
one optimizer step (Adam allocates its moments there), and measure what every rank allocated:
its parameters, its DDP gradient buffers (padded and unpadded) and its optimizer state (Adam's
moments and any fp32 main weights the distributed optimizer made). Once in fp32 and once in bf16
(where the distributed optimizer adds fp32 main weights), in one launch. Launched by torchrun;
rank 0 saves {dtype: one record per rank}."""

import argparse

import torch

from megaphi.config import load_config
from megaphi.platform import configure_logging, init_runtime, shutdown_runtime


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def measure(cfg) -> list:
    """Every rank's record for ``cfg``, gathered."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megaphi.model.builder import build_model
    from megaphi.training.optim import build_optimizer
    from megaphi.training.step import wrap_for_training

    chunks = build_model(cfg)
    weights = sum(nbytes(p) for c in chunks for p in c.parameters())
    chunks = wrap_for_training(chunks, distributed_optimizer=cfg.optimizer.distributed)
    optimizer = build_optimizer(cfg, chunks)
    for chunk in chunks:
        for p in chunk.parameters():
            p.main_grad.zero_()
    optimizer.step()
    buffers = [b for c in chunks for b in c.buffers]
    grads = sum(nbytes(b.grad_data) for b in buffers)
    grads_unpadded = sum(b.numel_unpadded * b.grad_data.element_size() for b in buffers)
    inner = [o for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    state = 0
    for opt in inner:
        for per_param in opt.optimizer.state.values():
            state += sum(nbytes(v) for v in per_param.values()
                         if torch.is_tensor(v) and v.dim() > 0)
        for group in getattr(opt, "shard_fp32_from_float16_groups", []):
            state += sum(nbytes(p) for p in group)
    record = {"rank": dist.get_rank(), "stage": parallel_state.get_pipeline_model_parallel_rank(),
              "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
              "dp_rank": parallel_state.get_data_parallel_rank(),
              "params": sum(p.numel() for c in chunks for p in c.parameters()),
              "weights": weights, "grads": grads, "grads_unpadded": grads_unpadded,
              "optimizer": state}
    records = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    return records


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    configure_logging("WARNING")

    rt = init_runtime(load_config("tiny", overrides=args.overrides).parallel, seed=1)
    results = {dtype: measure(load_config("tiny", overrides=[*args.overrides,
                                                             f"precision.dtype={dtype}"]))
               for dtype in ("fp32", "bf16")}
    if rt.is_main:
        torch.save(results, args.out)
    shutdown_runtime()


if __name__ == "__main__":
    main()
