"""Does running a 2:4 GEMM slow the rest of the process? SM clock and power before and after one.

    python benchmarks/sparse_clock_probe.py [cslt:N | f1:N ...]

Probes, in one process: an FMA-chain Triton kernel (clock-bound, far below the power limit), SDPA
forward + backward [4, 32, 4096, 128] causal bf16 and a 16384x4096 @ 4096x16384 bf16 GEMM (both at
the H200's 700 W limit), with nvidia-smi's SM clock and power sampled during 2 s of the latter two;
once at the start and again after each step: ``cslt:N`` three N^3 torch._cslt_sparse_mm products,
``f1:N`` three N^3 dense F1 GEMMs of the package's CUTLASS library (``f1_products``).
On an H200, one 128^3 2:4 product lowers the power-capped SM clock from ~1635 to 1560 MHz at the
same ~685 W for the rest of the process (SDPA +5.6 %, GEMM +5 %; the FMA kernel unchanged); a fresh
process starts fast again (docs/performance.md, "The clock penalty").
"""

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import ClockSampler, median_cuda_ms  # noqa: E402


@triton.jit
def fma_chain_kernel(out_ptr, n_iter, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    x = tl.arange(0, BLOCK).to(tl.float32) + pid
    a = x * 0.5 + 1.0
    for _ in range(n_iter):
        x = x * 0.999 + a
        a = a * 0.999 + x
    tl.store(out_ptr + pid * BLOCK + tl.arange(0, BLOCK), x + a)


class Probes:
    """The three workloads, their inputs allocated once."""

    def __init__(self):
        self.buf = torch.empty(132 * 32 * 256, device="cuda")
        self.q, self.k, self.v = (torch.randn(4, 32, 4096, 128, device="cuda", dtype=torch.bfloat16,
                                              requires_grad=True) for _ in range(3))
        self.g = torch.randn_like(self.q)
        self.x = torch.randn(16384, 4096, device="cuda", dtype=torch.bfloat16)
        self.w = torch.randn(16384, 4096, device="cuda", dtype=torch.bfloat16)

    def fma(self):
        fma_chain_kernel[(132 * 32,)](self.buf, 20000, BLOCK=256)

    def attention(self):
        F.scaled_dot_product_attention(self.q, self.k, self.v, is_causal=True).backward(self.g)

    def gemm(self):
        F.linear(self.x, self.w)

    def run(self, tag: str) -> dict:
        fma_ms = median_cuda_ms(self.fma, 3, 10)
        attention, gemm = [], []
        with ClockSampler(torch.cuda.current_device()) as sampler:
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < 2.0:
                attention.append(median_cuda_ms(self.attention, 1, 5))
                gemm.append(median_cuda_ms(self.gemm, 1, 5))
        fma_after = median_cuda_ms(self.fma, 3, 10)
        clock, power = sampler.summary()
        row = {"tag": tag, "fma_ms": fma_ms, "fma_after_ms": fma_after, "sdpa_ms": statistics.median(attention),
               "gemm_ms": statistics.median(gemm), "clock_mhz": clock, "power_w": power}
        print(f"{tag:>16} fma {fma_ms:.3f}/{fma_after:.3f} sdpa {row['sdpa_ms']:.3f} gemm {row['gemm_ms']:.3f} "
              f"smi clock {clock} power {power} n={len(sampler.samples)}", flush=True)
        return row


def sparse_products(n: int) -> None:
    """Three N^3 2:4 products through cuSPARSELt."""
    mask = torch.tensor([1, 1, 0, 0], device="cuda", dtype=torch.bool).repeat(n, n // 4)
    packed = torch._cslt_compress(torch.randn(n, n, device="cuda", dtype=torch.bfloat16) * mask)
    dense = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        torch._cslt_sparse_mm(packed, dense)
    torch.cuda.synchronize()


def f1_products(n: int) -> None:
    """Three N^3 F1 GEMMs of this package's CUTLASS library: dense tensor-core MMA (the packer in the
    epilogue), launched the way its 2:4 GEMMs are. Whether they lower the clock too says whether the
    penalty comes with sparse MMA or with how these kernels are built and launched."""
    from megatron_sparse24.backends.dispatch import GemmChoice
    from megatron_sparse24.backends.f1_pack import shared_f1_packer

    packer = shared_f1_packer(torch.cuda.current_device())
    if packer is None:
        sys.exit("f1:N needs the CUTLASS library (README: build it, or set MEGATRON_SPARSE24_CUTLASS_LIB)")
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    w1 = torch.randn_like(x)
    kernels = packer._kernels(n, n, x.dtype, "cutlass")
    if not kernels:
        sys.exit(f"f1:{n}: no F1 kernel tile divides {n}")
    choice = GemmChoice("sparse", packer.library.f1_kernels.index(kernels[0]))  # kind "sparse": the fused kernel
    for _ in range(3):
        packer._fused(choice, x, w1, None, "cutlass")
    torch.cuda.synchronize()


#: probe steps: name -> what runs before the next measurement
STEPS = {"cslt": sparse_products, "f1": f1_products}


def main(argv=None):
    steps = []  # (name, N), parsed and checked before any GPU work
    for step in sys.argv[1:] if argv is None else argv:
        name, _, n = step.partition(":")
        if name not in STEPS or not (n == "" or n.isdigit()):
            sys.exit(f"unknown step {step!r}: expected " + " or ".join(f"{k}:N" for k in STEPS) + " (N an integer)")
        steps.append((name, int(n or 4096)))
    probes = Probes()
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 5:  # heat the GPU to its steady state first
        for _ in range(16):
            torch.mm(a, b)
        torch.cuda.synchronize()
    probes.run("start")
    probes.run("start again")
    for name, n in steps:
        STEPS[name](n)
        probes.run(f"after {name} {n}")
    probes.run("end")


if __name__ == "__main__":
    main()
