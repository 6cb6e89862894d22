"""Sweep the pack kernels' tile configurations (BT, BF, num_warps) on this GPU.

    python benchmarks/bench_pack.py [--shape 16384x16384]

Prints ms and achieved GB/s (bytes each kernel must move / time) next to a device-to-device copy.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_sparse24.backends import median_cuda_ms  # noqa: E402
from megatron_sparse24 import ops  # noqa: E402
from megatron_sparse24.kernels import reference  # noqa: E402
from megatron_sparse24.kernels import triton_kernels as tk  # noqa: E402
from megatron_sparse24.kernels.triton_kernels import BWD_CONFIG, FWD_CONFIG  # noqa: E402

CONFIGS = [(64, 64, 4), (64, 64, 8), (64, 128, 4), (64, 128, 8), (128, 64, 4), (128, 64, 8),
           (32, 64, 2), (32, 64, 4), (128, 128, 8), (32, 128, 4), (64, 32, 2), (32, 32, 1)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", nargs="*", default=["16384x16384", "16384x8192"])
    ap.add_argument("--sweep", action="store_true", help="all tile configurations, not just the defaults")
    args = ap.parse_args()
    for shp in args.shape:
        t, f = (int(v) for v in shp.split("x"))
        y1 = (torch.randn(t, f, device="cuda") - 1.28).bfloat16()  # ~10% positive
        g2 = torch.randn(t, f, device="cuda").bfloat16()
        src = torch.empty_like(y1)
        dst = torch.empty_like(y1)
        copy = median_cuda_ms(lambda: dst.copy_(src), 3, 20)
        print(f"T x F = {t} x {f}: copy {copy:.3f} ms = {4 * t * f / copy / 1e6:.0f} GB/s")
        fwd_bytes = 2 * t * f + 2 * t * f + t * f // 8
        n_dense = reference.num_dense_features(f, 0.05)
        s2, d_vals, counts = ops.pack_relu2_sparse24(y1, "naive", None, 0)
        _, dense_pos = ops.dense_feature_split(counts[:-1], n_dense)
        bwd_bytes = 2 * t * f + 2 * t * f + t * f // 8 + t * f + 2 * (t * f + t * f // 8)
        configs = CONFIGS if args.sweep else [FWD_CONFIG, BWD_CONFIG][: 1 if FWD_CONFIG == BWD_CONFIG else 2]
        for cfg in configs:
            fwd = median_cuda_ms(lambda: tk.pack_forward(y1, "naive", None, 0, 0, config=cfg), 3, 20)
            bwd = median_cuda_ms(lambda: tk.pack_backward(g2, s2, d_vals, dense_pos, n_dense, True, config=cfg), 3, 20)
            print(f"  BT,BF,warps={cfg}: fwd {fwd:.3f} ms {fwd_bytes / fwd / 1e6:5.0f} GB/s | "
                  f"bwd {bwd:.3f} ms {bwd_bytes / bwd / 1e6:5.0f} GB/s", flush=True)
        unpack = median_cuda_ms(lambda: tk.unpack24(s2), 3, 20)
        print(f"  unpack24: {unpack:.3f} ms {(t * f + 2 * t * f + t * f // 8) / unpack / 1e6:.0f} GB/s")


if __name__ == "__main__":
    main()
