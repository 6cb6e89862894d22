"""Megatron-style command-line flags for 2:4 activation sparsity.

``add_sparse24_args(parser)`` adds them to an argparse parser and returns it, so it can be passed as
``extra_args_provider`` to Megatron-LM's ``pretrain()``; ``sparse24_config_from_args(args)`` turns
the parsed flags into a ``Sparse24Config``.

Flags of the LORO-based 2:4 scripts map as: ``--squ_relu True`` -> ``--squared-relu``;
``--activation_sparse_method mvue`` -> ``--activation-sparse-method mvue``;
``--activation_dense_warmup_steps 1000`` -> ``--activation-dense-warmup-steps 1000``.
"""

from __future__ import annotations

import argparse
import math

from .backends import CUSPARSELT_ALIGN
from .config import BACKENDS, MEASURES, METHODS, SWITCHES, Sparse24Config

__all__ = ["add_sparse24_args", "derive_sparse24_args", "sparse24_config_from_args", "ffn_width_from_swiglu"]


def add_sparse24_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group(title="2:4 activation sparsity (megatron_sparse24)")
    g.add_argument("--activation-sparse-method", choices=METHODS, default="naive",
                   help="token-wise 2:4 sparsifier of the squared-ReLU activation")
    g.add_argument("--activation-dense-warmup-steps", type=int, default=1000,
                   help="optimizer steps trained dense before 2:4 sparsity starts")
    g.add_argument("--activation-sparse-switch", choices=SWITCHES, default="steps",
                   help="when each layer leaves dense warmup: 'steps' after --activation-dense-warmup-steps; "
                        "'measured' once 2:4 would drop less than --activation-sparse-switch-threshold of its "
                        "activation for --activation-sparse-switch-window steps (never before "
                        "--activation-dense-warmup-steps)")
    g.add_argument("--activation-sparse-switch-measure", choices=MEASURES, default=Sparse24Config.switch_measure,
                   help="what the dropped share counts: the activation's non-zeros, its L1 or its L2 mass")
    g.add_argument("--activation-sparse-switch-threshold", type=float, default=Sparse24Config.switch_threshold,
                   help="largest share of the activation 2:4 may drop (measured switch; above twice it, a layer "
                        "running 2:4 warns)")
    g.add_argument("--activation-sparse-switch-window", type=int, default=Sparse24Config.switch_window,
                   help="steps the measured share must stay below the threshold before a layer switches")
    g.add_argument("--activation-sparse-switch-max-steps", type=int, default=None,
                   help="measured switch: switch every layer by this step whatever the measure")
    g.add_argument("--activation-dense-feature-fraction", type=float, default=0.05,
                   help="share of FFN features (the least sparse, re-chosen every step) whose weight "
                        "gradients stay dense")
    g.add_argument("--no-token-permutation", action="store_false", dest="token_permutation",
                   help="disable the fixed random token permutation before the FFN")
    g.add_argument("--no-forward-mask-in-backward", action="store_false", dest="forward_mask_in_backward",
                   help="ablation (the paper's run diverged near 42k steps): drop the forward 2:4 mask in "
                        "the backward; keeps Y1 for the backward, experiments only")
    g.add_argument("--sparse24-backend", choices=BACKENDS, default="auto",
                   help="GEMM backend of the sparse FFN ('auto': CUTLASS where built, else cuSPARSELt where it "
                        "runs, each FFN shape timed once against 'dense': the same 2:4 FFN on dense GEMMs)")
    g.add_argument("--no-sparse24-fused-f1", action="store_false", dest="sparse24_fused_f1",
                   help="always run F1 and the forward packer as two kernels (default: where the CUTLASS "
                        "library is built, each FFN shape is timed once with the packer fused into F1's "
                        "epilogue, and the faster is used)")
    g.add_argument("--sparse24-seed", type=int, default=None,
                   help="seed of the token permutation and MVUE sampling (default: --seed)")
    g.add_argument("--no-sparse24", action="store_false", dest="sparse24",
                   help="train the same squared-ReLU model densely (the A/B baseline)")
    g.add_argument("--ffn-hidden-size-from-swiglu", type=int, default=None, metavar="SWIGLU_WIDTH",
                   help="parameter-matched width: set --ffn-hidden-size to 1.5 x this SwiGLU width, "
                        f"rounded up to a multiple of {CUSPARSELT_ALIGN} x tensor-parallel size")
    return parser


def ffn_width_from_swiglu(swiglu_width: int, tensor_parallel_size: int = 1) -> int:
    """Squared-ReLU FFN width with the parameters of a SwiGLU FFN of ``swiglu_width`` (3 matrices vs
    2: x 1.5), rounded up so every tensor-parallel rank holds a multiple of 64 features."""
    align = CUSPARSELT_ALIGN * tensor_parallel_size
    return int(math.ceil(1.5 * swiglu_width / align) * align)


def derive_sparse24_args(args, error):
    """Checks and derived values of the 2:4 flags on a parsed command line (both training loops):
    2:4 needs ``--squared-relu`` (``--swiglu`` conflicts), and ``--ffn-hidden-size-from-swiglu W`` sets
    ``--ffn-hidden-size``. ``error(message)`` reports a conflict (argparse's ``parser.error`` or a raise)."""
    if args.sparse24 and args.swiglu:
        error("--swiglu conflicts with 2:4 activation sparsity, which needs a squared-ReLU FFN: use "
              "--squared-relu (with --ffn-hidden-size-from-swiglu for a parameter-matched width) or --no-sparse24")
    if args.sparse24 and not args.squared_relu:
        error("2:4 activation sparsity needs --squared-relu (or pass --no-sparse24 for a dense model)")
    if args.ffn_hidden_size_from_swiglu is not None:
        if args.ffn_hidden_size is not None:
            error("give --ffn-hidden-size or --ffn-hidden-size-from-swiglu, not both")
        args.ffn_hidden_size = ffn_width_from_swiglu(args.ffn_hidden_size_from_swiglu, args.tensor_model_parallel_size)


def sparse24_config_from_args(args) -> Sparse24Config:
    seed = getattr(args, "sparse24_seed", None)
    if seed is None:
        seed = getattr(args, "seed", Sparse24Config.seed)
    return Sparse24Config(
        method=args.activation_sparse_method,
        dense_warmup_steps=args.activation_dense_warmup_steps,
        switch=getattr(args, "activation_sparse_switch", "steps"),
        switch_measure=getattr(args, "activation_sparse_switch_measure", Sparse24Config.switch_measure),
        switch_threshold=getattr(args, "activation_sparse_switch_threshold", Sparse24Config.switch_threshold),
        switch_window=getattr(args, "activation_sparse_switch_window", Sparse24Config.switch_window),
        switch_max_steps=getattr(args, "activation_sparse_switch_max_steps", None),
        dense_feature_fraction=args.activation_dense_feature_fraction,
        token_permutation=args.token_permutation,
        forward_mask_in_backward=getattr(args, "forward_mask_in_backward", True),
        backend=args.sparse24_backend,
        fused_f1=getattr(args, "sparse24_fused_f1", True),
        seed=int(seed),
    )
