"""End-to-end training throughput: the same GPT trained dense and 2:4-sparse, in one job.

    # one GPU, 7B-class layers (hidden 4096, FFN 16384, 32 heads), 16k tokens per micro-batch
    python benchmarks/bench_train.py --num-layers 8 --hidden-size 4096 --ffn-hidden-size 16384 \
        --num-attention-heads 32 --seq-length 4096 --max-position-embeddings 4096 \
        --micro-batch-size 4 --global-batch-size 4 --bf16 --mock-data --vocab-size 32000 \
        --variants dense sparse sparse dense --bench-isolate 1 --json out.json
    # two GPUs, TP=2 + SP (two ranks per variant, launched by the script):
    #     python benchmarks/bench_train.py ... --tensor-model-parallel-size 2 --sequence-parallel \
    #     --bench-isolate 2

Takes the flags of the package's own loop (megatron_sparse24.training.loop; Megatron-LM names) and
runs its train step (megatron DDP, optimizer, pipeline schedule) for each variant in turn: dense squared-ReLU (``--no-sparse24``) and
sparse (dense warmup shortened to ``--bench-sparse-warmup`` steps). ``--variants`` may repeat them,
e.g. ``dense sparse sparse dense``; the ratio printed is of the per-variant means. On an H200, pass
``--bench-isolate 1`` (``2`` for TP=2, started with python, not torchrun): each variant then runs
in a fresh process. In one process, a dense run after a sparse one is ~5 % slower, because once a
2:4 GEMM has run the process's dense kernels get a lower power-capped clock (docs/performance.md)
— a penalty a real dense training run never pays. Each run records the GPU's
temperature, SM clock and power mid-run.
Each variant runs ``--bench-warmup`` untimed iterations (the sparse GEMM dispatcher tunes there), then
``--bench-iters`` iterations timed with CUDA events; reported: median, mean and slowest ms/iteration (the
mean counts the steps at which the 2:4 layers measure their activations, one in ``mlp.MEASURE_EVERY``, and
any stall such as a kernel compiled mid-run, which the slowest step shows), tokens/s,
dense-equivalent TFLOP/s per GPU, peak memory, and a per-layer component split (attention / FFN,
forward + backward of one layer's blocks timed alone, x layers; the rest of the step is "other").
``--bench-profile N`` then profiles N more steps (torch.profiler): GPU kernel ms per step by part (dense
and 2:4 GEMMs, packers, attention, optimizer, ...), the kernel sum and the GPU's idle time, side by side
per variant.
Without a GPU it runs on CPU (gloo, emulated GEMMs, wall-clock timing) as a smoke test only.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_sparse24.training import loop as trainer  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from benchmarks.common import median_cuda_ms  # noqa: E402
from megatron_sparse24.training.arguments import build_parser, validate_args  # noqa: E402
from megatron_sparse24.training.data import build_datasets, build_tokenizer, data_iterator  # noqa: E402
from megatron_sparse24.training.telemetry import model_flops_per_iteration  # noqa: E402


def _bench_args(parser: argparse.ArgumentParser):
    g = parser.add_argument_group("bench_train")
    g.add_argument("--bench-warmup", type=int, default=8, help="untimed iterations per variant")
    g.add_argument("--bench-iters", type=int, default=20, help="timed iterations per variant")
    g.add_argument("--bench-sparse-warmup", type=int, default=3,
                   help="dense warmup steps of the sparse variant (must be < --bench-warmup)")
    g.add_argument("--variants", nargs="+", default=["dense", "sparse"], choices=["dense", "sparse"],
                   help="variants in run order; repeat them (dense sparse sparse dense) to balance the order")
    g.add_argument("--bench-isolate", type=int, default=0, metavar="NPROC",
                   help="run each variant in a fresh process (NPROC ranks each, launched with torch.distributed.run "
                        "when > 1; start this script with python, not torchrun): once a 2:4 GEMM has run in a "
                        "process, the H200 runs that process's dense kernels ~5 %% slower (docs/performance.md), so "
                        "a dense variant that follows a sparse one in the same process is penalised")
    g.add_argument("--bench-profile", type=int, default=0, metavar="STEPS",
                   help="after the timed steps, profile this many more (torch.profiler, GPU kernels): per variant, "
                        "kernel ms per step by part and the GPU's idle time (step time - kernel sum)")
    g.add_argument("--json", help="write the results here (rank 0)")
    return parser


def gpu_state() -> dict:
    """Temperature (C), SM clock (MHz) and power (W) of this rank's GPU from nvidia-smi; {} without it."""
    if not torch.cuda.is_available():
        return {}
    index = str(torch.cuda.current_device())
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    if visible != [""] and int(index) < len(visible):
        index = visible[int(index)]
    fields = ("temperature.gpu", "clocks.sm", "power.draw")
    try:
        out = subprocess.run(["nvidia-smi", "-i", index, "--query-gpu=" + ",".join(fields),
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
        values = [float(v) for v in out.stdout.strip().split(",")]
    except (OSError, ValueError, subprocess.SubprocessError):
        return {}
    return dict(zip(("temperature_C", "sm_clock_MHz", "power_W"), values))


class _Interval:
    """Milliseconds of a region: CUDA events on GPUs (read after one sync at the end), wall clock on CPU."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def __enter__(self):
        if self.cuda:
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
        else:
            self.t1 = time.perf_counter()

    def ms(self) -> float:
        return self.start.elapsed_time(self.end) if self.cuda else 1e3 * (self.t1 - self.t0)


def _median_ms(fn, warmup: int, iters: int) -> float:
    if torch.cuda.is_available():
        return median_cuda_ms(fn, warmup, iters)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        with _Interval() as t:
            fn()
        times.append(t.ms())
    return statistics.median(times)


def _layers(model):
    module = model
    while hasattr(module, "module"):
        module = module.module
    return module.decoder.layers


def component_split(args, model, iters: int = 10) -> dict:
    """ms of forward + backward of one layer's attention block and MLP block (layernorm included),
    on a micro-batch shaped like training's ([s / tp if SP else s, b, h])."""
    layer = _layers(model)[0]
    tp = args.tensor_model_parallel_size
    s = args.seq_length // tp if args.sequence_parallel else args.seq_length
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(s, args.micro_batch_size, args.hidden_size, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn_like(x)

    def attention():
        out, _ = layer.self_attention(layer.input_layernorm(x), attention_mask=None)
        out.backward(g)

    def mlp():
        out, _ = layer.mlp(layer.pre_mlp_layernorm(x))
        out.backward(g)

    res = {"attention_ms": _median_ms(attention, 3, iters), "ffn_ms": _median_ms(mlp, 3, iters)}
    model.zero_grad_buffer()
    return res


#: step-level parts (first match wins) ahead of profile_ffn's FFN parts
STEP_PARTS = [
    ("flash", "attention (SDPA kernels)"), ("fmha", "attention (SDPA kernels)"),
    ("attention", "attention (SDPA kernels)"), ("nccl", "communication"),
    ("multi_tensor", "optimizer, grad norm"), ("adam", "optimizer, grad norm"),
    ("normtwoops", "optimizer, grad norm"),  # the gradient norm's reduction (not a norm layer)
    ("softmax", "softmax, cross-entropy"), ("nll_loss", "softmax, cross-entropy"),
    ("layer_norm", "norms"), ("rms_norm", "norms"), ("gammabeta", "norms"),
]


def step_part_of(kernel: str) -> str:
    """The part of a training step a GPU kernel belongs to (STEP_PARTS, then profile_ffn's FFN parts)."""
    from benchmarks.profile_ffn import part_of

    low = kernel.lower()
    return next((part for key, part in STEP_PARTS if key in low), None) or part_of(kernel)


def profile_steps(args, model, optimizer, scheduler, train_iter, steps: int) -> dict:
    """GPU kernels of ``steps`` training steps (torch.profiler): ms per step by part and by kernel,
    the step time (CUDA events) and the GPU's idle time in it (step time - kernel sum: launch gaps, host
    stalls; one stream, so kernels do not overlap)."""

    def step():
        trainer.train_step(args, model, optimizer, scheduler, train_iter)

    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        with _Interval() as interval:
            for _ in range(steps):
                step()
        torch.cuda.synchronize()
    kernels = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels[ev.name] = kernels.get(ev.name, 0.0) + ev.device_time_total / 1e3 / steps
    parts = {}
    for name, ms in kernels.items():
        part = step_part_of(name)
        parts[part] = parts.get(part, 0.0) + ms
    step_ms = interval.ms() / steps
    busy = sum(kernels.values())
    top = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:40])
    return {"step_ms": step_ms, "kernel_ms": busy, "idle_ms": step_ms - busy,
            "parts_ms": dict(sorted(parts.items(), key=lambda kv: -kv[1])), "top_kernels_ms": top}


def _live_gpt_models() -> int:
    from megatron.core.models.gpt import GPTModel

    return sum(isinstance(o, GPTModel) for o in gc.get_objects())


def run_variant(args, name: str) -> dict:
    stale = _live_gpt_models()  # a previous variant's model still alive would inflate peak memory
    args.sparse24 = name == "sparse"
    if args.sparse24:
        args.activation_dense_warmup_steps = args.bench_sparse_warmup
    config = trainer.transformer_config(args)
    model = trainer.build_model(args, config)
    optimizer, scheduler = trainer.build_optimizer(args, model)
    train_ds, _, _ = build_datasets(args, args.tokenizer)
    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    train_iter = data_iterator(train_ds, 0, args.micro_batch_size, dp_rank, dp, args.num_workers)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    losses, times = [], []
    state = {}
    for i in range(args.bench_warmup + args.bench_iters):
        if cuda and i == args.bench_warmup:
            # Peak memory of the timed steps only: the sparse variant's first steps are its (dense)
            # activation warmup, whose activations would otherwise set its peak.
            torch.cuda.reset_peak_memory_stats()
        if i == args.bench_warmup + args.bench_iters // 2:
            state = gpu_state()  # mid-run, the GPU busy with queued steps
        with _Interval() as interval:
            loss, _, _ = trainer.train_step(args, model, optimizer, scheduler, train_iter)
        if i >= args.bench_warmup:
            times.append(interval)
        if loss is not None:
            losses.append(loss.detach())
    if cuda:
        torch.cuda.synchronize()
    step_ms = [t.ms() for t in times]
    ms = statistics.median(step_ms)
    profiled = profile_steps(args, model, optimizer, scheduler, train_iter, args.bench_profile) \
        if args.bench_profile and cuda else None
    tokens = args.global_batch_size * args.seq_length
    res = {
        "variant": name, "ms_per_iter": ms, "ms_per_iter_mean": statistics.mean(step_ms),
        "ms_per_iter_max": max(step_ms), "timed_steps_ms": step_ms,
        "tokens_per_s": tokens / ms * 1e3,
        "tflops_per_gpu": model_flops_per_iteration(args) / (ms / 1e3) / dist.get_world_size() / 1e12,
        "peak_memory_GB": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "first_loss": float(losses[0]) if losses else None, "last_loss": float(losses[-1]) if losses else None,
        "stale_models_at_start": stale, "gpu_state_mid_run": state,
        "device": torch.cuda.get_device_name() if cuda else "CPU (smoke test, not a benchmark)",
    }
    if profiled:
        res["profile"] = profiled
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        split = component_split(args, model)
        split["attention_total_ms"] = split["attention_ms"] * args.num_layers
        split["ffn_total_ms"] = split["ffn_ms"] * args.num_layers
        split["other_ms"] = ms - split["attention_total_ms"] - split["ffn_total_ms"]
        res.update(split)
    return res


def run_isolated(argv: list[str], args) -> list[dict]:
    """Each variant in a fresh process (``torch.distributed.run`` with ``--bench-isolate`` processes
    when more than one), in the order of ``--variants``; returns their results."""
    nproc = args.bench_isolate
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc-per-node={nproc}"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for order, variant in enumerate(args.variants):
            out = os.path.join(tmp, f"{order}.json")
            env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
            # the last occurrence of a flag wins: the child runs one variant, in process, into its own file
            cmd = [*launcher, str(Path(__file__).resolve()), *argv,
                   "--variants", variant, "--json", out, "--bench-isolate", "0"]
            proc = subprocess.run(cmd, env=env)
            if proc.returncode != 0:
                sys.exit(f"the {variant} run (order {order}) failed with exit code {proc.returncode}: {' '.join(cmd)}")
            results.append({**json.loads(Path(out).read_text())[0], "order": order})
    return results


def report(args, results: list[dict], device: str, world_size: int, isolated: bool):
    print(f"device: {device} x {world_size}  torch {torch.__version__}  "
          f"layers {args.num_layers} hidden {args.hidden_size} ffn {args.ffn_hidden_size} seq {args.seq_length} "
          f"mbs {args.micro_batch_size} gbs {args.global_batch_size} tp {args.tensor_model_parallel_size} "
          f"sp {args.sequence_parallel} backend {args.sparse24_backend}"
          + ("  (each variant in its own process)" if isolated else ""))
    print("| variant | ms/iter (median / mean / slowest) | tokens/s | TFLOP/s/GPU | peak GB | attention ms (×L) "
          "| FFN ms (×L) | other ms | GPU °C / MHz / W mid-run |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        st = r["gpu_state_mid_run"]
        st = (f"{st['temperature_C']:.0f} / {st['sm_clock_MHz']:.0f} / {st['power_W']:.0f}" if st else "-")
        print(f"| {r['variant']} | {r['ms_per_iter']:.1f} / {r['ms_per_iter_mean']:.1f} / {r['ms_per_iter_max']:.1f} "
              f"| {r['tokens_per_s']:.0f} "
              f"| {r['tflops_per_gpu']:.0f} | {r['peak_memory_GB']:.1f} "
              f"| {r.get('attention_total_ms', float('nan')):.1f} | {r.get('ffn_total_ms', float('nan')):.1f} "
              f"| {r.get('other_ms', float('nan')):.1f} | {st} |")
    profiled = [r for r in results if r.get("profile")]
    if profiled:
        parts = sorted({p for r in profiled for p in r["profile"]["parts_ms"]},
                       key=lambda p: -profiled[0]["profile"]["parts_ms"].get(p, 0.0))
        print("\nGPU kernels per step (torch.profiler, ms):")
        print("| part | " + " | ".join(r["variant"] for r in profiled) + " |")
        print("|---|" + "---|" * len(profiled))
        for p in parts:
            print(f"| {p} | " + " | ".join(f"{r['profile']['parts_ms'].get(p, 0.0):.1f}" for r in profiled) + " |")
        for key, label in (("kernel_ms", "kernel sum"), ("idle_ms", "GPU idle (step - kernel sum)"),
                           ("step_ms", "step (CUDA events)")):
            print(f"| {label} | " + " | ".join(f"{r['profile'][key]:.1f}" for r in profiled) + " |")
    mean = {v: statistics.mean(r["tokens_per_s"] for r in results if r["variant"] == v)
            for v in ("dense", "sparse") if v in args.variants}
    if len(mean) == 2:
        print(f"sparse / dense tokens/s: {mean['sparse'] / mean['dense']:.3f}"
              + (f" (means over {len(results)} runs in the order {' '.join(args.variants)})"
                 if len(results) > 2 else ""))
        step = {v: statistics.mean(r["ms_per_iter_mean"] for r in results if r["variant"] == v) for v in mean}
        print(f"dense / sparse mean step time: {step['dense'] / step['sparse']:.3f} (every timed step counted)")
    order = [r["variant"] for r in results]
    if not isolated and "sparse" in order and "dense" in order[order.index("sparse"):] and torch.cuda.is_available():
        print("note: dense ran after sparse in this process and paid the 2:4 clock penalty (~5 %, "
              "docs/performance.md): use --bench-isolate for a fair comparison")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _bench_args(build_parser())
    ns = parser.parse_args(argv)
    args = validate_args(ns, ns.bench_isolate or int(os.environ.get("WORLD_SIZE", 1)))
    if args.bench_sparse_warmup >= args.bench_warmup:
        sys.exit("--bench-sparse-warmup must be smaller than --bench-warmup (time the sparse steps only)")
    if args.bench_profile and not torch.cuda.is_available():
        sys.exit("--bench-profile times GPU kernels: it needs a CUDA GPU (drop it for the CPU smoke test)")
    if args.bench_isolate:
        if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", 1)) > 1:
            sys.exit("--bench-isolate launches the ranks itself: run it with python, not torchrun")
        results = run_isolated(argv, args)  # this process stays off the GPU: the name comes from a run
        report(args, results, results[0]["device"], args.bench_isolate, isolated=True)
        return results
    trainer.initialize(args)
    args.tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_size)
    results = []
    for order, variant in enumerate(args.variants):
        results.append({**run_variant(args, variant), "order": order})
        # The model is in a reference cycle (megatron's config.no_sync_func = model.no_sync): only a
        # collection after run_variant has returned (its locals, incl. the config, gone) frees it
        # before the next variant allocates.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if dist.get_rank() == 0:
        report(args, results, results[0]["device"], dist.get_world_size(), isolated=False)
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
