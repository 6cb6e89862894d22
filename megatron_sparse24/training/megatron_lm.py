"""What ``pretrain_gpt_sparse.py`` adds to Megatron-LM's training loop (``megatron.training``,
megatron-core >= 0.17): the 2:4 flags and defaults that fit a squared-ReLU model on the machine at
hand, checks before the model is built, the per-layer sparsity log, and running the loop on CPU.

The loop itself, its flags, checkpoints, logs and NaN checks are Megatron-LM's. The layers' dense-warmup
counters follow its iteration by themselves (``Sparse24MLP`` reads ``args.curr_iteration``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import sys
from typing import Callable

import torch
import torch.distributed as dist

from megatron.core import parallel_state

from ..arguments import add_sparse24_args, derive_sparse24_args
from ..backends import describe_backend
from ..cpu_support import cuda_literals_to_cpu, enable_cpu_megatron_training
from ..mcore_compat import run_megatron_pretrain
from ..mlp import Sparse24MLP, summarize_counters
from ..specs import HAVE_TE
from .preflight import PreflightError, check_indexed_data, check_load_dir, data_prefixes
from .writer_processes import end_writer_processes_with_trainer

__all__ = ["add_args", "environment_defaults", "preflight", "backend_line", "SparsityLog", "run"]


def environment_defaults() -> dict:
    """Megatron-LM defaults that would fail here, replaced by what works (explicit flags still win):
    its Transformer Engine layers and RoPE fusion without TE; fused weight-gradient accumulation where
    neither TE nor apex's CUDA extension is installed; apex's persistent layer norm without apex; its
    fused bias-GeLU (no such fusion exists for squared ReLU: megatron rejects the combination); NCCL and
    GPU initialisation on a machine without a GPU."""
    defaults = {"bias_gelu_fusion": False}
    if not HAVE_TE:
        defaults.update(transformer_impl="local", apply_rope_fusion=False)
    if not HAVE_TE and importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is None:
        defaults["gradient_accumulation_fusion"] = False
    if importlib.util.find_spec("apex") is None:  # persistent layer norm is apex's
        defaults["no_persist_layer_norm"] = True
    if not torch.cuda.is_available():
        defaults.update(distributed_backend="gloo", use_cpu_initialization=True)
    return defaults


def add_args(parser):
    """Megatron-LM's ``extra_args_provider``: the 2:4 flags, ``--load-optional``, and
    ``environment_defaults()``; the parsed command line then goes through ``derive_sparse24_args`` before
    Megatron-LM validates it (this parser's own ``parse_known_args`` does it, so no global hook)."""
    add_sparse24_args(parser)
    group = parser.add_argument_group(title="pretrain_gpt_sparse.py")
    group.add_argument("--load-optional", action="store_true",
                       help="start from scratch when --load names no checkpoint (without it that is an error)")
    group.add_argument("--skip-load-checksums", action="store_true",
                       help="do not verify the CRC-32s of a torch_dist checkpoint's items before loading it (the "
                            "check reads the whole checkpoint once, split over the ranks)")
    parser.set_defaults(**environment_defaults())
    parse_known_args = parser.parse_known_args

    def parse_and_derive(args=None, namespace=None):
        namespace, rest = parse_known_args(args, namespace)
        derive_sparse24_args(namespace, parser.error)
        return namespace, rest

    parser.parse_known_args = parse_and_derive
    return parser


def preflight(args, vp_stage=None):
    """Checks before the model is built: ``--load`` names a whole checkpoint (or ``--load-optional``;
    its checksums read the checkpoint's files once, so only for the first model chunk, ``vp_stage`` None
    or 0), and each ``--data-path`` dataset is whole and fits the tokenizer's vocabulary. Raises
    PreflightError."""
    if vp_stage:
        return
    if not (args.finetune or args.use_checkpoint_args):
        check_load_dir(args.load, args.load_optional, checksums=not args.skip_load_checksums)
    if not args.mock_data:
        prefixes = data_prefixes(args.data_path)
        for split in ("train_data_path", "valid_data_path", "test_data_path"):
            prefixes += data_prefixes(getattr(args, split, None))
        if not prefixes and not getattr(args, "data_args_path", None):
            raise PreflightError("no training data: pass --data-path PREFIX (tools/preprocess_data.py makes "
                             "PREFIX.bin/.idx) or --mock-data")
        from megatron.training import get_tokenizer

        check_indexed_data(prefixes, get_tokenizer().vocab_size)


def backend_line(args, backend: str) -> str:
    """What ``--sparse24-backend`` resolves to for this run's FFN shape per rank (gathered tokens x FFN
    width per TP rank x hidden), e.g. "auto -> cusparselt (...)"."""
    tp = args.tensor_model_parallel_size
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    return describe_backend(backend, device, args.params_dtype,
                            (args.seq_length * args.micro_batch_size, args.ffn_hidden_size // tp, args.hidden_size))


class SparsityLog:
    """Every ``--log-interval`` iterations: per-layer activation sparsity (share of zeros in
    relu(Y1)^2) and the share of its non-zeros 2:4 dropped, from the layers' device counters. Each
    pipeline stage sums its layers over its tensor-, data- and context-parallel ranks (one all-reduce,
    one host sync per interval; no collective crosses pipeline stages, whose forward steps run at
    different times), prints them, and the last rank writes them to Megatron-LM's TensorBoard."""

    def __init__(self):
        self.chunks: list = []
        self.logged_iteration = -1

    def maybe_log(self, model):
        from megatron.training import get_args, get_tensorboard_writer

        if not any(model is c for c in self.chunks):
            self.chunks.append(model)
        args = get_args()
        iteration = getattr(args, "curr_iteration", None)
        if (not model.training or not iteration or iteration % args.log_interval
                or iteration == self.logged_iteration):
            return
        self.logged_iteration = iteration
        layers = [m for chunk in self.chunks for m in chunk.modules() if isinstance(m, Sparse24MLP)]
        if not layers:
            return
        counters = torch.stack([m.sparsity_counters for m in layers])
        for m in layers:
            m.sparsity_counters.zero_()
        group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
        dist.all_reduce(counters, group=group)
        stats = [summarize_counters(m.layer_number, c) for m, c in zip(layers, counters.tolist())]
        stats = [s for s in stats if s["activation_sparsity"] is not None]
        sparse = sum(m.sparse_active for m in layers)
        shares = [m.dropped_shares for m in layers]  # agreed across the ranks already (no collective here)
        if dist.get_rank(group) == 0 and stats:
            dropped = sum(s["dropped_by_24"] for s in stats) / len(stats)
            line = (f" 2:4 at iteration {iteration:8d} | layers {stats[0]['layer']}-{stats[-1]['layer']}: "
                    f"{sparse}/{len(layers)} sparse | act. sparsity: "
                    + ",".join(f"{s['activation_sparsity']:.2f}" for s in stats)
                    + f" | dropped by 2:4: {dropped:.3f} |")
            if all(x is not None for x in shares):
                for key in ("nonzeros", "l1", "l2"):
                    line += f" 2:4 drops ({key}): " + ",".join(f"{x[key]:.4f}" for x in shares) + " |"
            print(line, flush=True)
        writer = get_tensorboard_writer()
        if writer is not None:
            writer.add_scalar("sparsity/sparse_layers", sparse, iteration)
            for s in stats:
                for key in ("activation_sparsity", "dropped_by_24", "dense_feature_share"):
                    writer.add_scalar(f"sparsity/{key}/layer{s['layer']:02d}", s[key], iteration)
            for m, x in zip(layers, shares):
                for key, value in (x or {}).items():
                    writer.add_scalar(f"sparsity/would_drop_{key}/layer{m.layer_number:02d}", value, iteration)


def run(datasets_provider: Callable, model_provider: Callable, forward_step: Callable, extra_args_provider=add_args):
    """Megatron-LM's ``pretrain()`` with this package's additions; on a machine without a GPU, inside
    the CPU support (``cpu_support.enable_cpu_megatron_training``)."""
    if "MASTER_ADDR" not in os.environ:  # plain `python pretrain_gpt_sparse.py`: one local process
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]), RANK="0",
                              LOCAL_RANK="0", WORLD_SIZE="1")
    end_writer_processes_with_trainer()  # megatron's checkpoint writer must not outlive a killed run
    on_cpu = enable_cpu_megatron_training()
    if on_cpu:
        torch._dynamo.config.disable = True  # megatron's torch.compile'd activations: minutes of compiling on CPU
    try:
        with cuda_literals_to_cpu() if on_cpu else contextlib.nullcontext():
            run_megatron_pretrain(datasets_provider, model_provider, forward_step,
                                  extra_args_provider=extra_args_provider)
    except PreflightError as exc:  # one line naming the path and the fix, not a traceback
        _fail(str(exc))
    except AssertionError as exc:
        if not str(exc).startswith("OptimizerParamScheduler"):
            raise
        # --load of a run with another learning-rate schedule (e.g. a larger --train-iters)
        _fail(f"the checkpoint's learning-rate schedule differs from this command line's ({exc}): pass "
              "--override-opt_param-scheduler to follow the command line, or --use-checkpoint-opt_param-scheduler "
              "to keep the checkpoint's")


def _fail(message: str):
    print(f"pretrain_gpt_sparse.py: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)

