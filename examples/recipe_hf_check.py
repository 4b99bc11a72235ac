#!/usr/bin/env python
"""The recipe's last stage (examples/run_recipe.sh): load a Hugging Face export with transformers,
compare its logits on a chat prompt with megaphi's for the checkpoint it came from (fp32), and
generate from the prompt with transformers (greedy)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", required=True, help="the megaphi checkpoint that was exported")
    p.add_argument("--hf", required=True, help="the exported Hugging Face directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--json", metavar="FILE", help="also write the figures here")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megaphi.inference import InferenceModel, chat_prompt

    tokenizer = AutoTokenizer.from_pretrained(args.hf)
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                            add_generation_prompt=True, return_dict=False)
    else:  # a tokenizer without a template (the recipe's character-level one): Phi-4's format
        ids = tokenizer(chat_prompt(args.prompt), add_special_tokens=False)["input_ids"]
    tokens = torch.tensor([ids])
    model = AutoModelForCausalLM.from_pretrained(args.hf, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(tokens).logits
        out = model.generate(tokens, max_new_tokens=args.max_new_tokens, do_sample=False)
    with InferenceModel.from_checkpoint(args.ckpt, device="cpu", dtype="fp32") as megaphi:
        ours = megaphi.logits(tokens)
    diff = (ours.float() - theirs.float()).abs().max().item()
    text = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    result = {"prompt_tokens": len(ids), "max_abs_logit_diff": diff,
              "logit_scale": theirs.abs().max().item(), "generated": text}
    print(f"transformers loaded {args.hf}: max |logit difference| against megaphi on the "
          f"{len(ids)}-token chat prompt: {diff:.2e} (logits up to {result['logit_scale']:.1f})")
    print(f"transformers generate, greedy: {args.prompt!r} -> {text!r}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
