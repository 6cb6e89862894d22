"""Does the per-shape GEMM tuner pick the fastest kernel? Its picks, repeated, against a long
interleaved re-timing of every pick, for the four 2:4 GEMMs of one FFN shape.

    python benchmarks/bench_tuning.py [--shape 16384x4096x16384] [--repeats 4] [--json out.json]

Per orientation (F2: B = W2^T, K-major; B2/B4: B row-major; B3: transposed result) and backend:
cuSPARSELt's tuner (``CusparseltGemm._tune``: its algorithms and the dense alternative, timed in
interleaved rounds) and, for comparison, the same candidates timed one after the other (each
``median_cuda_ms(fn, 2, 5)`` in turn: the tuners' former order); our CUTLASS dispatcher's tuner
where the library is available. Each distinct pick is then re-timed in 10 interleaved rounds, and
each tuning's regret (its pick's time over the best pick's, minus one) printed.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gemm import sparse_operand  # noqa: E402

from megatron_sparse24 import backends  # noqa: E402
from megatron_sparse24.cutlass import library as cutlass_library  # noqa: E402
from megatron_sparse24.backends import GemmChoice, interleaved_median_cuda_ms, median_cuda_ms  # noqa: E402
from megatron_sparse24.kernels import layout  # noqa: E402


def ident(c: GemmChoice) -> str:
    return c.kind if c.kind == "dense" else f"{c.alg_id}" + (f"/sched {c.sched}" if c.sched else "") + (
        " +B copy" if c.b_copy else "") + (" +D transpose" if c.out_transpose else "")


def one_after_another(gemm, a, b, tr) -> GemmChoice:
    """The cuSPARSELt tuner as it was: every algorithm, then dense, each timed on its own in turn."""
    timed = []
    for alg in range(gemm.max_alg_id):
        c = GemmChoice("sparse", alg)
        try:
            timed.append((median_cuda_ms(lambda: gemm._run(c, a, b, tr)), c))
        except RuntimeError:
            break
    dense_ms = median_cuda_ms(lambda: gemm._run(GemmChoice("dense"), a, b, tr))
    return backends.dispatch._fastest(timed, dense_ms)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="16384x4096x16384", help="T x D x F of the FFN")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    t, d, f = map(int, args.shape.split("x"))
    dense, keep = sparse_operand(t, f, torch.bfloat16)  # S2 / G1 [T, F]; its transpose has the same shape
    w2 = torch.randn(d, f, device="cuda", dtype=torch.bfloat16)
    b_rows = torch.randn(f, d, device="cuda", dtype=torch.bfloat16)
    orientations = {"F2 (B = W2^T, K-major)": (w2.t(), False), "B2/B4 (B row-major)": (b_rows, False),
                    "B3 (transposed result)": (b_rows, True)}
    tuners = [("cusparselt", backends.CusparseltGemm(direct=True))]
    if cutlass_library.unavailable_reason(torch.device("cuda"), torch.bfloat16) is None:
        tuners.append(("cutlass", backends.shared_cutlass(torch.cuda.current_device())))
    rows = []
    print(f"{torch.cuda.get_device_name()}  FFN {args.shape}")
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
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "shape": args.shape,
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
