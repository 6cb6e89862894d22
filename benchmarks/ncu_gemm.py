"""One GEMM three ways, for Nsight Compute: cuBLAS dense, cuSPARSELt 2:4 and our CUTLASS 2:4 kernel,
each at its tuned choice, at M x K x N = 16384 x 16384 x 4096 (A 2:4 along K, B row-major [K, N]).

    ncu --nvtx --nvtx-include "prof/" --section SpeedOfLight --section ComputeWorkloadAnalysis \\
        --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \\
        --section LaunchStats --section SchedulerStats python benchmarks/ncu_gemm.py [--shape MxKxN]

Tuning and warm-up calls run outside the NVTX range "prof"; inside it each GEMM runs once, in its own
range (dense, cusparselt, cutlass), so ncu profiles exactly three kernels. ncu locks the SM clock
(1.33-1.35 GHz on the H200), so its durations are longer than bench_gemm.py's and free of the
power limit; compare the kernels' utilizations, not their times with other scripts'.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gemm import sparse_operand  # noqa: E402

from megatron_sparse24 import backends  # noqa: E402
from megatron_sparse24.kernels import layout  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="16384x16384x4096")
    args = ap.parse_args(argv)
    m, k, n = map(int, args.shape.split("x"))
    dense, keep = sparse_operand(m, k, torch.bfloat16)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    ops = {"dense": lambda: dense @ b}
    for name, get in (("cusparselt", backends.shared_cusparselt), ("cutlass", backends.shared_cutlass)):
        gemm = get(torch.cuda.current_device())
        a = layout.compress24(dense, keep, gemm.layout)
        ops[name] = lambda gemm=gemm, a=a: gemm.spmm(a, b)
    for fn in ops.values():
        for _ in range(5):  # tuning + warm-up, outside the profiled range
            fn()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("prof")
    for name, fn in ops.items():
        torch.cuda.nvtx.range_push(name)
        fn()
        torch.cuda.nvtx.range_pop()
    torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
