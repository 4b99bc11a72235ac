"""DPO at several layouts in one launch (torchrun, CPU, gloo; a 1,024-token vocabulary and no
tokenizer keep it fast): step 0 with the policy equal to the reference, then a step against a
different reference.

Rank 0 writes a small preference dataset (full-length pairs and token pairs of random ids).
For each layout the real phase code computes the reference log-probs with a forward-only
pass (:func:`megaphi.phases.dpo.collect_logps`), packs the pairs into rows carrying them, and
runs one training step's schedule and reduction (``Trainer._run_schedule``, ``_reduce``). A
second schedule on a global batch holding a single token pair records the gradient of the
loss with respect to the last stage's vocabulary-parallel logits, gathered over TP. A third
runs the same 8 rows against a reference of other weights: rank 0 saves the reduced metrics,
the pairs of those rows, every pair's policy and reference log-probs and the full gradients,
for a check of the per-pair normalisation against a plain mean over the pairs.

    torchrun --nproc-per-node 4 tests/workers/dpo_worker.py OUT.pt tp2pp2 tp2 pp2 dp
"""

import argparse
import os
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist

from megaphi.config import load_config
from megaphi.platform import configure_logging, init_runtime, shutdown_runtime

VOCAB, SEQ, BETA = 1024, 64, 0.25
LAYOUTS = {"tp2pp2": (2, 2), "tp2": (2, 1), "pp2": (1, 2), "dp": (1, 1)}


def write_pairs(prefix: str) -> None:
    """12 pairs: 6 full (prompt 4-9 tokens, responses 2-10) and 6 token pairs (context 5-20)."""
    from megaphi.data.preprocess import META_FORMAT, AtomicDataset

    rng = np.random.default_rng(0)
    tokens = 0
    with AtomicDataset(prefix, extra=True) as out:
        builder = out.builder(np.int32)
        for i in range(12):
            if i % 2 == 0:
                seqs = [rng.integers(0, VOCAB, rng.integers(4, 10)),
                        rng.integers(0, VOCAB, rng.integers(2, 11)),
                        rng.integers(0, VOCAB, rng.integers(2, 11))]
            else:
                chosen, rejected = rng.choice(VOCAB, 2, replace=False)
                seqs = [rng.integers(0, VOCAB, rng.integers(5, 21)), np.array([chosen, rejected])]
            builder.add_document(np.concatenate(seqs), [len(s) for s in seqs])
            out.write_extra(b"{}\n")
            tokens += sum(len(s) for s in seqs)
        out.commit({"format": META_FORMAT, "kind": "preference", "documents": 12,
                    "tokens": tokens, "inputs": ["dpo_worker"],
                    "tokenizer": {"name": "random ids", "fingerprint": "test",
                                  "vocab_size": VOCAB}})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("layouts", nargs="+", choices=list(LAYOUTS))
    args = parser.parse_args()
    configure_logging("WARNING")

    from megatron.core import parallel_state as ps
    from megatron.core.utils import unwrap_model

    from megaphi.data.preference import PairSegments
    from megaphi.model.builder import build_model
    from megaphi.model.init import initialize_weights
    from megaphi.model.partition import gather_full
    from megaphi.phases.dpo import DPOPhase, collect_logps, pair_rows, response_lengths
    from megaphi.training.metrics import MetricsWriter
    from megaphi.training.step import wrap_for_training
    from megaphi.training.trainer import Trainer

    prefix = args.out + ".pairs"
    if int(os.environ["RANK"]) == 0:
        write_pairs(prefix)
    results = {}
    for name in args.layouts:
        tp, pp = LAYOUTS[name]
        world = int(os.environ["WORLD_SIZE"])
        dp = world // (tp * pp)
        cfg = load_config("tiny", overrides=[
            f"model.vocab_size={VOCAB}", f"model.seq_length={SEQ}", "model.init_std=0.3",
            "precision.dtype=fp32", f"parallel.tp={tp}", f"parallel.pp={pp}",
            "train.micro_batch_size=2", "train.global_batch_size=8",
            "phase.name=dpo", "checkpoint.load=unused", f"dpo.beta={BETA}"])
        rt = init_runtime(cfg.parallel, seed=1)
        dist.barrier()  # the dataset is written
        chunks = wrap_for_training(build_model(cfg), distributed_optimizer=False)
        initialize_weights([unwrap_model(c) for c in chunks], cfg.model, seed=7)
        pad = SimpleNamespace(pad_id=0)
        phase = DPOPhase(cfg)
        phase.logps = collect_logps(cfg, rt, chunks, [prefix], pad, what="reference")
        trainer = Trainer(cfg, rt, chunks, None, None, MetricsWriter("", False, enabled=False),
                          phase)
        rows = pair_rows(cfg, PairSegments(prefix, SEQ, reference=phase.logps[prefix]), 0,
                         num_samples=cfg.train.global_batch_size)
        mine = [rows[i] for i in range(len(rows))][ps.get_data_parallel_rank()::dp]
        mine = mine[:cfg.train.global_batch_size // dp]
        micro = [{k: torch.stack([r[k] for r in mine[i:i + 2]]) for k in mine[0]}
                 for i in range(0, len(mine), 2)]
        for chunk in chunks:
            chunk.zero_grad_buffer()
        metrics = trainer._reduce(trainer._run_schedule(micro, forward_only=False), micro)[0]
        result = {"metrics": metrics, "layout": (rt.tp, rt.pp, rt.dp)}

        # The gradient on the logits for one token pair (pair 1) alone in the global batch.
        token_pair = PairSegments(prefix, SEQ, reference=phase.logps[prefix])
        k = int(np.flatnonzero(token_pair.index == 1)[0])
        one = pair_rows(cfg, token_pair, 0).row([k])
        empty = pair_rows(cfg, token_pair, 0).row([])
        first = ps.get_data_parallel_rank() == 0
        micro = [{key: torch.stack([(one if first else empty)[key], empty[key]])
                  for key in one}] * 1
        grads = []
        last = unwrap_model(chunks[-1])
        hook = None
        if ps.is_pipeline_last_stage():
            def keep(module, inputs, output):
                output[0].register_hook(lambda g: grads.append(g.detach().clone()))
            hook = last.output_layer.register_forward_hook(keep)
        for chunk in chunks:
            chunk.zero_grad_buffer()
        trainer._run_schedule(micro, forward_only=False)
        if hook is not None:
            hook.remove()
        if grads and first:
            g = grads[0]  # [s, b, V/tp]
            parts = [torch.empty_like(g) for _ in range(rt.tp)]
            dist.all_gather(parts, g, group=ps.get_tensor_model_parallel_group())
            full = torch.cat(parts, dim=-1)[:, 0]  # the row holding the pair: [s, V]
            seq_len = len(token_pair.pairs[1].context)
            pair = token_pair.pairs[1]
            result["grad"] = {"logits_grad": full.cpu(), "position": seq_len - 1,
                              "chosen": pair.chosen_id, "rejected": pair.rejected_id}
        gathered = [None] * world
        dist.all_gather_object(gathered, result.get("grad"))
        result["grad"] = next((g for g in gathered if g is not None), None)

        # The same 8 rows against a reference of other weights: per-pair losses differ.
        reference = build_model(cfg)
        initialize_weights(reference, cfg.model, seed=8)
        ref_logps = collect_logps(cfg, rt, reference, [prefix], pad, what="reference")
        rows = pair_rows(cfg, PairSegments(prefix, SEQ, reference=ref_logps[prefix]), 0,
                         num_samples=cfg.train.global_batch_size)
        mine = [rows[i] for i in range(len(rows))][ps.get_data_parallel_rank()::dp]
        micro = [{k: torch.stack([r[k] for r in mine[i:i + 2]]) for k in mine[0]}
                 for i in range(0, len(mine), 2)]
        for chunk in chunks:
            chunk.zero_grad_buffer()
        metrics = trainer._reduce(trainer._run_schedule(micro, forward_only=False), micro)[0]
        grads = gather_full(chunks, grads=True)
        result["other_reference"] = {
            "metrics": metrics, "grads": grads,
            "pairs": [p for i in range(len(rows)) for p in rows[i]["pair_index"].tolist()
                      if p >= 0],
            "policy": phase.logps[prefix], "reference": ref_logps[prefix],
            "lengths": response_lengths([prefix])[prefix]}
        results[name] = result
        ps.destroy_model_parallel()
    if int(os.environ["RANK"]) == 0:
        torch.save(results, args.out + ".tmp")
        os.replace(args.out + ".tmp", args.out)
    shutdown_runtime()


if __name__ == "__main__":
    main()
