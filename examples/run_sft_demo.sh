#!/usr/bin/env bash
# The CPU SFT demo, from a fresh clone: pre-train the tiny model first if runs/tiny-demo has no
# checkpoint (examples/run_demo.sh), preprocess the shipped Python-FAQ conversations as chat
# data, fine-tune on them with 2 processes at TP=2 (examples/tiny_sft.yaml), then evaluate the
# assistant-token loss of the held-out conversations before and after with megaphi-eval.
# Extra arguments are config overrides of the SFT run, e.g. train.iters=20.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f runs/tiny-demo/checkpoints/latest ] || bash examples/run_demo.sh
bash tools/setup_env.sh >/dev/null
PY=.venv/bin/python
for split in train valid; do
  prefix=examples/data/chat/faq_$split
  [ -f "$prefix.meta.json" ] || $PY tools/preprocess_data.py --format chat \
    --input "$prefix.jsonl" --output-prefix "$prefix"
done
$PY -m torch.distributed.run --nproc-per-node 2 -m megaphi.train --config examples/tiny_sft.yaml "$@"
for ckpt in runs/tiny-demo runs/tiny-sft; do
  echo "assistant-token loss of the held-out conversations, $ckpt:"
  .venv/bin/megaphi-eval --ckpt "$ckpt" --data examples/data/chat/faq_valid --json \
    model.seq_length=512 data.overlong=truncate 2>&1 | tail -1
done
