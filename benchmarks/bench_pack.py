"""The pack kernels on this GPU: bandwidth against a device-to-device copy, tile sweeps, A/B against
another version of the kernels, and the choice of the dense features.

    python benchmarks/bench_pack.py [--shape 16384x16384 ...] [--sweep] [--json out.json]
    python benchmarks/bench_pack.py --against /tmp/old/megatron_sparse24/kernels [--kernels bwdp]
    python benchmarks/bench_pack.py --split [--features 1024 8192 16384 32768 65536] [--sweep]

For each shape and metadata layout: the forward packer (squared ReLU -> 2:4 -> values, d_vals,
metadata, counts) and the backward packer (G1 + the feature-wise packs of G1^T and S2^T + dense
rows + db1), and the dense-GEMM engine's two passes (dfwd: S2 dense + counts; dbwd: G1 and the
feature-wise 2:4 of G1 and S2, dense, through the permutation), in ms and in GB/s of the bytes each
must move; bwdp is the backward packer reading its rows through the token permutation, as the 2:4
engine runs it. ``--sweep`` times every configuration (BT, BF, num_warps) of CONFIGS; ``--maxnreg N ...``
also times each configuration with its registers capped at N (more resident warps).

``--against DIR``: the same kernels of another version (``git archive REV megatron_sparse24/kernels |
tar -x -C /tmp/old``; DIR is then ``/tmp/old/megatron_sparse24/kernels``) and of this checkout, each
at its own default tiles, in one process in the order A B B A A B B A A B (median of the medians, so
the clock's drift cancels), after checking that both give the same outputs.

``--split``: choosing the dense features per FFN width F, torch's sort (``reference.select_dense_features``
+ the positions scatter) against the ranking kernel (``dense_feature_split``): GPU time replayed from
a CUDA graph, CUDA events around an eager call (launch gaps included) and host time to enqueue.
Counts as the forward packer produces them: non-zeros per feature over 16384 tokens, most features
3-15 % non-zero plus a dense tail. With ``--sweep``, every (BI, BJ, num_warps) of SPLIT_CONFIGS.
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import copy_bandwidth, graphed_ms, host_ms, load_kernels, median_cuda_ms, pack_bytes, \
    parse_shape, write_json  # noqa: E402
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
SPLIT_CONFIGS = [(64, 256, 4), (32, 256, 4), (128, 128, 4), (64, 128, 4), (128, 256, 8), (32, 128, 2)]
DEFAULTS = {"fwd": tk.FWD_CONFIG, "bwd": tk.BWD_CONFIG, "bwdp": tk.BWD_CONFIG, "dfwd": tk.FWD_CONFIG,
            "dbwd": tk.DENSE_BWD_CONFIG}


def moved_bytes(t: int, f: int) -> dict:
    """``common.pack_bytes`` of each kernel as PackProblem runs it (bf16 "naive": no stored derivative;
    5 % dense features); "bwdp" moves what "bwd" does."""
    nbytes = pack_bytes(t, f, 2, False, reference.num_dense_features(f, 0.05))
    return {**nbytes, "bwdp": nbytes["bwd"]}


class PackProblem:
    """The pack kernels' inputs at T x F as the FFN has them (bf16 "naive"): Y1 ~10 % positive, G2,
    the token permutation, the dense-GEMM engine's S2, and per metadata layout the packed S2 with its
    dense features (``operands``). ``calls(module, layout)``: each kernel of a triton_kernels module
    (this checkout's, or another version's for ``--against``) on them, as a function of its tile
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


def _flat(o):
    if isinstance(o, (tuple, list)):
        return [z for x in o for z in _flat(x)]
    if o is None:
        return []
    return [o.buffer] if hasattr(o, "buffer") else [o]


def run_against(other_dir: str, shape: str, kernels: list) -> dict:
    """A/B of another version's kernels (A) against this checkout's (B), interleaved (see the docstring)."""
    other = load_kernels(other_dir)
    t, f = parse_shape(shape)
    problem = PackProblem(t, f)
    copy, copy_gbs = copy_bandwidth(problem.y1)
    nbytes = moved_bytes(t, f)
    res = {"shape": [t, f], "copy_ms": copy, "copy_GBps": copy_gbs, "rows": []}
    print(f"copy {copy:.3f} ms {copy_gbs:.0f} GB/s")
    for lay in ("cusparselt", "cutlass"):
        a_fns, b_fns = problem.calls(other, lay), problem.calls(tk, lay)  # at each version's default tiles
        for kind in kernels:
            if kind.startswith("d") and lay != "cusparselt":
                continue  # the dense passes have no layout
            outs = list(zip(_flat(a_fns[kind]()), _flat(b_fns[kind]())))
            same = all(torch.equal(a, b) for a, b in outs)
            # which outputs differ, and by how much (fp32 reductions such as db1 may differ in their
            # last bits when the tile's thread layout changes)
            diffs = {i: (a.float() - b.float()).abs().max().item() if a.dtype.is_floating_point else "differs"
                     for i, (a, b) in enumerate(outs) if not torch.equal(a, b)}
            ta, tb = [], []
            for order in ("AB", "BA", "AB", "BA", "AB"):
                for w in order:
                    (ta if w == "A" else tb).append(median_cuda_ms(a_fns[kind] if w == "A" else b_fns[kind], 3, 20))
            a, b = statistics.median(ta), statistics.median(tb)
            row = dict(layout=lay, kernel=kind, other_ms=a, this_ms=b, speedup=a / b, identical=same, differing=diffs,
                       other_pct_copy=100 * nbytes[kind] / a / 1e6 / copy_gbs,
                       this_pct_copy=100 * nbytes[kind] / b / 1e6 / copy_gbs)
            res["rows"].append(row)
            print(f"{lay:10s} {kind:5s} other {a:.3f} this {b:.3f} ms  x{a / b:.2f}  {row['other_pct_copy']:.0f}% -> "
                  f"{row['this_pct_copy']:.0f}% of copy  identical={same}"
                  f"{'' if same else f' (output #: max |diff| {diffs})'}", flush=True)
    return res


def realistic_counts(n_feats: int, tokens: int = 16384) -> torch.Tensor:
    """Per-feature non-zero counts over ``tokens`` tokens: most features 3-15 % non-zero, 2 % at 50 %."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    density = torch.rand(n_feats, generator=gen, device="cuda") * 0.12 + 0.03
    density[torch.randperm(n_feats, generator=gen, device="cuda")[: n_feats // 50]] = 0.5  # the dense tail
    return torch.binomial(torch.full_like(density, tokens), density, generator=gen).to(torch.int32)


def run_split(features: list, sweep: bool) -> list:
    """The dense features' choice: sort vs ranking kernel per width (see the docstring)."""
    rows = []
    print("| F | n_dense | path | GPU ms (graphed) | eager ms (events) | host ms |\n|---|---|---|---|---|---|")
    for f in features:
        counts = realistic_counts(f)
        n_dense = reference.num_dense_features(f, 0.05)

        def sort_path():
            idx = reference.select_dense_features(counts, n_dense, sort_indices=False)
            return idx, ops._dense_positions(idx, f)

        want = sort_path()
        paths = {"sort (reference)": sort_path}
        for cfg in SPLIT_CONFIGS if sweep else [tk.DENSE_SPLIT_CONFIG]:
            got = tk.dense_feature_split(counts, n_dense, cfg)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), f"kernel {cfg} disagrees with the sort at F={f}"
            paths[f"kernel {cfg}"] = lambda cfg=cfg: tk.dense_feature_split(counts, n_dense, cfg)
        for name, fn in paths.items():
            r = {"F": f, "n_dense": n_dense, "path": name, "gpu_ms": graphed_ms(fn, 3, 20),
                 "eager_ms": median_cuda_ms(fn, 3, 20), "host_ms": host_ms(fn, 50)}
            rows.append(r)
            print(f"| {f} | {n_dense} | {name} | {r['gpu_ms']:.4f} | {r['eager_ms']:.4f} | {r['host_ms']:.4f} |")
    return rows


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
    ap.add_argument("--against", metavar="DIR", help="A/B against the kernels package at DIR (see above)")
    ap.add_argument("--split", action="store_true", help="time the choice of the dense features instead")
    ap.add_argument("--features", type=int, nargs="*", default=[1024, 8192, 16384, 32768, 65536],
                    help="FFN widths for --split")
    ap.add_argument("--json", help="write the measurements here")
    args = ap.parse_args()
    if args.against:
        write_json(args.json, run_against(args.against, args.shape[0], args.kernels))
        return
    if args.split:
        write_json(args.json, {"rows": run_split(args.features, args.sweep)})
        return
    results = []
    for shp in args.shape:
        t, f = parse_shape(shp)
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
    write_json(args.json, {"rows": results})


if __name__ == "__main__":
    main()
