"""Multi-process megatron-core runs on CPU (gloo) for the layer tests.

``spawn(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)`` in fresh processes with a gloo
process group and the package's CPU support, and returns rank 0's result. ``gpt_run`` builds a small
GPT with our spec at a given TP/PP/SP, initialises every parameter from a hash of its global name
(so TP=1, TP=2 and PP=2 models are the same model), runs forward/backward through megatron's
pipeline schedule and DDP, and returns losses and full (TP-gathered, PP-collected) gradients.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import sys
import tempfile
import time
import traceback
import zlib

import torch
import torch.multiprocessing as mp

SEQ, MICRO, VOCAB = 32, 2, 128



def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _DoneWork:
    """What an async collective returns once it has already completed."""

    def wait(self, *args, **kwargs):
        return True

    def is_completed(self):
        return True


def _stage_cuda_collectives_through_cpu():
    """gloo runs few collectives on CUDA tensors: run the ones megatron uses on CPU copies (test-only,
    for two ranks sharing one GPU) and copy the result (the first argument) back."""
    import torch.distributed as dist

    def staged(collective):
        def call(out, *args, async_op=False, **kwargs):
            tensors = [out, *args] if not isinstance(out, list) else [*out, *args]
            if not any(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors):
                return collective(out, *args, async_op=async_op, **kwargs)
            cpu = (lambda t: t.detach().cpu() if isinstance(t, torch.Tensor) else t)
            out_cpu = [cpu(t) for t in out] if isinstance(out, list) else cpu(out)
            collective(out_cpu, *[cpu(a) for a in args], **kwargs)
            with torch.no_grad():
                for dst, src in (zip(out, out_cpu) if isinstance(out, list) else [(out, out_cpu)]):
                    dst.copy_(src)
            return _DoneWork() if async_op else None
        return call

    for name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "_all_gather_base",
                 "reduce_scatter_tensor", "_reduce_scatter_base"):
        setattr(dist, name, staged(getattr(dist, name)))


def share_one_gpu():
    """Let several ranks share GPU 0 over gloo (test-only; NCCL refuses two ranks on one GPU): the
    collectives megatron uses are staged through CPU copies, DDP's bucket all-reduces go one by one
    (gloo has no coalesced CUDA all-reduce), and every ``torch.cuda.set_device`` selects device 0.
    Call it before megatron binds the collectives at import."""
    _stage_cuda_collectives_through_cpu()
    set_device = torch.cuda.set_device
    torch.cuda.set_device = lambda device: set_device(0)
    import megatron.core.distributed.param_and_grad_buffer as grad_buffer

    grad_buffer._coalescing_manager = lambda *args, **kwargs: contextlib.nullcontext()


def _worker(fn, rank, world_size, port, outdir, device, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), TORCHDYNAMO_DISABLE="1", CUDA_DEVICE_MAX_CONNECTIONS="1")
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before megatron_sparse24's kernels are imported
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    torch.set_num_threads(1)
    try:
        import torch.distributed as dist

        if device == "cuda-shared":  # before megatron binds the collectives at import
            share_one_gpu()

        from megatron_sparse24.cpu_support import enable_cpu_megatron

        if device == "cuda":
            torch.cuda.set_device(rank)
            dist.init_process_group("nccl", rank=rank, world_size=world_size)
        elif device == "cuda-shared":  # every rank on GPU 0: NCCL refuses two ranks on one GPU
            torch.cuda.set_device(0)
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        else:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
            enable_cpu_megatron()
        result = fn(rank, world_size, *args)
        if rank == 0:
            torch.save(result, os.path.join(outdir, "result.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(outdir, f"error{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    # The work is done and reported: run the exit handlers (they shut down multiprocessing managers
    # a checkpoint save started), then leave without the rest of the interpreter's teardown, where a
    # library's background thread can abort a finished worker (seen once on a loaded 2-core CI
    # machine: "terminate called without an active exception", exit code -6, after the result was saved).
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, world_size: int, *args, timeout: float = 420, device: str = "cpu"):
    """Run fn(rank, world_size, *args) on world_size processes (gloo on CPU; nccl with one GPU per
    process for device="cuda"; gloo with every process on GPU 0 for device="cuda-shared", which runs
    multi-rank layouts with the real kernels on a one-GPU machine); returns rank 0's return value."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as outdir:
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, outdir, device, args))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.time() + timeout
        for p in procs:
            p.join(max(1.0, deadline - time.time()))
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            p.kill()
        errors = [open(os.path.join(outdir, f)).read() for f in sorted(os.listdir(outdir)) if f.startswith("error")]
        if errors:
            raise RuntimeError("worker failed:\n" + "\n".join(errors))
        if hung:
            raise TimeoutError(f"{len(hung)} of {world_size} workers still running after {timeout}s")
        if any(p.exitcode != 0 for p in procs):
            raise RuntimeError(f"worker exit codes {[p.exitcode for p in procs]}")
        return torch.load(os.path.join(outdir, "result.pt"), weights_only=False)


# --- model, init, data -----------------------------------------------------------------------------


def transformer_config(tp=1, pp=1, sp=False, num_layers=2, **overrides):
    from megatron.core.activations import squared_relu
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = dict(
        num_layers=num_layers, hidden_size=64, ffn_hidden_size=256, num_attention_heads=4,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=sp,
        use_cpu_initialization=True, activation_func=squared_relu, bias_activation_fusion=False,
        gated_linear_unit=False, params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
        pipeline_dtype=torch.float32, bf16=False, fp16=False, masked_softmax_fusion=False,
        bias_dropout_fusion=False, apply_rope_fusion=False,
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


def global_names(model):
    """{local parameter name: name with global layer numbers} (PP stages number layers locally)."""
    out = {}
    layers = model.decoder.layers if hasattr(model, "decoder") else []
    for name, _ in model.named_parameters():
        parts = name.split(".")
        if len(parts) > 3 and parts[0] == "decoder" and parts[1] == "layers":
            parts[2] = str(layers[int(parts[2])].layer_number - 1)
        out[name] = ".".join(parts)
    return out


def _tp_info(param):
    from megatron.core import parallel_state

    if getattr(param, "tensor_model_parallel", False):
        return param.partition_dim, parallel_state.get_tensor_model_parallel_world_size()
    return None, 1


def deterministic_init(model):
    """Every parameter from a generator seeded by its global name: the same model at any TP/PP."""
    from megatron.core import parallel_state

    names = global_names(model)
    rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for name, p in model.named_parameters():
            dim, tp = _tp_info(p)
            full_shape = list(p.shape)
            if dim is not None:
                full_shape[dim] *= tp
            g = torch.Generator().manual_seed(zlib.crc32(names[name].encode()))
            if "norm" in name and name.endswith("weight"):
                full = 1.0 + 0.1 * torch.randn(full_shape, generator=g)
            elif name.endswith("bias"):
                full = 0.05 * torch.randn(full_shape, generator=g)
            else:
                full = torch.randn(full_shape, generator=g) / max(full_shape[-1], 1) ** 0.5
            if dim is not None:
                full = full.chunk(tp, dim=dim)[rank]
            p.copy_(full)


def batches(n_micro, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n_micro):
        tokens = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=g)
        data.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:]})
    return data


def forward_backward(model_chunks, data, config, device="cpu"):
    """One schedule call (forward + backward over the micro-batches); losses on the last stage."""
    from functools import partial

    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_sparse24.cpu_support import cuda_literals_to_cpu

    pos = torch.arange(SEQ, device=device)[None].expand(MICRO, SEQ)
    mask = torch.tril(torch.ones(SEQ, SEQ, dtype=torch.bool, device=device))[None, None].logical_not()
    data = [{k: v.to(device) for k, v in batch.items()} for batch in data]

    def loss_func(output):
        loss = output.float().mean()
        return loss, {"lm loss": loss.detach().clone()}

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        out = model(batch["tokens"], pos, mask, labels=batch["labels"])
        return out, partial(loss_func)

    with cuda_literals_to_cpu():
        losses = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(data), model=model_chunks,
            num_microbatches=len(data), seq_length=SEQ, micro_batch_size=MICRO, forward_only=False,
        )
    return [float(x["lm loss"]) for x in losses]


def collect_full(model, what="grad"):
    """{global name: full tensor} on rank 0, gathered over TP and PP (what: 'grad' or 'param')."""
    import torch.distributed as dist

    from megatron.core import parallel_state

    from megatron.core.utils import unwrap_model

    inner = unwrap_model(model)
    names = global_names(inner)
    local = {}
    for name, p in inner.named_parameters():
        t = (p.main_grad if hasattr(p, "main_grad") else p.grad) if what == "grad" else p.data
        t = t.detach().clone()
        dim, tp = _tp_info(p)
        if dim is not None and tp > 1:
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t, group=parallel_state.get_tensor_model_parallel_group())
            t = torch.cat(parts, dim=dim)
        local[names[name]] = t.cpu()
    out = [None] * parallel_state.get_pipeline_model_parallel_world_size()
    if out.__len__() > 1:
        dist.all_gather_object(out, local, group=parallel_state.get_pipeline_model_parallel_group())
        merged = {}
        for d in out:
            merged.update(d)
        return merged
    return local


def build(tp, pp, sp, sparse24_kwargs, attention="local", init=True, dense_megatron_spec=False, device="cpu",
          dtype=torch.float32):
    """Initialise model parallel (tp, pp) and build a (deterministically initialised) GPT, DDP-wrapped.
    sparse24_kwargs None: our spec with megatron's dense MLP; dense_megatron_spec: megatron's own
    local spec (WrappedTorchNorm, DotProductAttention, MLP)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_sparse24 import Sparse24Config
    from megatron_sparse24.gpt import build_gpt_model

    parallel_state.initialize_model_parallel(tp, pp)
    model_parallel_cuda_manual_seed(1234)
    config = transformer_config(tp, pp, sp, params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16)
    if dense_megatron_spec:
        model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
                         max_sequence_length=SEQ, pre_process=parallel_state.is_pipeline_first_stage(),
                         post_process=parallel_state.is_pipeline_last_stage())
    else:
        sparse = sparse24_kwargs is not None
        model = build_gpt_model(config, vocab_size=VOCAB, max_sequence_length=SEQ,
                                sparse24_config=Sparse24Config(**sparse24_kwargs) if sparse else None,
                                sparse24=sparse, attention=attention)
    if init:
        deterministic_init(model)
    model.to(device)
    if dtype != torch.float32:  # what megatron's training does for --bf16/--fp16
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(config, model)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    config.finalize_model_grads_func = finalize_model_grads
    return ddp, config


def gpt_runs(rank, world_size, scenarios):
    """Run each scenario (dict: tp, pp, sp, sparse24 kwargs or None, steps=1, n_micro=2) in turn;
    returns [{"losses": [[per micro-batch] per step], "grads": {name: full grad of step 1}}]."""
    import torch.distributed as dist

    from megatron.core import parallel_state

    import megatron_sparse24

    results = []
    for sc in scenarios:
        device = sc.get("device", "cpu")
        ddp, config = build(sc["tp"], sc.get("pp", 1), sc.get("sp", False), sc.get("sparse24"), device=device,
                            dtype=sc.get("dtype", torch.float32))
        result = {"losses": [], "grads": None}
        for step in range(sc.get("steps", 1)):
            ddp.zero_grad_buffer()
            # the schedule calls config.finalize_model_grads_func (TP all-reduce of SP norm grads)
            result["losses"].append(forward_backward([ddp], batches(sc.get("n_micro", 2), seed=step), config,
                                                     device))
            if step == 0:
                result["grads"] = collect_full(ddp, "grad")
            megatron_sparse24.step(ddp)
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:  # losses live on the last stage
            obj = [result["losses"]]
            last = dist.get_global_rank(pp_group, parallel_state.get_pipeline_model_parallel_world_size() - 1)
            dist.broadcast_object_list(obj, src=last, group=pp_group)
            result["losses"] = obj[0]
        results.append(result)
        parallel_state.destroy_model_parallel()
    return results
