"""A/B of the pack kernels against another version of them, in one process, interleaved.

    git show a7330e6:megatron_sparse24/kernels/triton_kernels.py > /tmp/tk_old.py
    python benchmarks/ab_pack.py /tmp/tk_old.py --json out.json [--sweep] [--kernels bwdp ...]

Times the forward packer (fwd), the backward packer through the token permutation (bwdp, as the
2:4 engine runs it) and the dense-GEMM engine's two passes (dfwd, dbwd) of the given old module and
of this checkout's, at 16384 x 16384 bf16 (Y1 ~10 % positive) in both metadata layouts, in the
order A B B A A B B A A B (median of the medians), checks that both give bit-identical outputs, and
reports each against a device-to-device copy's bandwidth (bytes: bench_pack.moved_bytes).
``--sweep`` also times this checkout's forward packer at several tile configurations.
"""

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_sparse24 import ops  # noqa: E402
from megatron_sparse24.backends import median_cuda_ms  # noqa: E402
from megatron_sparse24.kernels import reference  # noqa: E402
from megatron_sparse24.kernels import triton_kernels as new  # noqa: E402
from bench_pack import moved_bytes  # noqa: E402

FWD_SWEEP = [(32, 64, 2), (64, 64, 4), (32, 128, 2), (64, 128, 4), (32, 64, 4), (64, 64, 2), (32, 128, 4)]


def load_module(path: str):
    """The kernels module at ``path`` (a copy of kernels/triton_kernels.py from another commit), its
    relative imports made absolute so it loads next to this checkout's package."""
    src = Path(path).read_text().replace("from .layout", "from megatron_sparse24.kernels.layout")
    src = src.replace("from .reference", "from megatron_sparse24.kernels.reference")
    # Triton's JIT reads the kernels' source from a real file
    tmp = Path(tempfile.mkdtemp()) / "old_triton_kernels.py"
    tmp.write_text(src)
    spec = importlib.util.spec_from_file_location("old_triton_kernels", tmp)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _flat(o):
    if isinstance(o, (tuple, list)):
        return [z for x in o for z in _flat(x)]
    if o is None:
        return []
    return [o.buffer] if hasattr(o, "buffer") else [o]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", help="path of the other version's triton_kernels.py")
    ap.add_argument("--shape", default="16384x16384")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--kernels", nargs="*", default=["fwd", "bwdp", "dfwd", "dbwd"],
                    choices=["fwd", "bwdp", "dfwd", "dbwd"])
    ap.add_argument("--json")
    args = ap.parse_args()
    old = load_module(args.old)
    t, f = (int(v) for v in args.shape.split("x"))
    y1 = (torch.randn(t, f, device="cuda") - 1.28).bfloat16()
    g2 = torch.randn(t, f, device="cuda").bfloat16()
    src, dst = torch.empty_like(y1), torch.empty_like(y1)
    copy = median_cuda_ms(lambda: dst.copy_(src), 3, 20)
    copy_gbs = 4 * t * f / copy / 1e6
    nbytes = moved_bytes(t, f)
    n_dense = reference.num_dense_features(f, 0.05)
    perm, inv = ops.token_permutation(t, 1, y1.device)
    s2d, _, _ = new.sparsify_forward_dense(y1, "naive", None, 0, 0, row_ids=inv)
    res = {"shape": [t, f], "copy_ms": copy, "copy_GBps": copy_gbs, "rows": []}
    print(f"copy {copy:.3f} ms {copy_gbs:.0f} GB/s")
    for lay in ("cusparselt", "cutlass"):
        s2, d_vals, counts = ops.pack_relu2_sparse24(y1, "naive", None, 0, layout=lay)
        _, dense_pos = ops.dense_feature_split(counts[:-1], n_dense)

        def kernels(m):
            return {
                "fwd": lambda: m.pack_forward(y1, "naive", None, 0, 0, layout=lay, row_ids=inv),
                "bwdp": lambda: m.pack_backward(g2, s2, d_vals, dense_pos, n_dense, True, perm=perm),
                "dfwd": lambda: m.sparsify_forward_dense(y1, "naive", None, 0, 0, row_ids=inv),
                "dbwd": lambda: m.sparsify_backward_dense(g2, s2d, None, dense_pos, perm, True),
            }

        a_fns, b_fns = kernels(old), kernels(new)
        for kind in a_fns:
            if kind not in args.kernels or (kind.startswith("d") and lay != "cusparselt"):
                continue  # (the dense passes have no layout)
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
            row = dict(layout=lay, kernel=kind, old_ms=a, new_ms=b, speedup=a / b, identical=same, differing=diffs,
                       old_pct_copy=100 * nbytes[kind] / a / 1e6 / copy_gbs,
                       new_pct_copy=100 * nbytes[kind] / b / 1e6 / copy_gbs)
            res["rows"].append(row)
            print(f"{lay:10s} {kind:5s} old {a:.3f} new {b:.3f} ms  x{a / b:.2f}  {row['old_pct_copy']:.0f}% -> "
                  f"{row['new_pct_copy']:.0f}% of copy  identical={same}{'' if same else f' (output #: max |diff| {diffs})'}",
                  flush=True)
        for cfg in FWD_SWEEP if args.sweep else []:
            ms = median_cuda_ms(lambda: new.pack_forward(y1, "naive", None, 0, 0, config=cfg, layout=lay,
                                                         row_ids=inv), 3, 20)
            print(f"  new fwd {lay} {cfg}: {ms:.3f} ms {100 * nbytes['fwd'] / ms / 1e6 / copy_gbs:.0f}% of copy", flush=True)
            res["rows"].append(dict(layout=lay, kernel="fwd_sweep", config=cfg, ms=ms))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
