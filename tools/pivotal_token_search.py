#!/usr/bin/env python
"""Pivotal Token Search (Phi-4 report §4.3) over a file of questions with checkable answers,
writing DPO token pairs; see megaphi/pts/run.py and --help."""

from __future__ import annotations

import argparse
import json
import logging
import sys

PROG = "pivotal_token_search"

DESCRIPTION = """\
For each question, sample --rollouts completions with the policy and check them with the
question's oracle (type math: math-verify against "answer"; choice: the option letter; code:
"tests" run in the sandbox). Questions whose success rate lies in [--p-min, --p-max] are
searched: the first sampled solution is bisected at the midpoint of its cumulative token
log-probability (Figure 4) to find the tokens where p(success) changes by --p-gap or more, each
prefix estimated once by --rollouts rollouts. Each pivot becomes a token pair (the DPO data
format: prompt, prefix_ids, chosen_token_id, rejected_token_id) whose two tokens come from the
rollouts already drawn at its prefix, confirmed with fresh rollouts unless --no-confirm.
Everything stays in token ids. The output is resumable: rerun the same command after a kill.

Defaults: --rollouts 40 and --p-gap 0.2. With N rollouts an estimate's standard error is up
to 0.5/sqrt(N) and a difference of two estimates' 0.71/sqrt(N) (0.11 at N=40), so a fake pivot
of 0.2 needs a 1.8-sigma fluctuation (about 7% per comparison where p is flat near 0.5; 44%
at N=10); the confirmation with fresh rollouts removes most of those."""

EPILOG = """\
examples:
  %(prog)s --questions q.jsonl --policy runs/sft --output pairs.jsonl
  %(prog)s --questions q.jsonl --endpoint http://127.0.0.1:8000/v1 --model phi4 \\
      --output pairs.jsonl --rollouts 64
then: python tools/preprocess_data.py --format preference --input pairs.jsonl --output-prefix P

data parallel: under torchrun each process loads the policy (on cuda:LOCAL_RANK when there are
GPUs) and searches every WORLD_SIZE-th question, all appending to the same --output:
  torchrun --nproc-per-node 8 tools/pivotal_token_search.py --questions q.jsonl \\
      --policy runs/sft --output pairs.jsonl

exit status: 0 on success, 2 on bad arguments or input."""


def build_parser() -> argparse.ArgumentParser:
    from megaphi.pts.estimate import DEFAULT_P_GAP, DEFAULT_ROLLOUTS

    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", required=True, metavar="Q.jsonl",
                   help='{"id", "messages" or "question", "type": math|choice|code, '
                        '"answer" or "tests"} per line')
    policy = p.add_mutually_exclusive_group(required=True)
    policy.add_argument("--policy", metavar="CKPT", help="a megaphi checkpoint (megaphi backend)")
    policy.add_argument("--endpoint", metavar="URL",
                        help="an OpenAI-compatible base URL taking token-id prompts and "
                             "returning token ids (vLLM, SGLang, megaphi-serve)")
    p.add_argument("--model", default="megaphi", help="the endpoint's model name")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                   help="environment variable holding the endpoint's API key")
    p.add_argument("--tokenizer", default="phi4",
                   help="with --endpoint: the policy's tokenizer (phi4 or a HF directory)")
    p.add_argument("--output", required=True, metavar="pairs.jsonl")
    p.add_argument("--rollouts", type=int, default=DEFAULT_ROLLOUTS, metavar="N")
    p.add_argument("--p-gap", type=float, default=DEFAULT_P_GAP)
    p.add_argument("--p-min", type=float, default=0.2)
    p.add_argument("--p-max", type=float, default=0.8)
    p.add_argument("--no-confirm", action="store_true",
                   help="keep pairs without re-estimating them with fresh rollouts")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="megaphi backend: cpu, cuda or cuda:N (default: "
                                     "cuda:LOCAL_RANK when CUDA is available, else cpu)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from megaphi.platform import configure_logging

    configure_logging("INFO")
    log = logging.getLogger("megaphi.pts")
    from megaphi.pts.backends import MegaphiBackend, OpenAIBackend, Sampling
    from megaphi.pts.run import QuestionError, SearchSettings, load_questions, run, stop_ids

    try:
        settings = SearchSettings(args.rollouts, args.p_gap, args.p_min, args.p_max,
                                  not args.no_confirm, args.seed)
        questions = load_questions(args.questions)
    except (QuestionError, ValueError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    from megaphi.oracles import check

    def is_correct(question, text):
        return check(question, text).correct

    import os

    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    model = None
    try:
        if args.policy:
            import torch

            from megaphi.inference import InferenceModel

            device = args.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                                     if torch.cuda.is_available() else "cpu")
            model = InferenceModel.from_checkpoint(args.policy, device=device)
            tokenizer = model.tokenizer
        else:
            from megaphi.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(args.tokenizer)
        sampling = Sampling(args.temperature, args.top_p, args.max_new_tokens,
                            tuple(stop_ids(tokenizer)))
        backend = MegaphiBackend(model, sampling) if model else OpenAIBackend(
            args.endpoint, args.model, sampling, api_key_env=args.api_key_env)
        log.info("%d questions from %s; %s backend; %d rollouts per estimate, p_gap %g%s",
                 len(questions), args.questions, "megaphi" if model else "openai",
                 settings.rollouts, settings.p_gap,
                 f"; process {rank} of {world_size}" if world_size > 1 else "")
        result = run(questions, tokenizer, backend, is_correct, settings, args.output,
                     progress=not args.no_progress and rank == 0,
                     rank=rank, world_size=world_size)
    finally:
        if model is not None:
            model.close()
    if result is None:  # another process finishes the file and reports
        return 0
    log.info("questions %d, kept by the filter %d, pivots %d (%.2f per kept question), pairs "
             "%d (%d not confirmed), rollouts per pivot %s", result["questions"],
             result["kept"], result["pivots"], result["pivots_per_kept_question"],
             result["pairs"], result["unconfirmed"],
             "n/a" if result["rollouts_per_pivot"] is None else
             f"{result['rollouts_per_pivot']:.0f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
