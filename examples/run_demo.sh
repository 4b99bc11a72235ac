#!/usr/bin/env bash
# The CPU demo, from a fresh clone: set up .venv, preprocess the shipped sample corpus into
# Megatron indexed datasets, and train the tiny Phi-4-shaped model on the Phi-4 mixture with
# 2 processes at TP=2. Extra arguments are config overrides, e.g. train.iters=50.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
PY=.venv/bin/python
for source in web web_rewrites synthetic code acquired; do
  prefix=examples/data/sample/$source
  [ -f "$prefix.meta.json" ] || $PY tools/preprocess_data.py --input "$prefix.jsonl" --output-prefix "$prefix"
done
$PY tools/data_mix_report.py examples/phi4_pretrain_mixture.yaml --train-tokens 1M
$PY -m torch.distributed.run --nproc-per-node 2 -m megaphi.train --config examples/tiny_demo.yaml "$@"
