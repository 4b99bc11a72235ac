#!/usr/bin/env bash
# Phi-4 14B pre-training with torchrun, on one node or many (run this on every node).
#   NNODES=16 NODE_RANK=0 MASTER_ADDR=node001 bash examples/launch/pretrain_14b_torchrun.sh [key=value ...]
# Layout (examples/phi4_14b_pretrain.yaml): TP=2 x PP=4 fills an 8-GPU node, sequence parallel,
# distributed optimizer; DP = nodes. Global batch 5,760 x 4,096 tokens.
set -euo pipefail
cd "$(dirname "$0")/../.."
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
export CUDA_DEVICE_MAX_CONNECTIONS=1  # Megatron's TP communication overlap needs ordered kernels
exec python -m torch.distributed.run \
  --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m megaphi.train --config examples/phi4_14b_pretrain.yaml "$@"
