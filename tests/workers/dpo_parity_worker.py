"""One DPO training step's gradients from imported Hugging Face checkpoints (CPU, gloo; one
process, or torchrun for TP=2), for tests/test_dpo_parity.py.

The policy and the reference are megaphi checkpoints imported from two different tiny
``Phi3ForCausalLM``. The run goes through the real phase: ``DPOPhase`` checks the data and
resolves the reference (``load_run_mixture``), ``prepare`` computes the reference log-probs with
a forward-only pass of the reference checkpoint (``collect_logps``) and stores them in the run
directory, the policy checkpoint is loaded as a run starting from it would, and one training
step's schedule and reduction run (``Trainer._run_schedule``, ``_reduce``) over one global batch
holding every pair of the dataset once (a micro-batch per row). Rank 0 saves the step's
metrics, every gradient as the full tensor under its Hugging Face name, and each pair's summed
policy and reference log-probs.

    torchrun --nproc-per-node 2 tests/workers/dpo_parity_worker.py OUT.pt POLICY REF PREFIX \\
        RUN_DIR --tp 2 --beta 0.1
"""

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

SEQ = 128


def main():
    parser = argparse.ArgumentParser()
    for name in ("out", "policy", "reference", "prefix", "run_dir"):
        parser.add_argument(name)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--beta", type=float, default=0.1)
    args = parser.parse_args()

    from megaphi.platform import configure_logging, init_runtime, shutdown_runtime

    configure_logging("WARNING")
    from megaphi.data.preference import PairSegments
    from megaphi.data.tokenizer import load_tokenizer
    from megaphi.eval import eval_config as config  # the checkpoint's config at tp=pp=1
    from megaphi.hf.mapping import megatron_to_hf
    from megaphi.model.builder import build_model
    from megaphi.model.partition import gather_full
    from megaphi.phases import get_phase
    from megaphi.phases.dpo import DPOPhase, collect_logps, pair_rows
    from megaphi.phases.run import load_run_mixture
    from megaphi.training.checkpoint import load_checkpoint, resolve_checkpoint
    from megaphi.training.metrics import MetricsWriter
    from megaphi.training.step import wrap_for_training
    from megaphi.training.trainer import Trainer

    policy = resolve_checkpoint(args.policy)
    run_dir = Path(args.run_dir)
    mixture = run_dir.with_suffix(".mix.yaml")
    if int(os.environ.get("RANK", 0)) == 0:
        run_dir.mkdir(parents=True, exist_ok=True)  # as megaphi-train does before prepare()
        mixture.write_text(f"train:\n  pairs: {{weight: 1.0, prefixes: [{args.prefix}]}}\n")
    overrides = ["phase.name=dpo", f"checkpoint.load={args.policy}",
                 f"dpo.reference={args.reference}", f"dpo.beta={args.beta}",
                 f"model.seq_length={SEQ}", "precision.dtype=fp32", f"data.mixture={mixture}",
                 f"train.run_dir={run_dir}", "train.micro_batch_size=1", "data.num_workers=0",
                 f"parallel.tp={args.tp}"]
    # every pair once: one global batch of one micro-batch per row
    n_rows = len(pair_rows(config(policy, overrides), PairSegments(args.prefix, SEQ), 0))
    rt = init_runtime(config(policy, overrides).parallel, seed=1)
    dist.barrier()  # the mixture file is written
    cfg = config(policy, [*overrides, f"train.global_batch_size={n_rows}"])
    phase = get_phase(cfg)
    assert isinstance(phase, DPOPhase)
    load_run_mixture(cfg, phase)  # DPOPhase.check_data: the reference and its fingerprint
    chunks = wrap_for_training(build_model(cfg), distributed_optimizer=False)
    layout = {"tp": rt.tp, "pp": rt.pp, "vpp": rt.vpp, "cp": rt.cp, "dp": rt.dp}
    phase.prepare(rt, chunks, layout)  # the reference checkpoint's log-probs of every pair
    load_checkpoint(policy, chunks, None, None, layout, load_optimizer=False,
                    load_progress=False)  # the policy, as a run starting from it
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    rows = pair_rows(cfg, PairSegments(args.prefix, SEQ, reference=phase.logps[args.prefix]),
                     tokenizer.pad_id)
    assert len(rows) == n_rows
    micro = [{k: v[None].to(rt.device) for k, v in rows[i].items()} for i in range(len(rows))]
    trainer = Trainer(cfg, rt, chunks, None, None, MetricsWriter("", False, enabled=False), phase)
    for chunk in chunks:
        chunk.zero_grad_buffer()
    metrics = trainer._reduce(trainer._run_schedule(micro, forward_only=False), micro)[0]
    grads = gather_full(chunks, grads=True)
    policy_logps = collect_logps(cfg, rt, chunks, [args.prefix], tokenizer, what="policy")
    if rt.rank == 0:
        hf = dict(megatron_to_hf(name, full, cfg.model) for name, full in grads.items())
        result = {"metrics": metrics, "grads": hf, "rows": len(rows),
                  "layout": (rt.tp, rt.pp, rt.dp),
                  "policy": policy_logps[args.prefix],
                  "reference": phase.logps[args.prefix]}
        torch.save(result, args.out + ".tmp")
        os.replace(args.out + ".tmp", args.out)
    shutdown_runtime()


if __name__ == "__main__":
    main()
