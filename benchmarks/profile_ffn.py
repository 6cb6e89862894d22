"""Where the FFN's time goes, kernel by kernel: torch.profiler over the dense and the 2:4 FFN.

    python benchmarks/profile_ffn.py [--shape 16384x4096x16384] [--iters 5] [--json out.json]
    python benchmarks/profile_ffn.py --variants sparse --inputs blocks ar1_spread   # data dependence

Runs forward + backward of the dense squared-ReLU FFN and of the sparse FFN (``backend``, default
auto) on each of bench_ffn's input generators, ``--iters`` times each after warm-up, under the
profiler, and prints per variant and generator the GPU kernels by total time per iteration, grouped
into the parts the docs talk about (F1/B1 dense GEMMs, 2:4 GEMMs, pack kernels, elementwise,
copies/permutation, other); with several generators, a last table sets each kernel's time side by side.
Kernel times are sums of kernel durations (no gaps), so they add up to less than the event-timed
figures of bench_ffn.py when the GPU idles between kernels.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_ffn import INPUTS, FFNProblem  # noqa: E402

from megatron_sparse24.backends import median_cuda_ms  # noqa: E402

#: kernel-name substrings -> part (first match wins)
PARTS = [
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="16384x4096x16384", help="TxDxF")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--variants", nargs="+", default=["dense", "sparse"], choices=["dense", "sparse"])
    ap.add_argument("--inputs", nargs="+", default=["blocks"], choices=sorted(INPUTS))
    ap.add_argument("--top", type=int, default=14)
    ap.add_argument("--json", help="write the per-kernel tables here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profile_ffn.py needs a CUDA GPU")
    t, d, f = (int(v) for v in args.shape.split("x"))
    out = {"shape": [t, d, f], "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    side_by_side = collections.defaultdict(dict)
    for inputs in args.inputs:
        ffn = FFNProblem(t, d, f, backend=args.backend, inputs=inputs)
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
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
