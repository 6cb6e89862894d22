#!/usr/bin/env bash
# One node, several GPUs: tensor (+ sequence) and pipeline parallelism, data parallel over the rest.
#   GPUS=8 TP=2 PP=2 NUM_LAYERS=32 HIDDEN=4096 HEADS=32 bash examples/train_torchrun_1node.sh
set -euo pipefail
cd "$(dirname "$0")/.."
GPUS=${GPUS:-8} TP=${TP:-2} PP=${PP:-1}
NUM_LAYERS=${NUM_LAYERS:-24} HIDDEN=${HIDDEN:-2048} HEADS=${HEADS:-16} FFN=${FFN:-8192} SEQ=${SEQ:-2048}
MBS=${MBS:-4} GBS=${GBS:-256} ITERS=${ITERS:-20000} SAVE=${SAVE:-checkpoints/gpt_sparse24_tp${TP}_pp${PP}}
# The distributed optimizer shards the optimizer state over data-parallel ranks (DIST_OPT= turns it off).
export CUDA_DEVICE_MAX_CONNECTIONS=1   # megatron's tensor/sequence-parallel overlap ordering
if [ -n "${DATA:-}" ]; then DATA_ARGS=(--data-path "$DATA" ${TOKENIZER_ARGS:---tokenizer-type NullTokenizer --vocab-size 257}); \
else DATA_ARGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size 32000); fi
torchrun --standalone --nproc_per_node "$GPUS" pretrain_gpt_sparse.py \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" --sequence-parallel \
  ${DIST_OPT---use-distributed-optimizer} \
  --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN" --num-attention-heads "$HEADS" --ffn-hidden-size "$FFN" \
  --squared-relu --seq-length "$SEQ" --max-position-embeddings "$SEQ" --position-embedding-type rope \
  --micro-batch-size "$MBS" --global-batch-size "$GBS" --train-iters "$ITERS" \
  --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 1000 --weight-decay 0.1 ${PRECISION---bf16} \
  --activation-dense-warmup-steps "${WARMUP:-1000}" "${DATA_ARGS[@]}" \
  --save "$SAVE" --load "$SAVE" --load-optional --save-interval 1000 --eval-interval 1000 --eval-iters 20 --log-interval 10 "$@"
