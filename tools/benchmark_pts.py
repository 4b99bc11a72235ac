"""Measure Pivotal Token Search: rollouts per second of the megaphi backend against transformers'
generate, and estimates per pivot of the log-prob split against the token split.

A thin command line over :mod:`megaphi.pts.benchmark`; run with ``--help`` for details.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import tempfile
from pathlib import Path

PROG = "benchmark_pts"

DESCRIPTION = """\
Two measurements of Pivotal Token Search (Phi-4 report, section 4.3), side by side in one run:

  1. rollouts per second: PTS estimates p(success) of a prefix from N rollouts, each with its
     token log-probs. The megaphi backend (MegaphiBackend.sample on an InferenceModel: the N
     rollouts as one batch on one KV cache) against Hugging Face transformers' generate
     (num_return_sequences=N, do_sample, output_logits, the log-probs computed from the logits)
     on the same model: the --policy checkpoint, exported with export_hf_checkpoint and loaded
     with AutoModelForCausalLM, both fp32 on the CPU, in this process (transformers without
     the torch function mode megaphi's CPU path needs, as in a process of its own), with the
     same chat prompt, batch, temperature, top-p (no top-k) and length: no stop ids, so every
     rollout is exactly --max-new-tokens long. After --warmup untimed batches of each, --repeats
     repetitions each time one batch of each arm, the order alternating. A batch's time is
     the median over the repetitions; rollouts/s and tokens/s follow from it, and the ratio
     megaphi/transformers (the goal is >= 1x) is reported, with the same for the fastest
     batch of each (the least disturbed by other work on the machine) and how far the two
     arms' log-probs of one rollout differ (the same model gives ~1e-6).
  2. estimates per pivot: the bisection of Figure 4 (pivotal_tokens: split at the midpoint of
     cumulative log-probability) against the same bisection split at the token midpoint (as
     codelion/pts does), on planted completions of n = 64, 256, 512 tokens with k = 1, 2, 4
     pivots (5 seeds each): p(success) jumps at the pivots (near-monotone), whose log-probs
     are -2..-4 while the other tokens' are about -0.05. Counts the distinct prefixes each
     estimates, per pivot found, and whether both find the same pivots.

Without --policy it writes the tiny preset's model with random initial weights into a
temporary directory (rollout speed does not depend on the weights). Figures, never
assertions; timings on a machine shared with other work vary from run to run."""

EPILOG = """\
examples:
  %(prog)s                                       # tiny random model, 16 rollouts of 64 tokens
  %(prog)s --policy runs/sft --rollouts 40 --max-new-tokens 256 --threads 8 --json

exit status: 0 on success, 2 on bad arguments or a --policy that is not a usable checkpoint."""

logger = logging.getLogger("megaphi.pts.benchmark")


class PolicyError(Exception):
    """--policy is not a usable checkpoint (the message names it and the fix)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", metavar="CKPT", help="a megaphi checkpoint (run directory, its "
                   "checkpoints/ or one iter_* directory); default: the tiny preset with random "
                   "weights, written to a temporary directory")
    p.add_argument("--rollouts", type=int, default=16, metavar="N",
                   help="rollouts per batch (one PTS estimate; default 16)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="T",
                   help="tokens per rollout, exactly (default 64)")
    p.add_argument("--repeats", type=int, default=5, metavar="R",
                   help="timed batches per arm (default 5)")
    p.add_argument("--warmup", type=int, default=1, metavar="W",
                   help="untimed batches per arm first (default 1)")
    p.add_argument("--threads", type=int, metavar="K",
                   help="torch.set_num_threads for both arms (default: torch's current count)")
    p.add_argument("--temperature", type=float, default=1.0, help="default 1.0 (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="default 1.0")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--json", action="store_true",
                   help="print every figure as one JSON line instead of the tables")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    return p


def check_args(args) -> None:
    """Raise ``ConfigError`` for a bad numeric option."""
    from megaphi.config import ConfigError

    at_least = {"--rollouts": (args.rollouts, 1), "--max-new-tokens": (args.max_new_tokens, 1),
                "--repeats": (args.repeats, 1), "--warmup": (args.warmup, 0)}
    if args.threads is not None:
        at_least["--threads"] = (args.threads, 1)
    for flag, (value, low) in at_least.items():
        if value < low:
            raise ConfigError(flag, f"must be at least {low}, got {value}",
                              f"pass {flag} {max(low, 1)} or more")
    if not args.temperature >= 0.0:
        raise ConfigError("--temperature", f"must be >= 0, got {args.temperature}",
                          "pass 0 (greedy) or a positive temperature")
    if not 0.0 < args.top_p <= 1.0:
        raise ConfigError("--top-p", f"must be in (0, 1], got {args.top_p}",
                          "pass a value in (0, 1]; 1 keeps every token")


def table(header, rows, left: int = 0) -> str:
    """Rows under a header, the first ``left`` columns left-aligned, the others right."""
    cells = [list(header)] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if i < left else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))) for row in cells)


def report(speed: dict, search: dict) -> str:
    m = speed["model"]
    lines = [
        f"1. rollouts: megaphi backend vs transformers generate on the same model "
        f"({m['layers']} layers, hidden {m['hidden_size']}, vocabulary {m['vocab_size']:,}), "
        f"fp32 on {speed['device']}, {speed['threads']} thread(s); {speed['rollouts']} "
        f"rollouts of {speed['max_new_tokens']} tokens per batch after a "
        f"{speed['prompt_tokens']}-token prompt, temperature {speed['temperature']:g}, top-p "
        f"{speed['top_p']:g}; {speed['warmup']} warm-up + {speed['repeats']} timed batches per "
        "arm, interleaved",
        table(["arm", "batch_s", "rollouts/s", "tokens/s", "best_batch_s", "best_rollouts/s"],
              [[name, f"{speed[key]['batch_time_s']:.3f}",
                f"{speed[key]['rollouts_per_s']:,.2f}", f"{speed[key]['tokens_per_s']:,.0f}",
                f"{speed[key]['best_batch_time_s']:.3f}",
                f"{speed[key]['best_rollouts_per_s']:,.2f}"]
               for key, name in (("megaphi", "megaphi"),
                                 ("hf", f"transformers ({speed['hf_attention']})"))],
              left=1),
        f"megaphi / transformers: {speed['ratio']:.2f}x rollouts/s, median batches (goal >= "
        f"1x: {'met' if speed['ratio'] >= 1.0 else 'NOT met'}); {speed['best_ratio']:.2f}x "
        f"for the fastest batches; the arms' log-probs of one rollout differ by at most "
        f"{speed['logprob_max_abs_diff']:.2g}",
        "",
        f"2. estimates per pivot on planted completions (p_gap {search['p_gap']:g}, "
        f"{search['seeds']} seeds per row): split at the log-prob midpoint (Figure 4) vs the "
        "token midpoint",
    ]
    rows = []
    for r in search["settings"]:
        lp, tok = r["logprob"], r["token"]
        rows.append([r["n"], r["k"], r["planted"], lp["found"], tok["found"],
                     "yes" if r["same_pivots"] else "no", f"{lp['mean_estimates']:.1f}",
                     f"{tok['mean_estimates']:.1f}", _per_pivot(lp), _per_pivot(tok),
                     f"{r['token_over_logprob']:.2f}x", f"{r['bound']:.0f}", r["scan"]])
    lines.append(table(["n", "k", "planted", "found_lp", "found_tok", "same", "est_lp",
                        "est_tok", "est/pivot_lp", "est/pivot_tok", "tok/lp", "2+2klog2n",
                        "scan"], rows))
    return "\n".join(lines)


def _per_pivot(split: dict) -> str:
    value = split["estimates_per_pivot"]
    return "n/a" if value is None else f"{value:.2f}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megaphi.config import ConfigError

    try:
        check_args(args)  # before torch is imported: a bad option is refused at once
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    from megaphi.platform import configure_logging

    configure_logging("WARNING")
    if not args.quiet:
        logging.getLogger("megaphi").setLevel("INFO")
    import torch
    import transformers

    from megaphi.pts import benchmark

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    work = Path(tempfile.mkdtemp(prefix="benchmark_pts."))
    try:
        policy = args.policy
        if policy is None:
            from megaphi.data.tokenizer import load_tokenizer

            needed = len(benchmark.prompt_ids(load_tokenizer("phi4"))) + args.max_new_tokens
            seq = None if needed <= 256 else 64 * math.ceil(needed / 64)  # tiny's is 256
            policy = str(benchmark.random_checkpoint(work / "policy", seq_length=seq))
        try:
            plan = benchmark.plan_rollouts(policy, args.max_new_tokens)
        except ConfigError:
            raise
        except ValueError as exc:  # not a checkpoint, or a tokenizer without chat tokens
            raise PolicyError(f"--policy {policy}: {exc}") from None
        speed = benchmark.run_rollouts(
            plan, work, rollouts=args.rollouts, max_new_tokens=args.max_new_tokens,
            repeats=args.repeats, warmup=args.warmup, temperature=args.temperature,
            top_p=args.top_p, seed=args.seed)
    except (ConfigError, PolicyError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("planted completions: counting estimates of both splits")
    search = benchmark.compare_splits()
    if args.json:
        print(json.dumps({"policy": args.policy, "rollout_speed": speed, "search_cost": search}))
    else:
        print(report(speed, search))
    return 0


if __name__ == "__main__":
    sys.exit(main())
