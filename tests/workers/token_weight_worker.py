"""The trainer's loss and gradients for one global batch whose rows hold very different numbers
of loss tokens, at several micro-batch sizes; launched by torchrun (DP = the world size). A
1,024-token vocabulary keeps it fast (no tokenizer is involved).

Every variant runs the trainer's own step path (``Trainer._run_schedule`` then
``Trainer._reduce``) on the same 8 rows, split over data-parallel ranks and micro-batches.
Rank 0 saves, per micro-batch size, the reduced loss, its token count and the full gradients
(gathered to TP=1 shapes; all-reduce DDP, so every rank holds the whole gradient), plus the
per-token losses of each row from a forward-only pass (to compute the reference means).

    torchrun --nproc-per-node 2 tests/workers/token_weight_worker.py OUT.pt 1 4
"""

import argparse
import os

import torch

from megaphi.config import load_config
from megaphi.platform import configure_logging, init_runtime, shutdown_runtime

GLOBAL, SEQ = 8, 32
LOSS_TOKENS = (1, 31, 3, 25, 2, 17, 30, 5)  # loss tokens per row: very uneven


def global_rows(vocab: int):
    gen = torch.Generator().manual_seed(3)
    seqs = torch.randint(0, vocab, (GLOBAL, SEQ + 1), generator=gen)
    rows = []
    for i, n in enumerate(LOSS_TOKENS):
        mask = torch.zeros(SEQ)
        mask[SEQ - n:] = 1.0  # the end of each row carries the loss, as assistant turns do
        rows.append({"tokens": seqs[i, :-1], "labels": seqs[i, 1:], "loss_mask": mask,
                     "position_ids": torch.arange(SEQ)})
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("micro_batch_sizes", nargs="+", type=int)
    args = parser.parse_args()
    configure_logging("WARNING")

    from megatron.core import parallel_state as ps

    from megaphi.model.builder import build_model
    from megaphi.model.init import initialize_weights
    from megaphi.model.partition import gather_full
    from megaphi.phases import get_phase
    from megaphi.phases.lm import token_forward_step
    from megaphi.training.metrics import MetricsWriter
    from megaphi.training.step import forward_backward, wrap_for_training
    from megaphi.training.trainer import Trainer

    results = {}
    small = [f"model.seq_length={SEQ}", "precision.dtype=fp32", "model.vocab_size=1024"]
    base = load_config("tiny", overrides=[*small, "model.init_std=0.3",
                                          f"train.global_batch_size={GLOBAL}"])
    rt = init_runtime(base.parallel, seed=1)
    chunks = build_model(base)
    initialize_weights(chunks, base.model, seed=7)
    chunks = wrap_for_training(chunks, distributed_optimizer=False)
    rows = global_rows(base.model.vocab_size)
    per_rank = GLOBAL // rt.dp
    mine = rows[ps.get_data_parallel_rank() * per_rank:][:per_rank]
    stack = lambda items: {k: torch.stack([r[k] for r in items]) for k in items[0]}  # noqa
    for mbs in args.micro_batch_sizes:
        cfg = load_config("tiny", overrides=[*small, f"train.global_batch_size={GLOBAL}",
                                             f"train.micro_batch_size={mbs}"])
        trainer = Trainer(cfg, rt, chunks, None, None, MetricsWriter("", False, enabled=False),
                          get_phase(cfg))
        micro = [stack(mine[i:i + mbs]) for i in range(0, per_rank, mbs)]
        for chunk in chunks:
            chunk.zero_grad_buffer()
        reports = trainer._run_schedule(micro, forward_only=False)
        metrics = trainer._reduce(reports, micro)[0]
        results[mbs] = {"loss": metrics["loss"], "tokens": metrics["loss_tokens"],
                        "grads": gather_full(chunks, grads=True)}

    def capture(data_iterator, model):
        output, loss_func = token_forward_step(data_iterator, model)
        return output, lambda out: (*loss_func(out)[:2], {"per_token": out.detach().float()})

    with torch.no_grad():
        reports = forward_backward(chunks, [stack([r]) for r in rows], GLOBAL, seq_length=SEQ,
                                   micro_batch_size=1, forward_step_func=capture,
                                   forward_only=True)
    if rt.rank == 0:
        results["per_token"] = torch.cat([r["per_token"] for r in reports]).cpu()
        results["loss_mask"] = torch.stack([r["loss_mask"] for r in rows])
        torch.save(results, args.out + ".tmp")
        os.replace(args.out + ".tmp", args.out)
    shutdown_runtime()


if __name__ == "__main__":
    main()
