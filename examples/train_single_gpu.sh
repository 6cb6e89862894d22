#!/usr/bin/env bash
# One GPU, bf16, 2:4 activation sparsity after a dense warmup. Sizes come from the environment:
#   NUM_LAYERS=24 HIDDEN=2048 HEADS=16 SEQ=2048 MBS=8 GBS=64 ITERS=20000 DATA=/data/corpus_text_document \
#   bash examples/train_single_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
NUM_LAYERS=${NUM_LAYERS:-12} HIDDEN=${HIDDEN:-768} HEADS=${HEADS:-12} SEQ=${SEQ:-1024}
MBS=${MBS:-8} GBS=${GBS:-64} ITERS=${ITERS:-10000} LR=${LR:-6e-4} WARMUP=${WARMUP:-1000}
SWIGLU_WIDTH=${SWIGLU_WIDTH:-$((HIDDEN * 8 / 3))}   # parameter-matched to a SwiGLU FFN of this width
SAVE=${SAVE:-checkpoints/gpt_sparse24}
# byte-level data from tools/preprocess_data.py: ids 0-255, end of document 256
if [ -n "${DATA:-}" ]; then DATA_ARGS=(--data-path "$DATA" ${TOKENIZER_ARGS:---tokenizer-type NullTokenizer --vocab-size 257}); \
else DATA_ARGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size 32000); fi
python pretrain_gpt_sparse.py \
  --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN" --num-attention-heads "$HEADS" \
  --ffn-hidden-size-from-swiglu "$SWIGLU_WIDTH" --squared-relu \
  --seq-length "$SEQ" --max-position-embeddings "$SEQ" --position-embedding-type rope \
  --micro-batch-size "$MBS" --global-batch-size "$GBS" --train-iters "$ITERS" \
  --lr "$LR" --min-lr "$(python -c "print($LR/10)")" --lr-decay-style cosine --lr-warmup-iters 500 \
  --weight-decay 0.1 --clip-grad 1.0 ${PRECISION---bf16} \
  --activation-sparse-method naive --activation-dense-warmup-steps "$WARMUP" \
  "${DATA_ARGS[@]}" --split 98,1,1 \
  --save "$SAVE" --load "$SAVE" --load-optional --save-interval 1000 --eval-interval 500 --eval-iters 20 \
  --log-interval 10 ${TENSORBOARD-"--tensorboard-dir=$SAVE/tb"} "$@"
