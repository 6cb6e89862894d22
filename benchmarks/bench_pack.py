"""The pack kernels on this GPU: bandwidth against a device-to-device copy, tile sweeps.

    python benchmarks/bench_pack.py [--shape 16384x16384 ...] [--sweep] [--json out.json]

For each shape and metadata layout: the forward packer (squared ReLU -> 2:4 -> values, d_vals,
metadata, counts) and the backward packer (G1 + the feature-wise packs of G1^T and S2^T + dense
rows + db1), and the dense-GEMM engine's two passes (dfwd: S2 dense + counts; dbwd: G1 and the
feature-wise 2:4 of G1 and S2, dense, through the permutation), in ms and in GB/s of the bytes each
must move; bwdp is the backward packer reading its rows through the token permutation, as the 2:4
engine runs it. ``--sweep`` times every configuration (BT, BF, num_warps) of CONFIGS; ``--maxnreg N ...``
also times each configuration with its registers capped at N (more resident warps).
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
    "bwdp": [(32, 64, 2), (64, 64, 4), (32, 128, 2), (32, 32, 1), (32, 64, 1), (32, 64, 4), (64, 64, 2)],
    "dfwd": [(32, 64, 2), (32, 128, 4), (64, 64, 4), (64, 128, 4)],
    "dbwd": [(32, 128, 4), (32, 64, 2), (64, 64, 4), (32, 256, 4), (64, 128, 8)],
}
DEFAULTS = {"fwd": tk.FWD_CONFIG, "bwd": tk.BWD_CONFIG, "bwdp": tk.BWD_CONFIG, "dfwd": tk.FWD_CONFIG,
            "dbwd": tk.DENSE_BWD_CONFIG}


def moved_bytes(t: int, f: int) -> dict:
    """Bytes each kernel must move at T x F, bf16 "naive" (no d_vals: bf16 "naive" recomputes them): the forward
    packer reads Y1, writes values + metadata; the backward packer reads G2, S2 values, metadata,
    writes G1 values + the G1^T and S2^T packs (+ 5 % dense rows, not counted); the dense-GEMM
    engine's passes read and write whole [T, F] tensors."""
    fwd = 2 * t * f + t * f + t * f // 8
    bwd = 2 * t * f + t * f + t * f // 8 + t * f + 2 * (t * f + t * f // 8)
    return {"fwd": fwd, "bwd": bwd, "bwdp": bwd, "dfwd": 4 * t * f, "dbwd": 10 * t * f + 8 * t}


class PackProblem:
    """The pack kernels' inputs at T x F as the FFN has them (bf16 "naive"): Y1 ~10 % positive, G2,
    the token permutation, the dense-GEMM engine's S2, and per metadata layout the packed S2 with its
    dense features (``operands``). ``calls(module, layout)``: each kernel of a triton_kernels module
    (this checkout's, or another commit's for ab_pack.py) on them, as a function of its tile
    configuration (None: the module's default), keyed as CONFIGS."""

    def __init__(self, t: int, f: int, device="cuda"):
        self.t, self.f = t, f
        self.y1 = (torch.randn(t, f, device=device) - 1.28).bfloat16()  # ~10% positive
        self.g2 = torch.randn(t, f, device=device).bfloat16()
        self.n_dense = reference.num_dense_features(f, 0.05)
        self.perm, self.inv = ops.token_permutation(t, 1, device)
        self.s2_dense, _, _ = ops.sparsify_forward_dense(self.y1, "naive", None, 0, row_ids=self.inv)
        self._operands = {}

    def operands(self, lay: str):
        """(s2 Packed24, d_vals, dense_pos) in metadata layout ``lay``, computed once."""
        if lay not in self._operands:
            s2, d_vals, counts = ops.pack_relu2_sparse24(self.y1, "naive", None, 0, layout=lay, row_ids=self.inv)
            self._operands[lay] = (s2, d_vals, ops.dense_feature_split(counts[:-1], self.n_dense)[1])
        return self._operands[lay]

    def calls(self, module, lay: str) -> dict:
        y1, g2, perm, inv, n_dense = self.y1, self.g2, self.perm, self.inv, self.n_dense
        s2, d_vals, dense_pos = self.operands(lay)
        return {
            "fwd": lambda cfg=None: module.pack_forward(y1, "naive", None, 0, 0, config=cfg, layout=lay, row_ids=inv),
            "bwd": lambda cfg=None: module.pack_backward(g2, s2, d_vals, dense_pos, n_dense, True, config=cfg),
            "bwdp": lambda cfg=None: module.pack_backward(g2, s2, d_vals, dense_pos, n_dense, True, config=cfg,
                                                          perm=perm),
            "dfwd": lambda cfg=None: module.sparsify_forward_dense(y1, "naive", None, 0, 0, row_ids=inv, config=cfg),
            "dbwd": lambda cfg=None: module.sparsify_backward_dense(g2, self.s2_dense, None, dense_pos, perm, True,
                                                                    config=cfg),
        }


def copy_bandwidth(like: torch.Tensor) -> tuple[float, float]:
    """(ms, GB/s) of a device-to-device copy of a tensor like ``like`` (read + write)."""
    src, dst = torch.empty_like(like), torch.empty_like(like)
    ms = median_cuda_ms(lambda: dst.copy_(src), 3, 20)
    return ms, 2 * like.numel() * like.element_size() / ms / 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", nargs="*", default=["16384x16384", "16384x8192"])
    ap.add_argument("--sweep", action="store_true", help="all tile configurations, not just the defaults")
    ap.add_argument("--layouts", nargs="*", default=["cutlass", "cusparselt"])
    ap.add_argument("--maxnreg", type=int, nargs="*", default=[], help="also time each configuration with "
                    "at most this many registers per thread")
    ap.add_argument("--configs", nargs="*", default=[], metavar="BT,BF,WARPS[,MAXNREG]",
                    help="time these configurations (instead of the defaults or --sweep's)")
    ap.add_argument("--kernels", nargs="*", default=["fwd", "bwd", "dfwd", "dbwd"], choices=list(CONFIGS))
    ap.add_argument("--json", help="write the measurements here")
    args = ap.parse_args()
    results = []
    for shp in args.shape:
        t, f = (int(v) for v in shp.split("x"))
        problem = PackProblem(t, f)
        copy, copy_gbs = copy_bandwidth(problem.y1)
        print(f"T x F = {t} x {f}: copy {copy:.3f} ms = {copy_gbs:.0f} GB/s")
        nbytes = moved_bytes(t, f)
        for lay in args.layouts:
            kernels = problem.calls(tk, lay)
            for kind in args.kernels:
                if kind.startswith("d") and lay != args.layouts[0]:
                    continue  # the dense passes have no layout
                configs = CONFIGS[kind] if args.sweep else [DEFAULTS[kind]]
                if args.configs:
                    configs = [tuple(int(v) for v in c.split(",")) for c in args.configs]
                configs = configs + [tuple(c[:3]) + (r,) for c in configs for r in args.maxnreg]
                for cfg in configs:
                    fn = lambda: kernels[kind](cfg)
                    try:
                        ms = median_cuda_ms(fn, 3, 20)
                    except Exception as e:  # a configuration the compiler rejects (e.g. out of registers)
                        print(f"  {lay:10s} {kind:5s} {cfg}: failed: {type(e).__name__}: {str(e)[:120]}")
                        continue
                    gbs = nbytes[kind] / ms / 1e6
                    print(f"  {lay:10s} {kind:4s} {str(cfg):13s} {ms:.3f} ms {gbs:5.0f} GB/s "
                          f"({100 * gbs / copy_gbs:.0f}% of copy){' default' if cfg == DEFAULTS[kind] else ''}",
                          flush=True)
                    results.append({"shape": [t, f], "layout": lay, "kernel": kind, "config": list(cfg), "ms": ms,
                                    "GBps": gbs, "copy_GBps": copy_gbs})
        s2 = problem.operands(args.layouts[-1])[0]
        unpack = median_cuda_ms(lambda: tk.unpack24(s2), 3, 20)
        print(f"  unpack24: {unpack:.3f} ms {(t * f + 2 * t * f + t * f // 8) / unpack / 1e6:.0f} GB/s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
