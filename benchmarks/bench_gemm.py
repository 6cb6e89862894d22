"""One 2:4 GEMM shape at a time: every CUTLASS configuration and tile-scheduler option against
cuBLAS dense (and cuSPARSELt's best algorithm), with achieved TFLOP/s and the SM clock and power
while each runs.

    python benchmarks/bench_gemm.py [--shapes 16384x16384x4096 16384x8192x2048] [--json out.json]

Shapes are M x K x N of D[M, N] = A[M, K] (2:4 along K, packed) @ B[K, N] (row-major, the B2/B4
orientation). Times are of the kernels alone (each call replayed from a CUDA graph, ``gpu_ms``).
TFLOP/s count the dense-equivalent 2*M*N*K; the sparse tensor-core peak of an H200 is twice the
dense one (989 TFLOP/s bf16 dense, SXM).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_ffn import graphed_ms  # noqa: E402

from megatron_sparse24 import backends  # noqa: E402
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


class ClockSampler:
    """Samples SM clock (MHz) and power (W) with nvidia-smi while a workload runs."""

    def __init__(self, index: int):
        self.index, self.samples, self._stop = index, [], threading.Event()

    def __enter__(self):
        def loop():
            while not self._stop.is_set():
                try:
                    out = subprocess.run(["nvidia-smi", "-i", str(self.index), "--query-gpu=clocks.sm,power.draw",
                                          "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                         timeout=5).stdout
                    clock, power = (float(v) for v in out.strip().split(","))
                    self.samples.append((clock, power))
                except Exception:
                    return
                time.sleep(0.1)
        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self):
        if not self.samples:
            return None, None
        s = sorted(self.samples)
        return s[len(s) // 2][0], sorted(p for _, p in s)[len(s) // 2]


def gpu_ms(fn) -> float:
    """Kernel time of ``fn``: replayed from a CUDA graph, so the host's per-call work (0.04-0.06 ms
    for a CUTLASS launch, ~0.75 ms for torch's _cslt_sparse_mm, which builds its cuSPARSELt plan on
    every call) is not counted as GPU time, as plain CUDA events around one call would."""
    ms = graphed_ms(fn, 3, 20)
    if ms != ms:  # capture failed: events around the call
        ms = backends.median_cuda_ms(fn, 3, 20)
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=["16384x16384x4096", "16384x8192x2048"])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--sustain", type=float, default=2.0, help="seconds of back-to-back runs for clock sampling")
    ap.add_argument("--json")
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    dev = torch.cuda.current_device()
    gemm = backends.shared_cutlass(dev)
    results = []
    for shp in args.shapes:
        m, k, n = (int(v) for v in shp.split("x"))
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
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


def _cslt_ok(a, b, alg):
    try:
        torch._cslt_sparse_mm(a.cslt_operand(), b, alg_id=alg)
        return True
    except RuntimeError:
        return False


if __name__ == "__main__":
    main()
