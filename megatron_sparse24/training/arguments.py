"""Command line of pretrain_gpt_sparse.py: Megatron-LM's flag names, meanings and defaults for what
it supports, plus the 2:4 flags (``megatron_sparse24.arguments.add_sparse24_args``).

Anything else is rejected by argparse ("unrecognized arguments"); conflicting combinations raise a
``ValueError`` that names the fix (``validate_args``).
"""

from __future__ import annotations

import argparse
import warnings

import torch

from ..arguments import add_sparse24_args, derive_sparse24_args
from ..backends import CUSPARSELT_ALIGN

__all__ = ["build_parser", "parse_args", "validate_args"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_gpt_sparse.py",
        description="Pretrain a GPT with 2:4 activation-sparse squared-ReLU FFNs on megatron-core.",
        allow_abbrev=False,
    )
    g = p.add_argument_group("network size")
    g.add_argument("--num-layers", type=int, default=None)
    g.add_argument("--hidden-size", type=int, default=None)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default: 4 x --hidden-size")
    g.add_argument("--num-attention-heads", type=int, default=None)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=1)
    g.add_argument("--kv-channels", type=int, default=None)
    g.add_argument("--max-position-embeddings", type=int, default=None, help="default: --seq-length")
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope"], default="learned_absolute")
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--squared-relu", action="store_true", help="squared ReLU activation (required for 2:4)")
    g.add_argument("--swiglu", action="store_true", help="SwiGLU (dense only: conflicts with 2:4 sparsity)")
    g.add_argument("--disable-bias-linear", action="store_false", dest="add_bias_linear")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--qk-layernorm", action="store_true")
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--attention-backend", choices=["sdpa", "local"], default="sdpa",
                   help="attention core without Transformer Engine: torch SDPA (default) or megatron's "
                        "local DotProductAttention (materialises the s x s scores)")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=None)
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="default: --micro-batch-size x data-parallel size")
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--exit-interval", type=int, default=None, help="stop after this many iterations")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root"],
                   default="linear")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")

    g = p.add_argument_group("distributed")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default="nccl")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--use-cpu-initialization", action="store_true")

    g = p.add_argument_group("data")
    g.add_argument("--mock-data", action="store_true")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="weight-prefix pairs or prefixes of indexed data (tools/preprocess_data.py)")
    g.add_argument("--split", default="969, 30, 1")
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--seq-length", type=int, default=None)
    g.add_argument("--tokenizer-type", choices=["NullTokenizer", "ByteLevelTokenizer", "HuggingFaceTokenizer"],
                   default=None)
    g.add_argument("--tokenizer-model", default=None, help="local path of a HuggingFace tokenizer")
    g.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer's vocabulary size")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the embedding's vocabulary to a multiple of this x tp")
    g.add_argument("--num-workers", type=int, default=2)
    g.add_argument("--eod-mask-loss", action="store_true")

    g = p.add_argument_group("checkpointing and evaluation")
    g.add_argument("--save", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--load-optional", action="store_true",
                   help="start from scratch when --load names no checkpoint (without it that is an error)")
    g.add_argument("--skip-load-checksums", action="store_true",
                   help="do not verify the CRC-32s of a torch_dist checkpoint's items before loading it")
    g.add_argument("--no-save-optim", action="store_true")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)

    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--log-jsonl", default=None, help="also append every logged record to this JSON-lines file")
    add_sparse24_args(p)
    return p


def _fail(msg: str):
    raise ValueError(msg)


def validate_args(args, world_size: int) -> argparse.Namespace:
    """Check combinations, fill derived values (in place), return args."""
    for flag in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size", "train_iters",
                 "lr"):
        if getattr(args, flag) is None:
            _fail(f"--{flag.replace('_', '-')} is required")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if world_size % (tp * pp):
        _fail(f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} x "
              f"--pipeline-model-parallel-size {pp}")
    args.data_parallel_size = world_size // (tp * pp)
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size % (args.micro_batch_size * args.data_parallel_size):
        _fail(f"--global-batch-size {args.global_batch_size} must be a multiple of --micro-batch-size x "
              f"data-parallel size = {args.micro_batch_size * args.data_parallel_size}")
    if args.bf16 and args.fp16:
        _fail("--bf16 and --fp16 are mutually exclusive")
    derive_sparse24_args(args, _fail)
    if args.swiglu and args.squared_relu:
        _fail("--swiglu and --squared-relu are mutually exclusive")
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    if args.sparse24 and (args.ffn_hidden_size % tp or (args.ffn_hidden_size // tp) % 4):
        _fail(f"--ffn-hidden-size {args.ffn_hidden_size} / tp {tp} must be a multiple of 4 for 2:4 groups "
              f"(use a multiple of {CUSPARSELT_ALIGN * tp} for the sparse tensor-core GEMMs)")
    tokens = args.seq_length * args.micro_batch_size
    if args.sparse24 and tokens % 4:
        _fail(f"--seq-length x --micro-batch-size = {tokens} tokens per micro-batch must be a multiple of 4 "
              "(feature-wise 2:4 groups 4 tokens)")
    if args.sequence_parallel and tp == 1:
        warnings.warn("--sequence-parallel needs --tensor-model-parallel-size > 1: disabled")
        args.sequence_parallel = False
    if args.sequence_parallel and args.seq_length % tp:
        _fail(f"--sequence-parallel: --seq-length {args.seq_length} must be divisible by tp {tp}")
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.position_embedding_type == "learned_absolute" and args.max_position_embeddings < args.seq_length:
        _fail("--max-position-embeddings must be >= --seq-length")
    if args.hidden_size % args.num_attention_heads:
        _fail(f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads "
              f"{args.num_attention_heads} (as Megatron-LM requires)")
    if args.group_query_attention:
        if args.num_attention_heads % args.num_query_groups:
            _fail("--num-attention-heads must be a multiple of --num-query-groups")
    else:
        args.num_query_groups = args.num_attention_heads
    if args.mock_data == bool(args.data_path):
        _fail("give exactly one of --mock-data or --data-path")
    if args.tokenizer_type is None:
        if not args.mock_data:
            _fail("--data-path needs --tokenizer-type (the one used by tools/preprocess_data.py)")
        args.tokenizer_type = "NullTokenizer"
    if args.tokenizer_type == "NullTokenizer" and args.vocab_size is None:
        _fail("--tokenizer-type NullTokenizer (the default with --mock-data) needs --vocab-size")
    if args.tokenizer_type == "HuggingFaceTokenizer" and not args.tokenizer_model:
        _fail("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model (a local path; no network)")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_decay_style != "constant" and args.lr_warmup_iters >= args.lr_decay_iters:
        _fail(f"--lr-warmup-iters {args.lr_warmup_iters} must be below --lr-decay-iters (default --train-iters) "
              f"{args.lr_decay_iters}")
    if args.save_interval is not None and not args.save:
        _fail("--save-interval needs --save")
    if (args.bf16 or args.fp16) and not torch.cuda.is_available():
        _fail("--bf16/--fp16 need a GPU (megatron-core's mixed-precision optimizer wraps CUDA tensors only): "
              "drop the flag to train in fp32 on CPU")
    if args.use_distributed_optimizer and not torch.cuda.is_available():
        _fail("--use-distributed-optimizer needs GPUs (megatron-core's distributed optimizer wraps CUDA "
              "tensors only): drop it on CPU")
    if args.distributed_backend == "nccl" and not torch.cuda.is_available():
        _fail("no CUDA GPU here: use --distributed-backend gloo (CPU training, emulated 2:4 GEMMs)")
    if args.recompute_granularity == "full" and args.recompute_method is None:
        _fail("--recompute-granularity full needs --recompute-method (uniform or block)")
    args.params_dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    return args


def parse_args(argv=None, world_size: int = 1) -> argparse.Namespace:
    return validate_args(build_parser().parse_args(argv), world_size)
