"""Does running a 2:4 GEMM slow the rest of the process? SM clock and power before and after one.

    python benchmarks/sparse_clock_probe.py [cslt:N ...]

Probes, in one process: an FMA-chain Triton kernel (clock-bound, far below the power limit), SDPA
forward + backward [4, 32, 4096, 128] causal bf16 and a 16384x4096 @ 4096x16384 bf16 GEMM (both at
the H200's 700 W limit), with nvidia-smi's SM clock and power sampled during 2 s of the latter two;
once at the start and again after each ``cslt:N`` step (three N^3 torch._cslt_sparse_mm products).
On an H200, one 128^3 2:4 product lowers the power-capped SM clock from ~1635 to 1560 MHz at the
same ~685 W for the rest of the process (SDPA +5.6 %, GEMM +5 %; the FMA kernel unchanged); a fresh
process starts fast again (docs/performance.md, "The clock penalty").
"""
import subprocess, sys, threading, time, statistics
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch, triton, triton.language as tl
import torch.nn.functional as F
from megatron_sparse24.backends import median_cuda_ms

@triton.jit
def alu_kernel(out_ptr, n_iter, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    x = tl.arange(0, BLOCK).to(tl.float32) + pid
    a = x * 0.5 + 1.0
    for _ in range(n_iter):
        x = x * 0.999 + a
        a = a * 0.999 + x
    tl.store(out_ptr + pid * BLOCK + tl.arange(0, BLOCK), x + a)

buf = torch.empty(132 * 32 * 256, device="cuda")
def alu():
    alu_kernel[(132 * 32,)](buf, 20000, BLOCK=256)

def smi_sampler(stop, out):
    while not stop.is_set():
        r = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True)
        try: out.append([float(v) for v in r.stdout.strip().split(",")])
        except ValueError: pass
        time.sleep(0.05)

q, k, v = (torch.randn(4, 32, 4096, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
g = torch.randn_like(q)
x = torch.randn(16384, 4096, device="cuda", dtype=torch.bfloat16); w = torch.randn(16384, 4096, device="cuda", dtype=torch.bfloat16)
def att():
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True); o.backward(g)
def probe(tag):
    alu_ms = median_cuda_ms(alu, 3, 10)
    stop, samples = threading.Event(), []
    t = threading.Thread(target=smi_sampler, args=(stop, samples)); t.start()
    sd, gm = [], []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < 2.0:
        sd.append(median_cuda_ms(att, 1, 5)); gm.append(median_cuda_ms(lambda: F.linear(x, w), 1, 5))
    stop.set(); t.join()
    alu2 = median_cuda_ms(alu, 3, 10)
    clk = statistics.median(s[0] for s in samples) if samples else None
    pw = statistics.median(s[1] for s in samples) if samples else None
    print(f"{tag:>16} alu {alu_ms:.3f}/{alu2:.3f} sdpa {statistics.median(sd):.3f} gemm {statistics.median(gm):.3f} "
          f"smi clock {clk} power {pw} n={len(samples)}", flush=True)

a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
t0 = time.perf_counter()
while time.perf_counter() - t0 < 5:
    for _ in range(16): torch.mm(a, b)
    torch.cuda.synchronize()
probe("start"); probe("start again")
for s in sys.argv[1:]:
    n = int(s.split(":")[1]) if ":" in s else 4096
    m = torch.tensor([1, 1, 0, 0], device="cuda", dtype=torch.bool).repeat(n, n // 4)
    wc = torch._cslt_compress(torch.randn(n, n, device="cuda", dtype=torch.bfloat16) * m)
    xx = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3): y = torch._cslt_sparse_mm(wc, xx)
    torch.cuda.synchronize()
    probe(f"after cslt {n}")
probe("end")
