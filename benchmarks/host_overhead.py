"""Host (CPU) cost of the sparse FFN, piece by piece, next to each piece's GPU time.

    python benchmarks/host_overhead.py [--shape 16384x2048x1024] [--iters 30] [--cprofile 25]

At small per-rank widths the GPU finishes a sparse FFN's kernels faster than Python can launch them,
so the FFN is host-bound (profile_ffn.py shows the gap: event time > kernel sum). This script says
which pieces cost the host time: for each piece (a whole FFN, the plan, the permutation, each pack
launch, each 2:4 GEMM launch, ...) the median host time to enqueue it (perf_counter around the call,
the GPU queue empty before) and its GPU time (CUDA events). A piece whose host time exceeds its GPU
time starves the GPU unless the host runs ahead. ``--cprofile N`` adds cProfile's top N functions
(by own time) over sparse fwd+bwd steps.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_ffn import FFNProblem  # noqa: E402

from megatron_sparse24 import ops  # noqa: E402
from megatron_sparse24.backends import median_cuda_ms  # noqa: E402
from megatron_sparse24.functional import make_plan, permutation_seed  # noqa: E402


def host_ms(fn, iters: int, warmup: int = 3) -> float:
    """Median host milliseconds to run ``fn`` (enqueue only), starting each time from an idle GPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="16384x2048x1024", help="TxDxF")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--cprofile", type=int, default=0, help="print cProfile's top N functions")
    ap.add_argument("--trace", type=int, default=0,
                    help="print the N operators with the most host (self CPU) time in sparse fwd+bwd")
    ap.add_argument("--json", help="write the table here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("host_overhead.py needs a CUDA GPU")
    t, d, f = (int(v) for v in args.shape.split("x"))
    ffn = FFNProblem(t, d, f, backend=args.backend)
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
        w2t = w2.t()
        pieces.update({
            "pack forward (Triton)": lambda: ops.pack_relu2_sparse24(y1, plan.method, None, plan.mvue_seed,
                                                                      layout=plan.gemm.layout, row_ids=inv),
            "F2 spmm": lambda: plan.gemm.spmm(s2, w2t),
            "dense_feature_split": lambda: ops.dense_feature_split(counts[:-1], plan.n_dense),
            "pack backward (Triton)": lambda: ops.pack_backward(g2, s2, d_vals, dense_pos, plan.n_dense, True,
                                                                perm=perm),
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
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": [t, d, f], "backend": engine,
                                               "device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
