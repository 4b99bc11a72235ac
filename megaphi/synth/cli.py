"""``megaphi-synth``: run a synthetic-data workflow against an OpenAI-compatible endpoint."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional

PROG = "megaphi-synth"

DESCRIPTION = """\
Run a synthetic-data workflow of the Phi-4 report (examples/synth/*.yaml: its kind, its prompt
templates, per-step sampling, settings) over a JSON-lines input, against any OpenAI-compatible
chat endpoint (vLLM, SGLang, a hosted API, megaphi-serve).

Requests run concurrently up to --concurrency; 429, 5xx, timeouts and malformed responses are
retried with exponential backoff and jitter; a request that still fails is recorded in
OUT.failures.jsonl with its error and counted, and its item is retried by the next run. Every
request is cached in SQLite (--cache, keyed by model, sampling and messages): a rerun makes no
request it has made before (--no-cache or a new --seed bypasses it). The output is append-only
and resumable: rerun the same command after a kill. Every record carries its provenance
(workflow, step, model, parameters, template name and hash, raw output, token counts,
attempts). The API key is read from --api-key-env and never logged or stored.

A step can go to another endpoint or model than the rest (--step-endpoint, --step-model,
--step-api-key-env STEP=...): in Phi-4's DPO round 2 the policy writes the responses and
GPT-4o judges them."""

EPILOG = """\
examples:
  megaphi-synth run examples/synth/plurality_vote.yaml --input questions.jsonl \\
      --output curated.jsonl --endpoint http://127.0.0.1:8000/v1 --model phi4
  megaphi-synth run examples/synth/judge_pairs.yaml --input prompts.jsonl \\
      --output pairs.jsonl --endpoint $URL --model $MODEL --concurrency 64 \\
      --step-endpoint judge=https://api.openai.com/v1 --step-model judge=gpt-4o
then: python tools/preprocess_data.py --format preference --input pairs.jsonl ...

sharding (a SLURM array): --shard-index/--num-shards default to SLURM_ARRAY_TASK_ID and
SLURM_ARRAY_TASK_COUNT; shard I of N takes every N-th input line from line I and writes
OUT's stem + .shard-I-of-N + its suffix, then a .done marker when all its items are done.

exit status: 0 when every item is done, 1 when some failed (rerun to retry them), 2 on bad
arguments or input."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a workflow", description=DESCRIPTION, epilog=EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("workflow", metavar="WORKFLOW.yaml")
    run.add_argument("--input", required=True, metavar="IN.jsonl")
    run.add_argument("--output", required=True, metavar="OUT.jsonl")
    run.add_argument("--endpoint", metavar="URL",
                     help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (every "
                          "kind but execution_validation)")
    run.add_argument("--model", metavar="NAME", help="the model the endpoint serves")
    run.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="VAR",
                     help="environment variable holding the API key (default OPENAI_API_KEY)")
    for flag, what in (("endpoint", "URL"), ("model", "NAME"), ("api-key-env", "VAR")):
        run.add_argument(f"--step-{flag}", action="append", default=[], metavar=f"STEP={what}",
                         help=f"the --{flag} of one step of the workflow (repeatable)")
    run.add_argument("--concurrency", type=int, default=16)
    run.add_argument("--max-retries", type=int, default=5)
    run.add_argument("--timeout", type=float, default=300.0, help="seconds per attempt")
    run.add_argument("--cache", metavar="PATH",
                     help="SQLite request cache (default: OUT.cache.sqlite)")
    run.add_argument("--no-cache", action="store_true",
                     help="make every request (the answers still refresh the cache)")
    run.add_argument("--seed", type=int, default=None,
                     help="seed of every request (part of the cache key)")
    run.add_argument("--shard-index", type=int,
                     default=int(os.environ.get("SLURM_ARRAY_TASK_ID", 0)))
    run.add_argument("--num-shards", type=int,
                     default=int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1)))
    run.add_argument("--no-progress", action="store_true")
    return p


def shard_output(output: str, index: int, count: int) -> str:
    if count == 1:
        return output
    path = Path(output)
    return str(path.with_name(f"{path.stem}.shard-{index}-of-{count}{path.suffix}"))


def step_overrides(args, steps) -> Dict[str, Dict[str, str]]:
    """``{step: {"endpoint"|"model"|"api_key_env": value}}`` from the --step-* flags."""
    from megaphi.synth.client import SynthError

    out: Dict[str, Dict[str, str]] = {}
    for flag in ("endpoint", "model", "api_key_env"):
        for item in getattr(args, f"step_{flag}"):
            step, sep, value = item.partition("=")
            name = f"--step-{flag.replace('_', '-')}"
            if not sep or not value:
                raise SynthError(f"{name} {item!r}: give STEP=VALUE")
            if step not in steps:
                raise SynthError(f"{name} {item!r}: this workflow's steps are "
                                 f"{', '.join(steps) or 'none'}")
            out.setdefault(step, {})[flag] = value
    return out


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    # megaphi.platform.configure_logging's format, without importing torch for a client
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("megaphi.synth")
    logging.getLogger("megaphi").setLevel("INFO")
    from megaphi.synth.cache import RequestCache
    from megaphi.synth.client import ChatClient, SynthError
    from megaphi.synth.workflow import WorkflowSpec, load_inputs, run_workflow

    def fail(message: str) -> int:
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2

    if not 0 <= args.shard_index < args.num_shards:
        return fail(f"--shard-index must be in [0, --num-shards), got {args.shard_index} of "
                    f"{args.num_shards}")
    output = shard_output(args.output, args.shard_index, args.num_shards)
    try:
        spec = WorkflowSpec.load(args.workflow)
        from megaphi.synth.workflows import KINDS

        if KINDS[spec.kind].steps and not (args.endpoint and args.model):
            return fail(f"{spec.kind} sends requests: give --endpoint URL and --model NAME")
        try:
            inputs = load_inputs(args.input)
        except OSError as exc:
            return fail(f"--input {args.input}: {exc.strerror}")
        client_cache = RequestCache(args.cache or output + ".cache.sqlite",
                                    read=not args.no_cache)
        client = ChatClient(args.endpoint or "http://127.0.0.1/v1", args.model or "none",
                            args.api_key_env, args.concurrency, args.max_retries, args.timeout,
                            client_cache)  # a kind without steps never calls it
        step_clients = {
            step: ChatClient(o.get("endpoint", args.endpoint), o.get("model", args.model),
                             o.get("api_key_env", args.api_key_env), args.concurrency,
                             args.max_retries, args.timeout, client_cache)
            for step, o in step_overrides(args, KINDS[spec.kind].steps).items()}
    except (SynthError, OSError) as exc:
        return fail(str(exc))
    log.info("%s (%s): %d items from %s, shard %d of %d -> %s; %s, model %s, concurrency %d",
             spec.name, spec.kind, len(inputs), args.input, args.shard_index, args.num_shards,
             output, args.endpoint, args.model, args.concurrency)
    for step, c in step_clients.items():
        log.info("step %s: %s, model %s", step, c.endpoint, c.model)

    async def go():
        try:
            return await run_workflow(spec, inputs, client, output, seed=args.seed,
                                      progress=not args.no_progress,
                                      shard=(args.shard_index, args.num_shards),
                                      step_clients=step_clients)
        finally:
            for c in (client, *step_clients.values()):
                await c.close()

    try:
        summary = asyncio.run(go())
    except SynthError as exc:
        return fail(str(exc))
    finally:
        client_cache.close()
    log.info("%d items: %d kept, %d dropped by the workflow, %d failed (in %s.failures.jsonl),"
             " %d done before; %d requests (%d retries), %d from the cache, %d in flight at "
             "most, %.1f s", summary["items"], summary["kept"], summary["dropped"],
             summary["failed"], output, summary["done_before"], summary["requests"],
             summary["retries"], summary["cache_hits"], summary["max_in_flight"],
             summary["seconds"])
    if summary["failed"] == 0:
        Path(output + ".done").write_text(json.dumps(summary) + "\n")
    print(json.dumps(summary))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
