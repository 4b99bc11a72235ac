"""``megaphi-generate``: complete a prompt with a megaphi checkpoint.

``python -m megaphi.generate`` works too.

    megaphi-generate --ckpt runs/sft --prompt "What is 2+2?" --chat
    megaphi-generate --ckpt ckpt/phi4 --prompt "def fib(n):" --max-new-tokens 64 \\
        --temperature 0.7 --top-p 0.95 --seed 1 --json

The checkpoint (saved at any TP / PP, or imported from Hugging Face) is loaded whole into this
process (GPU when there is one), and the completion is generated with a KV cache by
:class:`megaphi.inference.InferenceModel`. ``--chat`` wraps the prompt in Phi-4's chat template
and stops at ``<|im_end|>``; a plain prompt stops at ``<|im_end|>`` or ``<|endoftext|>``.
``--json`` prints one JSON object (``token_ids``, ``text``, ``finish_reason``, ...) for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import List, Optional

PROG = "megaphi-generate"

# Megatron-Core's checkpoint loading goes through deprecated torch APIs; users cannot act on it.
_LOAD_NOISE = (r".*`load_state_dict` is deprecated.*", r".*deprecating ShardedTensor.*")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Generate text with a megaphi checkpoint (greedy by default; temperature and "
                    "top-p sampling with --temperature/--top-p). The checkpoint's tokenizer "
                    "(data.tokenizer) encodes the prompt and decodes the completion.",
        epilog="examples:\n  megaphi-generate --ckpt runs/sft --prompt 'What is 2+2?' --chat\n"
               "  megaphi-generate --ckpt ckpt/phi4 --prompt 'def fib(n):' --temperature 0.7 "
               "--top-p 0.95 --seed 1 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, metavar="CKPT",
                        help="a run directory, its checkpoints/ directory or one iter_* directory")
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--chat", action="store_true",
                        help="apply Phi-4's chat template (one user turn) and stop at <|im_end|>")
    parser.add_argument("--system", default=None, help="system message (with --chat)")
    parser.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                        help="at most N new tokens (default: 256)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature; 0 is greedy (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus sampling threshold in (0, 1] (default: 1, off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                        help="compute dtype (default: the checkpoint's precision.dtype)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object with token_ids, text, finish_reason, ...")
    return parser


def check_args(args) -> Optional[str]:
    """The first problem with the arguments, or None."""
    from megaphi.inference import check_sampling

    if args.system is not None and not args.chat:
        return "--system applies to --chat; add --chat or drop --system"
    try:
        check_sampling(args.max_new_tokens, args.temperature, args.top_p)
    except ValueError as exc:
        return (str(exc).replace("max_new_tokens", "--max-new-tokens")
                .replace("top_p", "--top-p").replace("temperature", "--temperature", 1))
    return None


def check_prompt_fits(iter_dir, args) -> None:
    """Refuse, before the model is loaded, a prompt that with ``--max-new-tokens`` exceeds the
    model's context (``model.seq_length``)."""
    from megaphi.data.tokenizer import load_tokenizer
    from megaphi.inference import chat_prompt, checkpoint_config

    cfg = checkpoint_config(iter_dir)
    text = chat_prompt(args.prompt, args.system) if args.chat else args.prompt
    length = len(load_tokenizer(cfg.data.tokenizer).encode(text))
    if length + args.max_new_tokens > cfg.model.seq_length:
        raise ValueError(f"the prompt ({length} tokens) plus --max-new-tokens "
                         f"{args.max_new_tokens} exceed the model's context of "
                         f"{cfg.model.seq_length} tokens (model.seq_length); shorten the prompt "
                         "or lower --max-new-tokens")


def stop_ids(tokenizer, chat: bool) -> List[int]:
    """``<|im_end|>`` in chat mode; also the end-of-document token for plain prompts."""
    from megaphi.data.chat import chat_token_ids

    im_end = chat_token_ids(tokenizer).im_end  # Phi-4's, or a tokenizer directory's
    return [im_end] if chat else sorted({im_end, tokenizer.eod_id})


def generate_text(model, prompt: str, chat: bool = False, system: Optional[str] = None,
                  max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                  seed: Optional[int] = 0) -> dict:
    """Generate a completion of ``prompt`` with an :class:`~megaphi.inference.InferenceModel`;
    returns what ``--json`` prints."""
    from megaphi.inference import chat_prompt

    tokenizer = model.tokenizer
    text = chat_prompt(prompt, system) if chat else prompt
    prompt_ids = tokenizer.encode(text)
    stops = stop_ids(tokenizer, chat)
    (out,) = model.generate(prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, stop_ids=stops, seed=seed)
    body = out.token_ids[:-1] if out.finish_reason == "stop" else out.token_ids
    return {"text": tokenizer.decode(body), "token_ids": out.token_ids,
            "finish_reason": out.finish_reason, "prompt_token_ids": prompt_ids,
            "logprobs": out.logprobs, "checkpoint": str(model.checkpoint)}


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from megaphi.platform import configure_logging

    configure_logging("WARNING")
    for pattern in _LOAD_NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    problem = check_args(args)
    if problem:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 2
    from megaphi.config import ConfigError
    from megaphi.inference import CheckpointNotFound, InferenceModel, resolve_checkpoint

    try:
        check_prompt_fits(resolve_checkpoint(args.ckpt), args)  # before loading the model
        with InferenceModel.from_checkpoint(args.ckpt, device=args.device,
                                            dtype=args.dtype) as model:
            result = generate_text(model, args.prompt, chat=args.chat, system=args.system,
                                   max_new_tokens=args.max_new_tokens,
                                   temperature=args.temperature, top_p=args.top_p,
                                   seed=args.seed)
    except (CheckpointNotFound, ConfigError, ValueError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(result["text"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
