"""The package's own training loop, on megatron-core alone: what ``pretrain_gpt_sparse.py`` runs with
megatron-core 0.16, whose wheel has no ``megatron.training`` (from 0.17 on it runs Megatron-LM's loop).

    python -m megatron_sparse24.training.loop --num-layers 2 --hidden-size 128 --num-attention-heads 4 \
        --seq-length 128 --micro-batch-size 4 --train-iters 50 --lr 1e-3 --squared-relu \
        --mock-data --vocab-size 512 --distributed-backend gloo          # CPU; torchrun for GPUs

A subset of Megatron-LM's flags (``megatron_sparse24/training/arguments.py``) plus the 2:4 flags.
The path of a token: ``forward_step`` -> ``GPTModel`` built from ``megatron_sparse24.specs`` ->
``TransformerLayer`` -> ``Sparse24MLP`` (``megatron_sparse24/mlp.py``) -> ``Sparse24FFNFunction``
(``megatron_sparse24/functional.py``) -> the Triton pack kernels and the sparse GEMMs
(``megatron_sparse24/kernels``, ``megatron_sparse24/backends``).
"""

from __future__ import annotations

import logging
import math
import os
import random
import socket
import sys
import time
from functools import partial

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.activations import squared_relu
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.num_microbatches_calculator import get_num_microbatches, init_num_microbatches_calculator
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.transformer_config import TransformerConfig

import megatron_sparse24
from megatron_sparse24.arguments import sparse24_config_from_args
from megatron_sparse24.backends import describe_backend
from megatron_sparse24.cpu_support import cuda_literals_to_cpu, enable_cpu_megatron
from megatron_sparse24.gpt import build_gpt_model
from megatron_sparse24.training.arguments import build_parser, validate_args
from megatron_sparse24.training.checkpointing import load_checkpoint, save_checkpoint
from megatron_sparse24.training.data import build_datasets, build_tokenizer, data_iterator
from megatron_sparse24.training.preflight import check_indexed_data, check_load_dir, data_prefixes
from megatron_sparse24.training.telemetry import MetricsWriter, global_sparsity_stats, model_flops_per_iteration
from megatron_sparse24.training.writer_processes import end_writer_processes_with_trainer


# --- set-up ----------------------------------------------------------------------------------------


def initialize(args):
    """Process group, model-parallel groups, seeds, micro-batch calculator (Megatron-LM's order)."""
    if args.distributed_backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if "MASTER_ADDR" not in os.environ:  # a plain `python` launch: one local process
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    dist.init_process_group(args.distributed_backend, rank=int(os.environ.get("RANK", 0)),
                            world_size=int(os.environ.get("WORLD_SIZE", 1)))
    if enable_cpu_megatron():  # CPU run (no-op when CUDA is available)
        # megatron's activations are torch.compile'd: ~20 s of compiling for a minute-long CPU run
        torch._dynamo.config.disable = True
    parallel_state.initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    seed = args.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    init_num_microbatches_calculator(dist.get_rank(), None, args.global_batch_size, args.micro_batch_size,
                                     args.data_parallel_size)


def transformer_config(args) -> TransformerConfig:
    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels, init_method_std=args.init_method_std,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        normalization=args.normalization, layernorm_epsilon=args.norm_epsilon,
        add_bias_linear=args.add_bias_linear, qk_layernorm=args.qk_layernorm,
        activation_func=squared_relu if args.squared_relu else (torch.nn.functional.silu if args.swiglu
                                                                else torch.nn.functional.gelu),
        gated_linear_unit=args.swiglu, bias_activation_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel, use_cpu_initialization=args.use_cpu_initialization,
        params_dtype=args.params_dtype, pipeline_dtype=args.params_dtype, bf16=args.bf16, fp16=args.fp16,
        recompute_granularity=args.recompute_granularity, recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
    )
    # Sparse24MLP reads its settings from here (see megatron_sparse24.mlp.resolve_sparse24_config).
    config.sparse24 = sparse24_config_from_args(args) if args.sparse24 else None
    return config


def build_model(args, config):
    """GPTModel with the 2:4 spec (or megatron's dense MLP for --no-sparse24), mixed precision, DDP."""
    args.padded_vocab_size = _padded_vocab(args)
    model = build_gpt_model(
        config, vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
        sparse24_config=config.sparse24, sparse24=args.sparse24, attention=args.attention_backend,
        position_embedding_type=args.position_embedding_type,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if args.bf16 or args.fp16:
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                               use_distributed_optimizer=args.use_distributed_optimizer)
    model = DistributedDataParallel(config, ddp_config, model)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync
    return model


def _padded_vocab(args) -> int:
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    return int(math.ceil(args.tokenizer.vocab_size / multiple) * multiple)


def build_optimizer(args, model):
    opt_config = OptimizerConfig(
        optimizer=args.optimizer, lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, bf16=args.bf16, fp16=args.fp16, params_dtype=args.params_dtype,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    with cuda_literals_to_cpu():
        optimizer = get_megatron_optimizer(opt_config, [model])
    gbs = args.global_batch_size  # scheduler steps count samples, as in Megatron-LM
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * gbs, lr_decay_steps=args.lr_decay_iters * gbs,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * gbs, wd_incr_style="constant",
    )
    if args.fp16:
        model.config.grad_scale_func = optimizer.scale_loss
    return optimizer, scheduler


# --- one step ---------------------------------------------------------------------------------------


def loss_func(loss_mask, output_tensor):
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss = (losses * mask).sum() / mask.sum().clamp(min=1.0)
    return loss, {"lm loss": loss.detach().clone()}


def forward_step(data_iterator, model):
    """A micro-batch through the model; returns the per-token losses and how to reduce them."""
    batch = next(data_iterator)
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def train_step(args, model, optimizer, scheduler, train_iter):
    model.zero_grad_buffer()
    optimizer.zero_grad()
    with cuda_literals_to_cpu():  # megatron's device="cuda" literals, on CPU runs only
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=train_iter, model=[model],
            num_microbatches=get_num_microbatches(), seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size, forward_only=False,
        )
        update_successful, grad_norm, _ = optimizer.step()
    if update_successful:
        scheduler.step(increment=args.global_batch_size)
        megatron_sparse24.step(model)  # dense-warmup counters count optimizer steps
    loss = torch.stack([x["lm loss"] for x in losses]).mean() if losses else None
    return loss, grad_norm, update_successful


@torch.no_grad()
def evaluate(args, model, valid_iter):
    model.eval()
    total = []
    with cuda_literals_to_cpu():
        for _ in range(args.eval_iters):
            losses = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=valid_iter, model=[model],
                num_microbatches=get_num_microbatches(), seq_length=args.seq_length,
                micro_batch_size=args.micro_batch_size, forward_only=True,
            )
            if losses:
                total.append(torch.stack([x["lm loss"] for x in losses]).mean())
    model.train()
    return _dp_mean(torch.stack(total).mean()) if total else None


def _dp_mean(t):
    t = t.detach().clone().float()
    dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
    return float(t) / parallel_state.get_data_parallel_world_size()


# --- the loop ---------------------------------------------------------------------------------------


def _log_sparse24_backend(args, device):
    """Say which GEMM backend the 2:4 FFN runs on, and show the package's INFO records (the engine
    chosen for each FFN shape, frozen soft-threshold scales) on this, the logging, rank."""
    tp = args.tensor_model_parallel_size
    tokens = args.seq_length * args.micro_batch_size  # per rank after the sequence-parallel gather
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    line = describe_backend(args.sparse24_backend, torch.device("cuda", device) if device != "cpu"
                            else torch.device("cpu"), dtype, (tokens, args.ffn_hidden_size // tp, args.hidden_size))
    print(f"> 2:4 FFN backend: {line}", flush=True)
    package_logger = logging.getLogger("megatron_sparse24")
    if not package_logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("> %(message)s"))
        package_logger.addHandler(handler)
        package_logger.setLevel(logging.INFO)


def _save(args, iteration, model, optimizer, scheduler, consumed):
    save_checkpoint(args.save, iteration, model, optimizer, scheduler, consumed, not args.no_save_optim)
    if dist.get_rank() == 0:  # Megatron-LM's wording
        print(f"  successfully saved checkpoint from iteration {iteration:7d} to {args.save}", flush=True)


def main(argv=None):
    args = validate_args(build_parser().parse_args(argv), int(os.environ.get("WORLD_SIZE", 1)))
    initialize(args)
    end_writer_processes_with_trainer()  # megatron's checkpoint writer must not outlive a killed run
    args.tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
    # before the model is built: one clear message
    check_load_dir(args.load, args.load_optional, checksums=not args.skip_load_checksums)
    if not args.mock_data:
        check_indexed_data(data_prefixes(args.data_path), args.tokenizer.vocab_size)
    config = transformer_config(args)
    model = build_model(args, config)
    optimizer, scheduler = build_optimizer(args, model)
    iteration, consumed = 0, 0
    if args.load:
        iteration, consumed = load_checkpoint(args.load, model, optimizer, scheduler, load_optim=not args.no_load_optim,
                                              load_rng=not args.no_load_rng)
        if iteration and dist.get_rank() == 0:  # Megatron-LM's wording
            print(f"  successfully loaded checkpoint from {args.load} at iteration {iteration}", flush=True)
    train_ds, valid_ds, _ = build_datasets(args, args.tokenizer)
    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    train_iter = data_iterator(train_ds, consumed, args.micro_batch_size, dp_rank, dp, args.num_workers)
    valid_consumed = (iteration // args.eval_interval) * args.eval_iters * args.global_batch_size \
        if args.eval_interval else 0
    valid_iter = data_iterator(valid_ds, valid_consumed, args.micro_batch_size, dp_rank, dp, args.num_workers)
    is_logger = dist.get_rank() == dist.get_world_size() - 1  # last pipeline stage has the loss
    writer = MetricsWriter(args, is_logger)
    flops = model_flops_per_iteration(args)
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    if is_logger:
        print(f"> {'sparse 2:4' if args.sparse24 else 'dense'} GPT: {args.num_layers} layers, hidden "
              f"{args.hidden_size}, ffn {args.ffn_hidden_size}, tp {args.tensor_model_parallel_size}, pp "
              f"{args.pipeline_model_parallel_size}, dp {dp}, {sum(p.numel() for p in model.parameters())} "
              f"parameters on this rank; starting at iteration {iteration}", flush=True)
        if args.sparse24:
            _log_sparse24_backend(args, device)
    window_loss, window_iters, skipped, last_save = None, 0, 0, iteration
    start = time.time()
    while iteration < args.train_iters:
        loss, grad_norm, ok = train_step(args, model, optimizer, scheduler, train_iter)
        if grad_norm is not None and not math.isfinite(grad_norm):  # a host float already: no extra sync
            raise RuntimeError(f"iteration {iteration + 1}: the gradient norm is {grad_norm} (NaN/inf in the loss "
                               "or gradients); stopping. A corrupted checkpoint or a too high learning rate are "
                               "the usual causes")
        iteration += 1
        consumed += args.global_batch_size
        skipped += not ok
        window_iters += 1
        if loss is not None:
            window_loss = loss.detach() if window_loss is None else window_loss + loss.detach()
        if iteration % args.log_interval == 0:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            elapsed = time.time() - start
            sparsity = global_sparsity_stats([model], args.num_layers, device)
            record = {
                "iteration": iteration, "consumed_samples": consumed, "lr": scheduler.get_lr(optimizer.param_groups[0]),
                "loss": _dp_mean(window_loss / window_iters) if window_loss is not None else None,
                "grad_norm": grad_norm, "ms_per_iter": 1000 * elapsed / window_iters,
                "tokens_per_s": window_iters * args.global_batch_size * args.seq_length / elapsed,
                "tflops_per_gpu": window_iters * flops / elapsed / dist.get_world_size() / 1e12,
                "skipped_iters": skipped, "sparsity": sparsity,
            }
            if torch.cuda.is_available():
                record["max_memory_GB"] = torch.cuda.max_memory_allocated() / 2**30
            if is_logger:
                print(_format(record, args), flush=True)
            writer.write(record, iteration)
            window_loss, window_iters, start = None, 0, time.time()
        if args.eval_interval and iteration % args.eval_interval == 0 and valid_iter is not None:
            val = evaluate(args, model, valid_iter)
            if is_logger and val is not None:
                print(f" validation loss at iteration {iteration}: {val:.6E} | ppl {math.exp(min(val, 20)):.3f}",
                      flush=True)
            writer.write({"iteration": iteration, "loss": val}, iteration, prefix="valid")
            start = time.time()
        if args.save and args.save_interval and iteration % args.save_interval == 0:
            _save(args, iteration, model, optimizer, scheduler, consumed)
            last_save, start = iteration, time.time()
        if args.exit_interval and iteration % args.exit_interval == 0:
            break
    if args.save and last_save != iteration:
        _save(args, iteration, model, optimizer, scheduler, consumed)
    writer.close()
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return iteration


def _format(r, args) -> str:
    parts = [f" iteration {r['iteration']:8d}/{args.train_iters:8d}", f"consumed samples: {r['consumed_samples']:12d}",
             f"elapsed time per iteration (ms): {r['ms_per_iter']:.1f}",
             f"throughput per GPU (TFLOP/s/GPU): {r['tflops_per_gpu']:.1f}", f"tokens/s: {r['tokens_per_s']:.0f}",
             f"learning rate: {r['lr']:.6E}", f"global batch size: {args.global_batch_size:5d}"]
    if r["loss"] is not None:
        parts.append(f"lm loss: {r['loss']:.6E}")
    if r["grad_norm"] is not None:
        parts.append(f"grad norm: {r['grad_norm']:.3f}")
    if r["skipped_iters"]:
        parts.append(f"skipped iterations: {r['skipped_iters']}")
    if r["sparsity"]:
        s = r["sparsity"]
        parts.append("act. sparsity: " + ",".join(f"{x['activation_sparsity']:.2f}" for x in s))
        parts.append(f"dropped by 2:4: {sum(x['dropped_by_24'] for x in s) / len(s):.3f}")
    return " | ".join(parts) + " |"


if __name__ == "__main__":
    main(sys.argv[1:])
