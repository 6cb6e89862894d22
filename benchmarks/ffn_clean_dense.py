"""The 2:4 FFN against a dense FFN timed in a clean process (no 2:4 kernel run yet).

    python benchmarks/ffn_clean_dense.py

16384 x 4096 x 16384 bf16, forward + backward, medians of CUDA-event timings after a 10 s load:
the dense FFN (dense_relu2_ffn) first, in a process where no 2:4 GEMM has run; again after one
128^3 2:4 product (which lowers the power-capped clock for the rest of the process,
benchmarks/sparse_clock_probe.py); then the 2:4 FFN (backend auto, permutation precomputed as the
layer does). The honest FFN speedup is against the first; in-process A/B benchmarks (bench_ffn,
bench_gemm) time their dense side after 2:4 kernels and report a ratio ~4.5 % too high.
Inputs: plain randn (relu(Y1)^2 about half zeros), not bench_ffn's realistic activations.
"""
import sys, time, statistics
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
from megatron_sparse24 import Sparse24Config, ops
from megatron_sparse24.functional import sparse24_ffn, dense_relu2_ffn, permutation_seed
from megatron_sparse24.backends import median_cuda_ms

T, D, Fh = 16384, 4096, 16384
x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
w1 = (torch.randn(Fh, D, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
w2 = (torch.randn(D, Fh, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
gy = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
cfg = Sparse24Config(dense_warmup_steps=0, backend="auto")
perm = ops.token_permutation(T, permutation_seed(cfg, 1), x.device)
def dense():
    dense_relu2_ffn(x, w1, w2).backward(gy)
def sparse():
    sparse24_ffn(x, w1, w2, config=cfg, step=0, seed=1, permutation=perm).backward(gy)
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
t0 = time.perf_counter()
while time.perf_counter() - t0 < 10:
    for _ in range(16): torch.mm(a, b)
    torch.cuda.synchronize()
del a, b
def rounds(fn, n=3):
    return statistics.median(median_cuda_ms(fn, 3, 10) for _ in range(n))
d_clean = [rounds(dense), rounds(dense)]
m = torch.tensor([1, 1, 0, 0], device="cuda", dtype=torch.bool).repeat(128, 32)
y = torch._cslt_sparse_mm(torch._cslt_compress(torch.randn(128, 128, device="cuda", dtype=torch.bfloat16) * m),
                          torch.randn(128, 128, device="cuda", dtype=torch.bfloat16))
torch.cuda.synchronize()
d_after = [rounds(dense), rounds(dense)]
sparse(); torch.cuda.synchronize()  # tuning
s = [rounds(sparse), rounds(sparse)]
d_last = rounds(dense)
print(f"FFN {T}x{D}x{Fh} bf16 fwd+bwd ms: dense clean {d_clean}, dense after one 128^3 2:4 GEMM {d_after}, "
      f"2:4 auto {s}, dense last {d_last:.3f}")
dc, da, sp = statistics.mean(d_clean), statistics.mean(d_after), statistics.mean(s)
print(f"speedup vs clean dense {dc / sp:.3f}x; vs dense in the same process {da / sp:.3f}x; penalty {da / dc:.3f}")
