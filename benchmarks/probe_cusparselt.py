"""Probe cuSPARSELt through torch on this GPU: which operand shapes it accepts, and how the
algorithm id changes the time of the four FFN GEMMs. Prints what it finds; no assertions.

    python benchmarks/probe_cusparselt.py [--shape 16384x4096x16384]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_sparse24.backends import median_cuda_ms  # noqa: E402
from megatron_sparse24.kernels import layout, reference  # noqa: E402


def packed(rows, cols, density=0.1):
    x = torch.rand(rows, cols, device="cuda") * (torch.rand(rows, cols, device="cuda") < density * 2)
    keep = reference.top2_keep(x.reshape(rows, cols // 4, 4)).reshape(rows, cols)
    return layout.compress24(torch.where(keep, x, 0.0).bfloat16(), keep)


def ms(fn, iters=20):
    return median_cuda_ms(fn, warmup=5, iters=iters)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="16384x4096x16384")
    args = ap.parse_args()
    print("accepted shapes (rows x cols of the sparse operand, n of the dense one):")
    for rows, cols, n in [(64, 64, 64), (32, 64, 64), (16, 64, 64), (64, 32, 64), (64, 16, 64), (96, 64, 64),
                          (64, 96, 64), (64, 64, 8), (64, 64, 16), (64, 64, 24), (64, 64, 40), (128, 128, 128)]:
        try:
            a = torch.randn(rows, cols, device="cuda").bfloat16()
            k = reference.top2_keep(a.float().reshape(rows, cols // 4, 4)).reshape(rows, cols)
            a = torch.where(k, a, 0)
            c = torch._cslt_compress(a)
            ours = layout.compress24(a, k)
            same = c.numel() == ours.buffer.numel() and torch.equal(c.reshape(-1).view(torch.int16), ours.buffer.view(torch.int16))
            b = torch.randn(cols, n, device="cuda").bfloat16()
            out = torch._cslt_sparse_mm(ours.cslt_operand(), b)
            err = float((out.float() - a.float() @ b.float()).abs().max())
            print(f"  {rows}x{cols} n={n}: compress numel {c.numel()} (ours {ours.buffer.numel()}, bytes equal {same}),"
                  f" mm max err {err:.3g}")
        except Exception as exc:  # report, keep probing
            print(f"  {rows}x{cols} n={n}: ERROR {str(exc).splitlines()[0][:120]}")
    t, d, f = (int(v) for v in args.shape.split("x"))
    print(f"alg_id sweep at T,D,F = {t},{d},{f} (ms; dense in brackets):")
    w1 = torch.randn(f, d, device="cuda").bfloat16()
    w2 = torch.randn(d, f, device="cuda").bfloat16()
    x = torch.randn(t, d, device="cuda").bfloat16()
    cases = {
        "F2 [T,F]x[F,D] (B=W2^T col-major)": (packed(t, f), w2.t(), False),
        "B2 [T,F]x[F,D] (B=W1 row-major)": (packed(t, f), w1, False),
        "B3 [F,T]x[T,D] -> [D,F]": (packed(f, t), x, True),
        "B4 [F,T]x[T,D]": (packed(f, t), x, False),
    }
    for name, (a, b, tr) in cases.items():
        dense = layout.decompress24(a)
        dense_ms = ms(lambda: dense @ b)
        found = []
        for alg in range(64):
            try:
                t_ms = ms(lambda: torch._cslt_sparse_mm(a.cslt_operand(), b, transpose_result=tr, alg_id=alg), iters=10)
            except Exception:
                break
            found.append((t_ms, alg))
        try:
            search = torch._cslt_sparse_mm_search(a.cslt_operand(), b, transpose_result=tr)
        except Exception as exc:
            search = f"error {exc}"
        best = min(found)
        print(f"  {name}: dense {dense_ms:.3f}; alg0 {found[0][0]:.3f}; best alg {best[1]} {best[0]:.3f} "
              f"({dense_ms / best[0]:.2f}x); {len(found)} algs; search -> {search}")
        for tr2 in ([not tr] if name.startswith("F2") or name.startswith("B2") else []):
            t2 = ms(lambda: torch._cslt_sparse_mm(a.cslt_operand(), b, transpose_result=tr2, alg_id=best[1]))
            print(f"     transpose_result={tr2}: {t2:.3f}")


if __name__ == "__main__":
    main()
