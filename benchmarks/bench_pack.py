"""The pack kernels on this GPU: bandwidth against a device-to-device copy, tile sweeps.

    python benchmarks/bench_pack.py [--shape 16384x16384 ...] [--sweep] [--json out.json]

For each shape and metadata layout: the forward packer (squared ReLU -> 2:4 -> values, d_vals,
metadata, counts) and the backward packer (G1 + the feature-wise packs of G1^T and S2^T + dense
rows + db1), in ms and in GB/s of the bytes each must move. ``--sweep`` times every configuration
(BT, BF, num_warps) of CONFIGS.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_sparse24.backends import median_cuda_ms  # noqa: E402
from megatron_sparse24 import ops  # noqa: E402
from megatron_sparse24.kernels import reference  # noqa: E402
from megatron_sparse24.kernels import triton_kernels as tk  # noqa: E402

#: (BT, BF, num_warps)
CONFIGS = {
    "fwd": [(64, 64, 4), (32, 64, 2), (64, 128, 4), (64, 64, 8), (32, 32, 1), (32, 64, 1), (32, 128, 2)],
    "bwd": [(64, 64, 4), (32, 64, 2), (64, 128, 4), (128, 64, 4), (32, 32, 1), (32, 64, 1), (32, 128, 2),
            (32, 128, 4)],
}
DEFAULTS = {"fwd": tk.FWD_CONFIG, "bwd": tk.BWD_CONFIG}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", nargs="*", default=["16384x16384", "16384x8192"])
    ap.add_argument("--sweep", action="store_true", help="all tile configurations, not just the defaults")
    ap.add_argument("--layouts", nargs="*", default=["cutlass", "cusparselt"])
    ap.add_argument("--json", help="write the measurements here")
    args = ap.parse_args()
    results = []
    for shp in args.shape:
        t, f = (int(v) for v in shp.split("x"))
        y1 = (torch.randn(t, f, device="cuda") - 1.28).bfloat16()  # ~10% positive
        g2 = torch.randn(t, f, device="cuda").bfloat16()
        src = torch.empty_like(y1)
        dst = torch.empty_like(y1)
        copy = median_cuda_ms(lambda: dst.copy_(src), 3, 20)
        copy_gbs = 4 * t * f / copy / 1e6
        print(f"T x F = {t} x {f}: copy {copy:.3f} ms = {copy_gbs:.0f} GB/s")
        # bytes each kernel must move (bf16 "naive": no d_vals since session 5): forward reads Y1, writes
        # values + metadata; backward reads G2, S2 values, metadata, writes G1 values + G1^T + S2^T
        # packs (+ 5% dense rows)
        fwd_bytes = 2 * t * f + t * f + t * f // 8
        bwd_bytes = 2 * t * f + t * f + t * f // 8 + t * f + 2 * (t * f + t * f // 8)
        n_dense = reference.num_dense_features(f, 0.05)
        for lay in args.layouts:
            s2, d_vals, counts = ops.pack_relu2_sparse24(y1, "naive", None, 0, layout=lay)
            _, dense_pos = ops.dense_feature_split(counts[:-1], n_dense)
            for kind in ("fwd", "bwd"):
                for cfg in (CONFIGS[kind] if args.sweep else [DEFAULTS[kind]]):
                    if kind == "fwd":
                        fn = lambda: tk.pack_forward(y1, "naive", None, 0, 0, config=cfg, layout=lay)
                        nbytes = fwd_bytes
                    else:
                        fn = lambda: tk.pack_backward(g2, s2, d_vals, dense_pos, n_dense, True, config=cfg)
                        nbytes = bwd_bytes
                    try:
                        ms = median_cuda_ms(fn, 3, 20)
                    except Exception as e:  # a configuration the compiler rejects (e.g. out of registers)
                        print(f"  {lay:10s} {kind:5s} {cfg}: failed: {type(e).__name__}: {str(e)[:120]}")
                        continue
                    gbs = nbytes / ms / 1e6
                    print(f"  {lay:10s} {kind:4s} {str(cfg):13s} {ms:.3f} ms {gbs:5.0f} GB/s "
                          f"({100 * gbs / copy_gbs:.0f}% of copy){' default' if cfg == DEFAULTS[kind] else ''}",
                          flush=True)
                    results.append({"shape": [t, f], "layout": lay, "kernel": kind, "config": list(cfg), "ms": ms,
                                    "GBps": gbs, "copy_GBps": copy_gbs})
        unpack = median_cuda_ms(lambda: tk.unpack24(s2), 3, 20)
        print(f"  unpack24: {unpack:.3f} ms {(t * f + 2 * t * f + t * f // 8) / unpack / 1e6:.0f} GB/s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
