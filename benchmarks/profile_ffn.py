"""Where the FFN's time goes: kernel by kernel on the GPU (torch.profiler), or piece by piece on the host.

    python benchmarks/profile_ffn.py [--shape 16384x4096x16384] [--iters 5] [--json out.json]
    python benchmarks/profile_ffn.py --variants sparse --inputs blocks ar1_spread   # data dependence
    python benchmarks/profile_ffn.py --host --shape 16384x2048x1024 [--iters 30] [--cprofile 25] [--trace 30]

Runs forward + backward of the dense squared-ReLU FFN and of the sparse FFN (``backend``, default
auto) on each of bench_ffn's input generators, ``--iters`` times each after warm-up, under the
profiler, and prints per variant and generator the GPU kernels by total time per iteration, grouped
into the parts the docs talk about (F1/B1 dense GEMMs, 2:4 GEMMs, pack kernels, elementwise,
copies/permutation, other); with several generators, a last table sets each kernel's time side by side.
Kernel times are sums of kernel durations (no gaps), so they add up to less than the event-timed
figures of bench_ffn.py when the GPU idles between kernels.

``--host``: at small per-rank widths the GPU finishes a 2:4 FFN's kernels faster than Python can
launch them, so the FFN is host-bound (the kernel table shows the gap: event time > kernel sum). This
mode says which pieces cost the host time: for each piece (a whole FFN, the plan, the permutation,
each pack launch, each 2:4 GEMM launch, ...) the median host time to enqueue it (perf_counter around
the call, the GPU queue empty before) and its GPU time (CUDA events). A piece whose host time exceeds
its GPU time starves the GPU unless the host runs ahead. ``--cprofile N`` adds cProfile's top N
functions over 2:4 fwd+bwd steps, ``--trace N`` the N operators with the most host time.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import io
import pstats
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_ffn import FFNProblem, inputs_name  # noqa: E402
from benchmarks.common import host_ms, median_cuda_ms, parse_shape, write_json  # noqa: E402
from megatron_sparse24 import ops  # noqa: E402
from megatron_sparse24.functional import make_plan, permutation_seed  # noqa: E402
from megatron_sparse24.kernels.triton_kernels import backward as bwd_kernels  # noqa: E402

#: kernel-name substrings -> part (first match wins)
PARTS = [
    ("PackForwardEpilogue", "F1 + pack forward (one CUTLASS kernel)"),
    ("_ZN7cutlass13device_kernel", "2:4 GEMM (CUTLASS)"),  # our library's kernels (cuBLAS's are nvjet_*)
    ("cusparse", "2:4 GEMM (cuSPARSELt)"),
    ("_relu2_sparsify24_kernel", "pack forward"),
    ("_pack_backward_kernel", "pack backward"),
    ("_g1_without_forward_mask", "pack backward"),
    ("gemm", "dense GEMM"),
    ("sm90_xmma", "dense GEMM"),
    ("nvjet", "dense GEMM"),
    ("gather_kernel", "gather / scatter (permutation, dense features)"),
    ("index", "gather / scatter (permutation, dense features)"),
    ("copy", "copies"),
    ("elementwise", "elementwise"),
    ("reduce", "reductions"),
]


def part_of(name: str) -> str:
    low = name.lower()
    for key, part in PARTS:
        if key.lower() in low:
            return part
    return "other"


def profile(step, iters: int):
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(iters):
            step()
        torch.cuda.synchronize()
    kernels = collections.Counter()
    calls = collections.Counter()
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels[ev.name] += ev.device_time_total / 1e3 / iters  # ms per iteration
            calls[ev.name] += 1 / iters
    return kernels, calls


def host_pieces(args):
    """``--host``: host and GPU time per piece of the FFN (see the docstring)."""
    t, d, f = parse_shape(args.shape)
    ffn = FFNProblem(t, d, f, backend=args.backend, fused_f1=not args.no_fused_f1)
    x, w1, b1, w2, gy = ffn.x, ffn.w1, ffn.b1, ffn.w2, ffn.gy
    cfg, (perm, inv) = ffn.config, ffn.permutation
    sparse_fwd, dense_fwd, step_of = ffn.sparse_fwd, ffn.dense_fwd, ffn.step_of

    # Operands of one real step, for the pieces.
    plan = make_plan(cfg, (t, f, d), x.device, x.dtype, step=0, seed=1)
    pieces = {
        "dense FFN fwd": dense_fwd,
        "dense FFN fwd+bwd": step_of(dense_fwd),
        "sparse FFN fwd": sparse_fwd,
        "sparse FFN fwd+bwd": step_of(sparse_fwd),
        "make_plan": lambda: make_plan(cfg, (t, f, d), x.device, x.dtype, step=0, seed=1),
        "token_permutation": lambda: ops.token_permutation(t, permutation_seed(cfg, 1), x.device),
        "x.index_select(perm)": lambda: x.index_select(0, perm),
        "F1 (F.linear)": lambda: F.linear(x, w1, b1),
        "B1 (g3 @ w2)": lambda: gy @ w2,
        "torch.empty(1)": lambda: torch.empty(1, device=x.device),
    }
    with torch.no_grad():
        y1 = F.linear(x, w1, b1)
        g2 = gy @ w2
    if plan.engine == "dense":  # the dense-GEMM engine's own pieces
        s2, d_, counts = ops.sparsify_forward_dense(y1, plan.method, None, plan.mvue_seed, row_ids=inv)
        dense_idx, dense_pos = ops.dense_feature_split(counts[:-1], plan.n_dense)
        g1, g1_fw, s2_fw, _ = ops.sparsify_backward_dense(g2, s2, d_, dense_pos, perm, True)
        pieces.update({
            "forward pass (Triton)": lambda: ops.sparsify_forward_dense(y1, plan.method, None, plan.mvue_seed,
                                                                        row_ids=inv),
            "F2 (F.linear)": lambda: F.linear(s2, w2),
            "dense_feature_split": lambda: ops.dense_feature_split(counts[:-1], plan.n_dense),
            "backward pass (Triton)": lambda: ops.sparsify_backward_dense(g2, s2, d_, dense_pos, perm, True),
            "B2 (g1 @ w1)": lambda: g1 @ w1,
            "B4 (g1_fw^T @ x)": lambda: g1_fw.t() @ x,
            "B3 (gy^T @ s2_fw)": lambda: gy.t() @ s2_fw,
        })
        engine = "dense GEMMs"
    else:  # the 2:4 engine's, with the permutation applied inside the packs as the function does
        with torch.no_grad():
            s2, d_vals, counts = ops.pack_relu2_sparse24(y1, plan.method, None, plan.mvue_seed,
                                                         layout=plan.gemm.layout, row_ids=inv)
            dense_idx, dense_pos = ops.dense_feature_split(counts[:-1], plan.n_dense)
            g1, g1t, g1_dense, s2t, s2_dense, db1 = ops.pack_backward(g2, s2, d_vals, dense_pos, plan.n_dense, True,
                                                                      perm=perm)
            dw1 = torch.empty_like(w1)
            dw2 = torch.empty_like(w2)
            bwd_outputs, bwd_grid = bwd_kernels.pack_backward_outputs(t, f, x.dtype, x.device, s2.layout,
                                                                      plan.n_dense, True, g1_meta=s2.meta)
        w2t = w2.t()
        pieces.update({
            "pack forward (Triton)": lambda: ops.pack_relu2_sparse24(y1, plan.method, None, plan.mvue_seed,
                                                                      layout=plan.gemm.layout, row_ids=inv),
            "F2 spmm": lambda: plan.gemm.spmm(s2, w2t),
            "dense_feature_split": lambda: ops.dense_feature_split(counts[:-1], plan.n_dense),
            "pack backward (Triton)": lambda: ops.pack_backward(g2, s2, d_vals, dense_pos, plan.n_dense, True,
                                                                perm=perm),
            # its parts: allocating the outputs (+ G1's metadata copy), Triton's launch, db1's partial sums
            "  pack backward: outputs allocated": lambda: bwd_kernels.pack_backward_outputs(
                t, f, x.dtype, x.device, s2.layout, plan.n_dense, True, g1_meta=s2.meta),
            "  pack backward: the Triton launch": lambda: bwd_kernels.launch_pack_backward(
                g2, s2, d_vals, dense_pos, bwd_outputs, bwd_grid, perm=perm),
            "  pack backward: db1 partials summed": lambda: bwd_outputs[-1].sum(0),
            "B2 spmm": lambda: plan.gemm.spmm(g1, w1),
            "B4 spmm": lambda: plan.gemm.spmm(g1t, x),
            "B3 spmm (transposed)": lambda: plan.gemm.spmm(s2t, gy, transpose_result=True),
            "dW1 dense rows (GEMM + index_copy_)": lambda: dw1.index_copy_(0, dense_idx, g1_dense @ x),
            "dW2 dense columns (GEMM + write)": lambda: ops.write_dense_columns_(dw2, dense_pos, s2_dense @ gy),
        })
        engine = plan.gemm.name
    rows = []
    print(f"FFN {t}x{d}x{f}, backend {args.backend} ({engine}), {torch.cuda.get_device_name()}")
    print("| piece | host ms | GPU ms | host/GPU |\n|---|---|---|---|")
    for name, fn in pieces.items():
        grad = "FFN" in name
        with torch.set_grad_enabled(grad):
            h = host_ms(fn, args.iters)
            g = median_cuda_ms(fn, 3, args.iters)
        rows.append({"piece": name, "host_ms": h, "gpu_ms": g})
        print(f"| {name} | {h:.3f} | {g:.3f} | {h / g:.2f} |")
    if args.cprofile:
        step = step_of(sparse_fwd)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.iters):
            step()
        torch.cuda.synchronize()
        prof.disable()
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        stats.sort_stats("tottime").print_stats(args.cprofile)
        stats.sort_stats("cumulative").print_stats(args.cprofile)
        print(f"\ncProfile over {args.iters} sparse fwd+bwd steps (times are totals):")
        print(buf.getvalue())
    if args.trace:
        step = step_of(sparse_fwd)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts, with_stack=False) as prof:
            for _ in range(args.iters):
                with torch.profiler.record_function("## sparse fwd ##"):
                    y = sparse_fwd()
                with torch.profiler.record_function("## sparse bwd ##"):
                    y.backward(gy)
                for p in ffn.leaves:
                    p.grad = None
            torch.cuda.synchronize()
        print(f"\ntorch.profiler over {args.iters} sparse fwd+bwd steps (CPU times are totals):")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.trace, max_name_column_width=60))
    write_json(args.json, {"shape": [t, d, f], "backend": engine, "rows": rows})



def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="16384x4096x16384", help="TxDxF")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--host", action="store_true", help="host and GPU time per piece instead of the kernel table")
    ap.add_argument("--cprofile", type=int, default=0, help="--host: print cProfile's top N functions")
    ap.add_argument("--trace", type=int, default=0,
                    help="--host: print the N operators with the most host (self CPU) time in 2:4 fwd+bwd")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--variants", nargs="+", default=["dense", "sparse"], choices=["dense", "sparse"])
    ap.add_argument("--inputs", nargs="+", default=["blocks"], type=inputs_name,
                    help="bench_ffn's input generators, or captured:FILE[@LAYER]")
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--no-fused-f1", action="store_true", help="F1 and the forward packer as two kernels")
    ap.add_argument("--json", help="write the per-kernel tables here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_ffn.py needs a CUDA GPU")
    if args.host:
        return host_pieces(args)
    t, d, f = parse_shape(args.shape)
    out = {"shape": [t, d, f], "torch": torch.__version__}
    side_by_side = collections.defaultdict(dict)
    for inputs in args.inputs:
        ffn = FFNProblem(t, d, f, backend=args.backend, inputs=inputs, fused_f1=not args.no_fused_f1)
        for name in args.variants:
            step = ffn.step_of(ffn.dense_fwd if name == "dense" else ffn.sparse_fwd)
            kernels, calls = profile(step, args.iters)
            parts = collections.Counter()
            for k, ms in kernels.items():
                parts[part_of(k)] += ms
                side_by_side[(name, k)][inputs] = ms
            total = sum(kernels.values())
            # Event-timed fwd+bwd (outside the profiler): what exceeds the kernel sum is time the GPU
            # waited, e.g. for the host to launch the next kernel (Python overhead at small shapes).
            wall = median_cuda_ms(step, 3, max(args.iters, 5))
            print(f"\n{name} FFN {t}x{d}x{f}, inputs {inputs}: kernels sum to {total:.3f} ms per fwd+bwd; "
                  f"CUDA events {wall:.3f} ms (GPU idle {wall - total:.3f} ms)")
            print("| part | ms | share |\n|---|---|---|")
            for p, ms in parts.most_common():
                print(f"| {p} | {ms:.3f} | {ms / total:.0%} |")
            print("| kernel | calls | ms |\n|---|---|---|")
            for k, ms in kernels.most_common(args.top):
                print(f"| {k[:90]} | {calls[k]:.0f} | {ms:.3f} |")
            out[f"{name}/{inputs}"] = {"total_ms": total, "event_ms": wall, "parts": dict(parts),
                                       "kernels": [{"name": k, "calls": calls[k], "ms": ms}
                                                   for k, ms in kernels.most_common()]}
        del ffn
        torch.cuda.empty_cache()
    if len(args.inputs) > 1:
        print("\n| variant | kernel | " + " | ".join(f"{i} ms" for i in args.inputs) + " |")
        print("|---|---|" + "---|" * len(args.inputs))
        for (name, k), by_input in sorted(side_by_side.items(), key=lambda kv: -max(kv[1].values())):
            if max(by_input.values()) >= 0.02:
                cells = " | ".join(f"{by_input.get(i, 0.0):.3f}" for i in args.inputs)
                print(f"| {name} | {k[:80]} | {cells} |")
    write_json(args.json, out)


if __name__ == "__main__":
    main()
