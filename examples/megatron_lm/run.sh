#!/usr/bin/env bash
# Megatron-LM's trainer with our layer spec. MEGATRON_LM=/path/to/Megatron-LM GPUS=8 TP=2 bash run.sh
set -euo pipefail
MEGATRON_LM=${MEGATRON_LM:?set MEGATRON_LM to a Megatron-LM checkout}
cp "$(dirname "$0")/pretrain_gpt_sparse24.py" "$MEGATRON_LM/"
cd "$MEGATRON_LM"
export CUDA_DEVICE_MAX_CONNECTIONS=1
torchrun --standalone --nproc_per_node "${GPUS:-8}" pretrain_gpt_sparse24.py \
  --spec megatron_sparse24.specs SPARSE24_LAYER_SPEC \
  --squared-relu --activation-sparse-method naive --activation-dense-warmup-steps 1000 \
  --tensor-model-parallel-size "${TP:-2}" --sequence-parallel \
  --num-layers "${NUM_LAYERS:-24}" --hidden-size "${HIDDEN:-2048}" --num-attention-heads "${HEADS:-16}" \
  --ffn-hidden-size "${FFN:-8192}" --seq-length 2048 --max-position-embeddings 2048 \
  --micro-batch-size 4 --global-batch-size 256 --train-iters "${ITERS:-20000}" \
  --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 1000 --bf16 \
  --mock-data --tokenizer-type NullTokenizer --vocab-size 32000 --log-interval 10 "$@"
