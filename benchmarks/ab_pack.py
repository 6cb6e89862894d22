"""A/B of the pack kernels against another version of them, in one process, interleaved.

    git show a7330e6:megatron_sparse24/kernels/triton_kernels.py > /tmp/tk_old.py
    python benchmarks/ab_pack.py /tmp/tk_old.py --json out.json [--kernels bwdp ...]

Times the forward packer (fwd), the backward packer through the token permutation (bwdp, as the
2:4 engine runs it) and the dense-GEMM engine's two passes (dfwd, dbwd) of the given old module and
of this checkout's, at 16384 x 16384 bf16 (Y1 ~10 % positive) in both metadata layouts, in the
order A B B A A B B A A B (median of the medians), checks that both give bit-identical outputs, and
reports each against a device-to-device copy's bandwidth (bytes: bench_pack.moved_bytes). Inputs
and calls: bench_pack.PackProblem. Other tile configurations: bench_pack.py --configs.
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
from megatron_sparse24.backends import median_cuda_ms  # noqa: E402
from megatron_sparse24.kernels import triton_kernels as new  # noqa: E402
from bench_pack import PackProblem, copy_bandwidth, moved_bytes  # noqa: E402


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
    ap.add_argument("--kernels", nargs="*", default=["fwd", "bwdp", "dfwd", "dbwd"],
                    choices=["fwd", "bwdp", "dfwd", "dbwd"])
    ap.add_argument("--json")
    args = ap.parse_args()
    old = load_module(args.old)
    t, f = (int(v) for v in args.shape.split("x"))
    problem = PackProblem(t, f)
    copy, copy_gbs = copy_bandwidth(problem.y1)
    nbytes = moved_bytes(t, f)
    res = {"shape": [t, f], "copy_ms": copy, "copy_GBps": copy_gbs, "rows": []}
    print(f"copy {copy:.3f} ms {copy_gbs:.0f} GB/s")
    for lay in ("cusparselt", "cutlass"):
        a_fns, b_fns = problem.calls(old, lay), problem.calls(new, lay)  # at each module's default tiles
        for kind in args.kernels:
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
            row = dict(layout=lay, kernel=kind, old_ms=a, new_ms=b, speedup=a / b, identical=same, differing=diffs,
                       old_pct_copy=100 * nbytes[kind] / a / 1e6 / copy_gbs,
                       new_pct_copy=100 * nbytes[kind] / b / 1e6 / copy_gbs)
            res["rows"].append(row)
            print(f"{lay:10s} {kind:5s} old {a:.3f} new {b:.3f} ms  x{a / b:.2f}  {row['old_pct_copy']:.0f}% -> "
                  f"{row['new_pct_copy']:.0f}% of copy  identical={same}{'' if same else f' (output #: max |diff| {diffs})'}",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
