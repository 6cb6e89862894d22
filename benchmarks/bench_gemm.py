"""The 2:4 GEMMs: every CUTLASS configuration against cuBLAS and cuSPARSELt, whether the tuners pick
the fastest kernel, and one GEMM three ways for Nsight Compute.

    python benchmarks/bench_gemm.py [--shapes 16384x16384x4096 16384x8192x2048] [--json out.json]
    python benchmarks/bench_gemm.py --tuning [--ffn 16384x4096x16384] [--repeats 4]
    ncu --nvtx --nvtx-include "prof/" --section SpeedOfLight ... python benchmarks/bench_gemm.py --ncu \
        [--shapes 16384x16384x4096]
    python benchmarks/bench_gemm.py --f1-pack --shapes 16384x4096x16384 [--f1-bias] [--layouts cusparselt cutlass]

Default: one 2:4 GEMM shape at a time, every CUTLASS configuration and tile-scheduler option against
cuBLAS dense (and cuSPARSELt's best algorithm), with achieved TFLOP/s and the SM clock and power
while each runs.

Shapes are M x K x N of D[M, N] = A[M, K] (2:4 along K, packed) @ B[K, N] (row-major, the B2/B4
orientation). Times are of the kernels alone (each call replayed from a CUDA graph, ``gpu_ms``).
TFLOP/s count the dense-equivalent 2*M*N*K; the sparse tensor-core peak of an H200 is twice the
dense one (989 TFLOP/s bf16 dense, SXM).

``--tuning``: do the per-shape GEMM tuners pick the fastest kernel? For the four 2:4 GEMMs of one FFN
shape (T x D x F) and per orientation (F2: B = W2^T, K-major; B2/B4: B row-major; B3: transposed
result): cuSPARSELt's tuner (its algorithms and the dense alternative, timed in interleaved rounds)
and, for comparison, the same candidates timed one after the other (each ``median_cuda_ms(fn, 2, 5)``
in turn); the CUTLASS dispatcher's tuner where the library is available. Each distinct pick is then
re-timed in 10 interleaved rounds, and each tuning's regret (its pick's time over the best pick's,
minus one) printed.

``--ncu``: cuBLAS dense, cuSPARSELt 2:4 and our CUTLASS 2:4 kernel, each at its tuned choice, at the
first shape (A 2:4 along K, B row-major [K, N]). Tuning and warm-up run outside the NVTX range "prof";
inside it each GEMM runs once in its own range (dense, cusparselt, cutlass), so ncu profiles exactly
three kernels. ncu locks the SM clock (1.33-1.35 GHz on the H200), so its durations are longer than
the default mode's and free of the power limit: compare utilizations, not times.

``--f1-pack``: F1 with the forward packer in its epilogue (``cutlass/csrc/f1_pack_gemm.cuh``) against
cuBLAS F1 + the Triton packer, on bench_ffn's input generators; shapes are then the FFN's T x D x F.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import ClockSampler, graphed_ms, interleaved_median_cuda_ms, median_cuda_ms, parse_shape, \
    write_json  # noqa: E402
from megatron_sparse24 import backends  # noqa: E402
from megatron_sparse24.backends import GemmChoice  # noqa: E402
from megatron_sparse24.cutlass import library  # noqa: E402
from megatron_sparse24.kernels import layout, reference  # noqa: E402

DENSE_PEAK_TFLOPS = 989.0  # H200 SXM, bf16 dense (the sparse peak is twice that)


def sparse_operand(m, k, dtype):
    """A squared-ReLU-like 2:4 operand: ~10% of relu(y)^2 non-zero before 2:4, so most groups hold
    0-1 non-zeros, as in training."""
    y = torch.randn(m, k, device="cuda") - 1.28
    x = torch.relu(y) ** 2
    keep = reference.top2_keep(x.reshape(m, k // 4, 4)).reshape(m, k)
    dense = torch.where(keep, x, 0.0).to(dtype)
    return dense, keep


def gpu_ms(fn) -> float:
    """Kernel time of ``fn``: replayed from a CUDA graph, so the host's per-call work (0.04-0.06 ms
    for a CUTLASS launch, ~0.75 ms for torch's _cslt_sparse_mm, which builds its cuSPARSELt plan on
    every call) is not counted as GPU time, as plain CUDA events around one call would."""
    ms = graphed_ms(fn, 3, 20)
    if ms != ms:  # capture failed: events around the call
        ms = median_cuda_ms(fn, 3, 20)
    return ms


def sustained(fn, seconds, index):
    """Median clock / power while fn runs back to back for ``seconds``."""
    torch.cuda.synchronize()
    with ClockSampler(index) as sampler:
        end = time.time() + seconds
        while time.time() < end:
            for _ in range(20):
                fn()
            torch.cuda.synchronize()
    return sampler.summary()


def sweep(args) -> list:
    """The default mode: every CUTLASS configuration per shape (see the docstring)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    dev = torch.cuda.current_device()
    gemm = backends.shared_cutlass(dev)
    results = []
    for shp in args.shapes:
        m, k, n = parse_shape(shp)
        flop = 2 * m * n * k
        dense, keep = sparse_operand(m, k, dtype)
        a = layout.compress24(dense, keep, "cutlass")
        b = torch.randn(k, n, device="cuda", dtype=dtype)
        rows = []

        def record(name, ms):
            rows.append({"shape": [m, k, n], "name": name, "ms": ms, "tflops": flop / ms / 1e9})

        dense_fn = lambda: dense @ b
        dense_ms = gpu_ms(dense_fn)
        record("cuBLAS dense", dense_ms)
        key = (m, k, n, False, False, dtype, dev)
        by_name = {}
        for choice in gemm.candidates(key, a, b, False, False):
            if choice.b_copy:
                continue
            for sched in (library.SCHED_DEFAULT, *library.SCHED_OPTIONS):
                c = gemm._prepare(key, dataclasses.replace(choice, sched=sched), m, n, k, b.device)
                try:
                    ms = gpu_ms(lambda: gemm._run(c, key, a, b, False))
                except RuntimeError:
                    continue
                name = f"{gemm.library.kernels[c.alg_id].spec.name} ({library.sched_name(sched)})"
                record(name, ms)
                by_name[name] = c
        if args.dtype == "bf16":
            cs = backends.CusparseltGemm()
            ac = layout.compress24(dense, keep, "cusparselt")
            best = min((gpu_ms(lambda: torch._cslt_sparse_mm(ac.cslt_operand(), b, alg_id=alg)), alg)
                       for alg in range(cs.max_alg_id) if _cslt_ok(ac, b, alg))
            record(f"cuSPARSELt alg {best[1]}", best[0])
        sparse_rows = [r for r in rows if r["name"].startswith("sp24")]
        best = min(sparse_rows, key=lambda r: r["ms"])
        # sustained clocks: dense vs the best CUTLASS configuration
        choice = by_name[best["name"]]
        d_clock, d_power = sustained(dense_fn, args.sustain, dev)
        s_clock, s_power = sustained(lambda: gemm._run(choice, key, a, b, False), args.sustain, dev)
        print(f"\nM x K x N = {m} x {k} x {n} ({args.dtype}); dense {dense_ms:.3f} ms")
        for r in sorted(rows, key=lambda r: r["ms"])[:12] + [rows[0]]:
            print(f"  {r['name']:70s} {r['ms']:.3f} ms {r['tflops']:6.0f} TFLOP/s  {dense_ms / r['ms']:.2f}x dense  "
                  f"{100 * r['tflops'] / (2 * DENSE_PEAK_TFLOPS):.0f}% of sparse peak")
        print(f"  sustained: dense {d_clock} MHz {d_power} W | best sparse {s_clock} MHz {s_power} W")
        results.append({"shape": [m, k, n], "dtype": args.dtype, "rows": rows, "dense_clock_mhz": d_clock,
                        "dense_power_w": d_power, "sparse_clock_mhz": s_clock, "sparse_power_w": s_power})
    return results


def ident(c: GemmChoice) -> str:
    return c.kind if c.kind == "dense" else f"{c.alg_id}" + (f"/sched {c.sched}" if c.sched else "") + (
        " +B copy" if c.b_copy else "") + (" +D transpose" if c.out_transpose else "")


def one_after_another(gemm, a, b, tr) -> GemmChoice:
    """The cuSPARSELt candidates timed one after the other: every algorithm, then dense."""
    timed = []
    for alg in range(gemm.max_alg_id):
        c = GemmChoice("sparse", alg)
        try:
            timed.append((median_cuda_ms(lambda: gemm._run(c, a, b, tr)), c))
        except RuntimeError:
            break
    dense_ms = median_cuda_ms(lambda: gemm._run(GemmChoice("dense"), a, b, tr))
    return backends.dispatch._fastest(timed, dense_ms)


def tuning(args) -> dict:
    """``--tuning``: the tuners' picks and their regret (see the docstring)."""
    t, d, f = parse_shape(args.ffn)
    dense, keep = sparse_operand(t, f, torch.bfloat16)  # S2 / G1 [T, F]; its transpose has the same shape
    w2 = torch.randn(d, f, device="cuda", dtype=torch.bfloat16)
    b_rows = torch.randn(f, d, device="cuda", dtype=torch.bfloat16)
    orientations = {"F2 (B = W2^T, K-major)": (w2.t(), False), "B2/B4 (B row-major)": (b_rows, False),
                    "B3 (transposed result)": (b_rows, True)}
    tuners = [("cusparselt", backends.CusparseltGemm(direct=True))]
    if library.unavailable_reason(torch.device("cuda"), torch.bfloat16) is None:
        tuners.append(("cutlass", backends.shared_cutlass(torch.cuda.current_device())))
    rows = []
    print(f"{torch.cuda.get_device_name()}  FFN {args.ffn}")
    print("| backend | GEMM | tuner | picks | regret per tuning |\n|---|---|---|---|---|")
    for name, gemm in tuners:
        a = layout.compress24(dense, keep, gemm.layout)
        for orient, (b, tr) in orientations.items():
            if name == "cusparselt":
                run = lambda c, b=b, tr=tr: gemm._run(c, a, b, tr)  # noqa: E731
                methods = {"interleaved (committed)": lambda b=b, tr=tr: gemm._tune(a, b, tr),
                           "one after another": lambda b=b, tr=tr: one_after_another(gemm, a, b, tr)}
            else:
                bk = not b.is_contiguous()
                key = (a.rows, a.cols, b.shape[1], bk, tr, a.dtype, b.device.index)
                run = lambda c, b=b, tr=tr, key=key: gemm._run(c, key, a, b, tr)  # noqa: E731
                methods = {"interleaved (committed)": lambda b=b, tr=tr, key=key, bk=bk: gemm._tune(key, a, b, bk, tr)}
            picks = {m: [tune() for _ in range(args.repeats)] for m, tune in methods.items()}
            distinct = {}
            for c in (c for cs in picks.values() for c in cs):
                distinct.setdefault(ident(c), c)
            steady = dict(zip(distinct, interleaved_median_cuda_ms([lambda c=c: run(c) for c in distinct.values()],
                                                                   rounds=10, iters=3)))
            best = min(steady.values())
            for m, cs in picks.items():
                regret = [steady[ident(c)] / best - 1 for c in cs]
                rows.append({"backend": name, "gemm": orient, "tuner": m, "picks": [ident(c) for c in cs],
                             "steady_ms": steady, "regret": regret})
                print(f"| {name} | {orient} | {m} | {', '.join(ident(c) for c in cs)} | "
                      f"{', '.join(f'{r * 100:.1f} %' for r in regret)} |")
    return {"ffn": args.ffn, "rows": rows}



def ncu(args) -> None:
    """``--ncu``: one GEMM three ways, each in its NVTX range (see the docstring)."""
    m, k, n = parse_shape(args.shapes[0])
    dense, keep = sparse_operand(m, k, torch.bfloat16)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    fns = {"dense": lambda: dense @ b}
    for name, get in (("cusparselt", backends.shared_cusparselt), ("cutlass", backends.shared_cutlass)):
        gemm = get(torch.cuda.current_device())
        a = layout.compress24(dense, keep, gemm.layout)
        fns[name] = lambda gemm=gemm, a=a: gemm.spmm(a, b)
    for fn in fns.values():
        for _ in range(5):  # tuning + warm-up, outside the profiled range
            fn()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("prof")
    for name, fn in fns.items():
        torch.cuda.nvtx.range_push(name)
        fn()
        torch.cuda.nvtx.range_pop()
    torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()



def f1_pack(args) -> list:
    """F1 with the forward packer in its epilogue against cuBLAS F1 + the Triton packer (the unfused
    forward) and cuBLAS F1 alone, timed in interleaved rounds in one process (all dense GEMMs: no 2:4
    kernel runs, so no clock penalty to separate). Every compiled configuration at the default tile
    scheduler, then the tile-scheduler options of the two fastest, and the fastest's mainloop alone
    (nothing written: what its epilogue costs). Shapes are the FFN's T x D x F."""
    from benchmarks.bench_ffn import make_inputs
    from megatron_sparse24 import ops

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    lib = library.load(build=True)
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    linear = torch.nn.functional.linear
    out = []
    for shape in args.shapes:
        t, d, f = parse_shape(shape)
        for inputs in args.inputs:
            x, w1, b1, _, _ = make_inputs(inputs, t, d, f, dtype)
            b1 = b1 if args.f1_bias else None
            for lay in args.layouts:
                kernels = [k for k in lib.f1_candidates(dtype, lay)
                           if t % k.spec.tile[0] == 0 and f % k.spec.tile[1] == 0]
                s2 = layout.Packed24.empty(t, f, dtype, x.device, lay)
                counts = torch.zeros(f + 1, dtype=torch.int32, device=x.device)
                ws = {}

                def fused(k, sched=0, mainloop_only=False):
                    if (k.spec.name, sched) not in ws:
                        n = k.workspace(t, f, d, sm, sched)
                        ws[k.spec.name, sched] = torch.empty(n, dtype=torch.uint8, device=x.device) if n else None
                    if mainloop_only:
                        return lib.f1_pack(k, x, w1, b1, None, None, None, sm, ws[k.spec.name, sched], sched=sched)
                    counts.zero_()
                    lib.f1_pack(k, x, w1, b1, s2.values, s2.meta, counts, sm, ws[k.spec.name, sched], sched=sched)

                base = {"cublas F1": lambda: linear(x, w1, b1),
                        "cublas F1 + packer": lambda: ops.pack_relu2_sparse24(linear(x, w1, b1), "naive", None, 0,
                                                                              layout=lay)}
                first = dict(base, **{k.spec.name: (lambda k=k: fused(k)) for k in kernels})
                times = dict(zip(first, interleaved_median_cuda_ms(list(first.values()), rounds=args.rounds, iters=5)))
                finalists = sorted((k for k in kernels), key=lambda k: times[k.spec.name])[:2]
                second = dict(base)
                for k in finalists:
                    for sched in library.SCHED_OPTIONS:
                        second[f"{k.spec.name} ({library.sched_name(sched)})"] = lambda k=k, s=sched: fused(k, s)
                second.update({f"{k.spec.name} mainloop only": (lambda k=k: fused(k, 0, True)) for k in finalists})
                times2 = dict(zip(second, interleaved_median_cuda_ms(list(second.values()), rounds=args.rounds,
                                                                     iters=5)))
                # same selections as the unfused path (up to the accumulation order of the two GEMMs)
                ref, _, ref_counts = ops.pack_relu2_sparse24(linear(x, w1, b1), "naive", None, 0, layout=lay)
                agree = {}
                for k in kernels:
                    fused(k)
                    agree[k.spec.name] = (s2.meta == ref.meta).float().mean().item()
                for stage, tt in (("configurations", times), ("scheduler options", times2)):
                    ref_ms = tt["cublas F1 + packer"]
                    for name, v in tt.items():
                        row = {"shape": shape, "inputs": inputs, "layout": lay, "bias": b1 is not None, "stage": stage,
                               "kernel": name, "ms": v, "vs_unfused": ref_ms / v, "meta_words_equal": agree.get(name)}
                        out.append(row)
                        print(f"{shape} {inputs:10s} {lay:10s} {name:70s} {v:7.3f} ms  {ref_ms / v:5.3f}x"
                              + (f"  meta words equal {agree[name]:.4f}" if name in agree else ""), flush=True)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=["16384x16384x4096", "16384x8192x2048"], help="M x K x N")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--sustain", type=float, default=2.0, help="seconds of back-to-back runs for clock sampling")
    ap.add_argument("--tuning", action="store_true", help="the tuners' picks and their regret instead")
    ap.add_argument("--ffn", default="16384x4096x16384", help="--tuning: T x D x F of the FFN")
    ap.add_argument("--repeats", type=int, default=4, help="--tuning: tunings per tuner")
    ap.add_argument("--ncu", action="store_true", help="one GEMM three ways, marked for Nsight Compute")
    ap.add_argument("--f1-pack", action="store_true", help="F1 with the packer fused against cuBLAS + packer")
    ap.add_argument("--inputs", nargs="*", default=["blocks", "ar1_spread"], help="--f1-pack: bench_ffn generators")
    ap.add_argument("--layouts", nargs="*", default=["cusparselt"], help="--f1-pack: metadata layouts")
    ap.add_argument("--f1-bias", action="store_true", help="--f1-pack: with the fc1 bias")
    ap.add_argument("--rounds", type=int, default=10, help="--f1-pack: interleaved rounds")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    if args.ncu:
        return ncu(args)
    if args.f1_pack:
        return write_json(args.json, {"f1_pack": f1_pack(args)})
    write_json(args.json, tuning(args) if args.tuning else {"shapes": sweep(args)})


def _cslt_ok(a, b, alg):
    try:
        torch._cslt_sparse_mm(a.cslt_operand(), b, alg_id=alg)
        return True
    except RuntimeError:
        return False


if __name__ == "__main__":
    main()
