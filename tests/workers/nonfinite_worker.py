"""Train the tiny model a few steps with a NaN injected into one gradient; launched by torchrun.

Rank 0 saves, per step, whether it was skipped, the loss, and a checksum of the full weights
before and after, plus whether too many consecutive bad steps stopped the run.
"""

import argparse
import os

import torch

from megaphi.config import load_config
from megaphi.platform import configure_logging, init_runtime, shutdown_runtime


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    configure_logging("WARNING")

    from megaphi.model.builder import build_model
    from megaphi.model.init import initialize_weights
    from megaphi.model.partition import gather_full
    from megaphi.training.metrics import MetricsWriter
    from megaphi.training.optim import build_optimizer, build_scheduler
    from megaphi.training.step import lm_batch, wrap_for_training
    from megaphi.phases import get_phase
    from megaphi.training.trainer import NonFiniteError, Trainer

    cfg = load_config("tiny", overrides=["model.seq_length=32", "train.micro_batch_size=2",
                                         "train.global_batch_size=4", "train.iters=20",
                                         "schedule.warmup_iters=0", *args.overrides])
    rt = init_runtime(cfg.parallel, seed=1)
    chunks = build_model(cfg)
    initialize_weights(chunks, cfg.model, seed=1)
    chunks = wrap_for_training(chunks)
    optimizer = build_optimizer(cfg, chunks)
    trainer = Trainer(cfg, rt, chunks, optimizer, build_scheduler(cfg, optimizer),
                      MetricsWriter("", False, enabled=False), get_phase(cfg))
    gen = torch.Generator().manual_seed(0)
    param = dict(chunks[0].module.named_parameters())["decoder.layers.0.mlp.linear_fc1.weight"]
    poison = {"on": False}
    param.register_hook(lambda g: g * float("nan") if poison["on"] else g)

    def checksum():
        full = gather_full(chunks)
        return None if full is None else sum(float(t.double().sum()) for t in full.values())

    steps, stopped = [], None
    for i in range(14):
        poison["on"] = i == 1 or i >= 3  # one bad step, then bad steps until the run stops
        batch = torch.randint(0, min(1000, cfg.model.vocab_size), (trainer.num_microbatches, 2, 33),
                              generator=gen)
        micro = [lm_batch(b, rt.device) for b in batch]
        before = checksum()
        try:
            result = trainer.step(micro)
            trainer.state.iteration += 1
            trainer._track_skips(result)
        except NonFiniteError as exc:
            stopped = str(exc)
            break
        steps.append({"skipped": result.skipped, "loss": result.loss, "before": before,
                      "after": checksum()})
    if rt.rank == 0:
        torch.save({"steps": steps, "stopped": stopped}, args.out + ".tmp")
        os.replace(args.out + ".tmp", args.out)
    shutdown_runtime()


if __name__ == "__main__":
    main()
