#!/usr/bin/env bash
# The CPU Pivotal Token Search demo, from a fresh clone, in about three minutes on two cores:
#   1. the toy task (tools/build_arithmetic_task.py): one-digit addition up to 4 + 4, answers as
#      "3 + 4 = \boxed{7}.", with a character-level tokenizer (128 embedding rows);
#   2. a tiny policy: 40 pre-training steps on the solutions as text, then 100 SFT steps on the
#      conversations, which leaves it right about a third to half of the time;
#   3. PTS with that policy on 2 data-parallel processes (torchrun): 16 rollouts per estimate,
#      pairs confirmed with fresh rollouts; the summary line gives questions kept, pivots and
#      rollouts per pivot;
#   4. the pairs preprocessed as DPO token pairs, one DPO run from the SFT model, and
#      megaphi-eval of the pairs' DPO loss and reward accuracy before (all ties) and after.
# Everything goes to runs/pts-demo/. Extra arguments are passed to pivotal_token_search.py
# (e.g. --rollouts 32).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh >/dev/null
PY=.venv/bin/python
out=runs/pts-demo
mkdir -p "$out"
TINY=(--preset tiny "data.tokenizer=$out/tok" model.vocab_size=128 model.seq_length=128
      train.micro_batch_size=8 train.global_batch_size=8 data.num_workers=0
      logging.tensorboard=false checkpoint.keep_last=1)

$PY tools/build_arithmetic_task.py --digits 1 --max-operand 4 --style direct --count 2000 \
  --sft "$out/sft.jsonl" --text "$out/text.jsonl" --questions "$out/questions_all.jsonl" \
  --tokenizer "$out/tok"
head -n 24 "$out/questions_all.jsonl" > "$out/questions.jsonl"
for name in text sft; do
  format=$([ "$name" = sft ] && echo chat || echo text)
  $PY tools/preprocess_data.py --input "$out/$name.jsonl" --output-prefix "$out/$name" \
    --format "$format" --tokenizer "$out/tok" --no-progress
  printf 'train:\n  add: {weight: 1.0, prefixes: [%s]}\n' "$name" > "$out/$name.yaml"  # relative to the file
done

[ -f "$out/pre/checkpoints/latest" ] || $PY -m megaphi.train "${TINY[@]}" \
  "data.mixture=$out/text.yaml" "train.run_dir=$out/pre" train.iters=40 optimizer.lr=3e-3 \
  schedule.warmup_iters=5 train.log_interval=10
[ -f "$out/sft/checkpoints/latest" ] || $PY -m megaphi.train "${TINY[@]}" phase.name=sft \
  "checkpoint.load=$out/pre" "data.mixture=$out/sft.yaml" "train.run_dir=$out/sft" \
  train.iters=100 optimizer.lr=4e-3 schedule.warmup_iters=5 train.log_interval=20

# resumable: a rerun (or a relaunch after a kill) continues where the last one stopped
$PY -m torch.distributed.run --nproc-per-node 2 tools/pivotal_token_search.py \
  --questions "$out/questions.jsonl" --policy "$out/sft" --output "$out/pairs.jsonl" \
  --rollouts 16 --max-new-tokens 24 "$@"

$PY tools/preprocess_data.py --format preference --input "$out/pairs.jsonl" \
  --output-prefix "$out/pairs" --tokenizer "$out/tok" --no-progress
printf 'train:\n  pts: {weight: 1.0, prefixes: [pairs]}\n' > "$out/pairs.yaml"
rm -rf "$out/dpo"
$PY -m megaphi.train "${TINY[@]}" phase.name=dpo "checkpoint.load=$out/sft" \
  "data.mixture=$out/pairs.yaml" "train.run_dir=$out/dpo" train.iters=12 \
  train.global_batch_size=2 train.micro_batch_size=1 optimizer.lr=3e-3 optimizer.min_lr=3e-3 \
  schedule.warmup_iters=0 optimizer.weight_decay=0.0 dpo.beta=0.5 train.log_interval=4
for ckpt in "$out/sft" "$out/dpo"; do
  echo "DPO loss and reward accuracy of the PTS pairs, $ckpt against $out/sft:"
  $PY -m megaphi.eval --ckpt "$ckpt" --reference "$out/sft" --data "$out/pairs" --beta 0.5 \
    --json 2>"$out/eval.log" | tail -1
done
