"""F1 and the forward pack: cuBLAS GEMM + Triton packer vs one Triton GEMM with the pack in its epilogue.

    python benchmarks/bench_f1.py [--shapes 16384x4096x16384 ...] [--sweep] [--json out.json]

For each (T, D, F) on realistic activations (bench_ffn.realistic_inputs: relu(Y1)^2 ~90 % zeros),
bf16, in one process, CUDA events, medians after warm-up, variants in A B B A order: the dense F1
alone (F.linear, cuBLAS), the 2:4 engine's forward today (F.linear then ``pack_forward``) and
``f1_pack_forward`` (Y1 never written) for its default configuration, or every one of CONFIGS with
``--sweep``. Also prints how many metadata words the fused and the unfused path agree on (their Y1
differ only in GEMM summation order).
"""

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_ffn import realistic_inputs  # noqa: E402
from megatron_sparse24.backends import median_cuda_ms  # noqa: E402
from megatron_sparse24.kernels import triton_kernels as tk  # noqa: E402

#: (BM, BN, BK, num_stages, num_warps, EPI_SPLIT, GROUP_M[, PERSISTENT[, WARP_SPECIALIZE]])
CONFIGS = [
    (128, 256, 64, 3, 8, 4, 8), (128, 256, 64, 4, 8, 4, 8), (128, 128, 64, 4, 8, 1, 8), (128, 256, 64, 3, 8, 4, 8, 0),
    (128, 128, 64, 3, 8, 2, 8, 0), (128, 128, 64, 4, 8, 1, 8, 0), (128, 128, 64, 3, 4, 2, 8, 0),
    (128, 256, 64, 3, 8, 4, 8, 1, 1), (128, 128, 64, 4, 8, 2, 8, 1, 1),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="*", default=["16384x4096x16384", "16384x2048x8192", "8192x8192x32768",
                                                    "16384x4096x2048"])
    ap.add_argument("--sweep", action="store_true", help="every configuration of CONFIGS")
    ap.add_argument("--layout", default="cutlass")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for shp in args.shapes:
        t, d, f = (int(v) for v in shp.split("x"))
        x, w1, b1, _, _ = realistic_inputs(t, d, f, torch.bfloat16)
        lay = args.layout

        def unfused():
            return tk.pack_forward(F.linear(x, w1, b1), "naive", None, 0, 0, layout=lay)

        def fused(cfg):
            return tk.f1_pack_forward(x, w1, b1, "naive", None, 0, 0, layout=lay, config=cfg)

        ref, _, ref_counts = unfused()
        # the main loop alone: the same kernel writing Y1 instead of packing
        for cfg in ([tk.F1_CONFIG, (128, 256, 64, 4, 8, 4, 8), (128, 128, 64, 4, 8, 1, 8, 0)] if args.sweep else []):
            ms = median_cuda_ms(lambda: tk.f1_pack_forward(x, w1, b1, "naive", None, 0, 0, config=cfg, pack=False),
                                args.warmup, args.iters)
            print(f"{shp} {str(cfg):30s} plain Triton GEMM (writes Y1) {ms:.3f} ms", flush=True)
            rows.append({"shape": [t, d, f], "config": list(cfg), "plain_triton_gemm_ms": ms})
        configs = CONFIGS if args.sweep else [tk.F1_CONFIG]
        cublas = median_cuda_ms(lambda: F.linear(x, w1, b1), args.warmup, args.iters)
        base = []
        for cfg in configs:
            try:
                s2, _, counts = fused(cfg)
            except Exception as e:  # a configuration the compiler rejects (shared memory, registers)
                print(f"{shp} {cfg}: failed: {type(e).__name__}: {str(e)[:160]}", flush=True)
                continue
            same_meta = (s2.meta == ref.meta).float().mean().item()
            ms = []
            for name in ("unfused", "fused", "fused", "unfused"):
                fn = unfused if name == "unfused" else (lambda: fused(cfg))
                ms.append(median_cuda_ms(fn, args.warmup, args.iters))
            u, fz = (ms[0] + ms[3]) / 2, (ms[1] + ms[2]) / 2
            base.append(u)
            row = {"shape": [t, d, f], "config": list(cfg), "cublas_f1_ms": cublas, "f1_plus_pack_ms": u,
                   "fused_ms": fz, "fused_vs_unfused": u / fz, "fused_vs_cublas_f1": cublas / fz,
                   "same_metadata_words": same_meta, "counts_equal": bool(torch.equal(counts, ref_counts))}
            rows.append(row)
            print(f"{shp} {str(cfg):30s} cuBLAS F1 {cublas:.3f} ms | F1 + pack {u:.3f} ms | fused {fz:.3f} ms "
                  f"= {u / fz:.3f}x of F1 + pack, {cublas / fz:.3f}x of F1 alone | metadata words equal "
                  f"{100 * same_meta:.2f} %", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
