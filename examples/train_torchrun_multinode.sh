#!/usr/bin/env bash
# Several nodes with torchrun: run this on every node with the same MASTER_ADDR/PORT and its NODE_RANK.
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node001 GPUS_PER_NODE=8 TP=4 PP=2 bash examples/train_torchrun_multinode.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NNODES=${NNODES:?set NNODES} NODE_RANK=${NODE_RANK:?set NODE_RANK} MASTER_ADDR=${MASTER_ADDR:?set MASTER_ADDR}
MASTER_PORT=${MASTER_PORT:-29500} GPUS_PER_NODE=${GPUS_PER_NODE:-8} TP=${TP:-4} PP=${PP:-2}
NUM_LAYERS=${NUM_LAYERS:-32} HIDDEN=${HIDDEN:-4096} HEADS=${HEADS:-32} FFN=${FFN:-16384} SEQ=${SEQ:-4096}
MBS=${MBS:-2} GBS=${GBS:-1024} ITERS=${ITERS:-100000} SAVE=${SAVE:?set SAVE to a shared directory}
# The distributed optimizer shards the optimizer state over data-parallel ranks (DIST_OPT= turns it off).
export CUDA_DEVICE_MAX_CONNECTIONS=1
torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" pretrain_gpt_sparse.py \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --sequence-parallel \
  ${DIST_OPT---use-distributed-optimizer} \
  --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN" --num-attention-heads "$HEADS" --ffn-hidden-size "$FFN" \
  --squared-relu --seq-length "$SEQ" --max-position-embeddings "$SEQ" --position-embedding-type rope \
  --micro-batch-size "$MBS" --global-batch-size "$GBS" --train-iters "$ITERS" \
  --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 2000 --weight-decay 0.1 ${PRECISION---bf16} \
  --data-path "${DATA:?set DATA}" ${TOKENIZER_ARGS:---tokenizer-type NullTokenizer --vocab-size 257} \
  --save "$SAVE" --load "$SAVE" --load-optional --save-interval 1000 --eval-interval 1000 --eval-iters 20 --log-interval 10 "$@"
