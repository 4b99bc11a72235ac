"""Per-token losses of packed rows against each document run alone, through the trainer's
forward step (``megaphi.phases.lm.token_forward_step``); launched by torchrun.

The tiny model (fp32, a 1,024-token vocabulary, weights with std 0.3 so per-token losses
differ widely) sees one packed
row holding three documents plus padding, then each document alone in a row of its own (plain
causal attention, positions 0..n-1). The rank that holds the losses (last pipeline stage,
first tensor-parallel rank) saves ``{"packed": [s], "alone": [[n_i]], "lengths", "seq_ids"}``.

    torchrun --nproc-per-node 2 tests/workers/packed_worker.py OUT.pt parallel.tp=2 \
        parallel.sequence_parallel=true
"""

import argparse
import os

import torch

from megaphi.config import load_config
from megaphi.platform import configure_logging, init_runtime, shutdown_runtime

SEQ = 64
LENGTHS = (20, 27, 14)  # tokens per document: 19 + 26 + 13 = 58 positions, then 6 of padding


def rows(vocab: int, device):
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, vocab, (n,), generator=gen) for n in LENGTHS]
    tokens = torch.zeros(SEQ, dtype=torch.long)
    labels = torch.zeros(SEQ, dtype=torch.long)
    positions = torch.zeros(SEQ, dtype=torch.long)
    seq_ids = torch.full((SEQ,), -1, dtype=torch.long)
    at = 0
    for j, doc in enumerate(docs):
        n = len(doc) - 1
        tokens[at:at + n], labels[at:at + n] = doc[:-1], doc[1:]
        positions[at:at + n], seq_ids[at:at + n] = torch.arange(n), j
        at += n
    positions[at:] = torch.arange(SEQ - at)
    mask = (seq_ids >= 0).float()
    packed = {"tokens": tokens, "labels": labels, "loss_mask": mask, "position_ids": positions,
              "seq_ids": seq_ids}
    alone = []
    for doc in docs:
        t = torch.zeros(SEQ, dtype=torch.long)
        lab = torch.zeros(SEQ, dtype=torch.long)
        t[:len(doc) - 1], lab[:len(doc) - 1] = doc[:-1], doc[1:]
        m = torch.zeros(SEQ)
        m[:len(doc) - 1] = 1.0
        alone.append({"tokens": t, "labels": lab, "loss_mask": m,
                      "position_ids": torch.arange(SEQ)})
    to = lambda b: {k: v.unsqueeze(0).to(device) for k, v in b.items()}  # noqa: E731
    return to(packed), [to(b) for b in alone], seq_ids


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--spec", choices=["local", "te"], default="local")
    args = parser.parse_args()
    configure_logging("WARNING")

    from megatron.core import parallel_state as ps

    from megaphi.model.builder import build_model
    from megaphi.model.init import initialize_weights
    from megaphi.phases.lm import packed_shape, token_forward_step
    from megaphi.training.step import forward_backward

    cfg = load_config("tiny", overrides=[f"model.seq_length={SEQ}", "precision.dtype=fp32",
                                         "model.vocab_size=1024", "model.init_std=0.3",
                                         "train.micro_batch_size=1",
                                         *args.overrides])
    rt = init_runtime(cfg.parallel, seed=cfg.train.seed)
    chunks = build_model(cfg, use_te=args.spec == "te")
    initialize_weights(chunks, cfg.model, seed=7)
    packed, alone, seq_ids = rows(cfg.model.vocab_size, rt.device)

    def capture(data_iterator, model):
        output, loss_func = token_forward_step(data_iterator, model)

        def with_losses(out):
            loss_sum, count, report = loss_func(out)
            return loss_sum, count, {**report, "per_token": out.detach().float().reshape(-1)}
        return output, with_losses

    seq_shape, mbs_shape = packed_shape(cfg, chunks)
    with torch.no_grad():
        got = forward_backward(chunks, [packed], 1, seq_length=seq_shape,
                               micro_batch_size=mbs_shape, forward_step_func=capture,
                               forward_only=True)
        ref = forward_backward(chunks, alone, len(alone), seq_length=SEQ, micro_batch_size=1,
                               forward_step_func=capture, forward_only=True)
    if got and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        result = {"packed": got[0]["per_token"].cpu(),
                  "alone": [r["per_token"][:n - 1].cpu() for r, n in zip(ref, LENGTHS)],
                  "lengths": LENGTHS, "seq_ids": seq_ids}
        torch.save(result, args.out + ".tmp")
        os.replace(args.out + ".tmp", args.out)
    shutdown_runtime()


if __name__ == "__main__":
    main()
