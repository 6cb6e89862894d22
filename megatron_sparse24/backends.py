"""GEMM backends for products with a packed 2:4 left operand.

Every backend computes ``A @ B`` for A a ``Packed24`` [M, K] (2:4 along K) and B a dense [K, N]
tensor, returning [M, N] (or its transpose [N, M], contiguous, with ``transpose_result=True``):

* ``EmulatedGemm``: decompresses A and runs a dense matmul. Runs anywhere; the reference numerics.
* ``CusparseltGemm``: ``torch._cslt_sparse_mm`` on the packed buffer as is (sparse tensor cores,
  sm80+), with per-shape dispatch among cuSPARSELt's algorithms and a dense fallback for shapes
  where sparse loses. B may be row-major or the transpose of a row-major tensor (e.g. ``w.t()``).
"""

from __future__ import annotations

import functools
import os
import statistics
import warnings
from dataclasses import dataclass

import torch

from .kernels.layout import Packed24, decompress24
from .ops import unpack24


class Sparse24FallbackWarning(UserWarning):
    """backend='auto' could not use the sparse GEMMs and fell back to the emulated backend."""

#: cuSPARSELt operand alignment we require (rows of A, K, and N), in elements.
CUSPARSELT_ALIGN = 64


class EmulatedGemm:
    name = "emulated"

    def spmm(self, a: Packed24, b: torch.Tensor, transpose_result: bool = False) -> torch.Tensor:
        out = decompress24(a) @ b
        return out.t().contiguous() if transpose_result else out


@dataclass(frozen=True)
class GemmChoice:
    """How one GEMM shape runs: a cuSPARSELt algorithm id, or dense on the unpacked operand."""

    kind: str  # "sparse" or "dense"
    alg_id: int = 0
    sparse_ms: float = float("nan")  # best sparse time measured when tuning
    dense_ms: float = float("nan")  # unpack + dense GEMM time measured when tuning


class CusparseltGemm:
    """2:4 GEMMs through ``torch._cslt_sparse_mm`` with per-shape dispatch.

    The first product of each (M, K, N, B layout, transpose_result, dtype) times every cuSPARSELt
    algorithm id and the dense alternative (unpack the operand, cuBLAS), and keeps the fastest for
    the rest of the process in ``choices`` (``autotune=False``: always algorithm 0). The dense
    alternative keeps the 2:4 numerics: only the GEMM engine changes.
    """

    name = "cusparselt"

    def __init__(self, autotune: bool = True, max_alg_id: int = 64):
        self.autotune = autotune
        self.max_alg_id = max_alg_id
        self.choices: dict[tuple, GemmChoice] = {}

    def spmm(self, a: Packed24, b: torch.Tensor, transpose_result: bool = False) -> torch.Tensor:
        if not (b.is_contiguous() or b.t().is_contiguous()):
            b = b.contiguous()
        key = (a.rows, a.cols, b.shape[1], b.is_contiguous(), transpose_result, a.dtype, b.device.index)
        choice = self.choices.get(key)
        if choice is None:
            choice = self._tune(a, b, transpose_result) if self.autotune else GemmChoice("sparse", 0)
            self.choices[key] = choice
        return self._run(choice, a, b, transpose_result)

    @staticmethod
    def _run(choice: GemmChoice, a: Packed24, b: torch.Tensor, transpose_result: bool) -> torch.Tensor:
        if choice.kind == "dense":
            dense = unpack24(a)
            return b.t() @ dense.t() if transpose_result else dense @ b
        return torch._cslt_sparse_mm(a.cslt_operand(), b, transpose_result=transpose_result,
                                     alg_id=choice.alg_id)

    def _tune(self, a: Packed24, b: torch.Tensor, transpose_result: bool) -> GemmChoice:
        # One-time, off the steady-state path: host syncs are fine here.
        dense_ms = median_cuda_ms(lambda: self._run(GemmChoice("dense"), a, b, transpose_result))
        best = None
        for alg in range(self.max_alg_id):
            try:
                ms = median_cuda_ms(lambda: self._run(GemmChoice("sparse", alg), a, b, transpose_result))
            except RuntimeError:  # past the last algorithm id of this shape
                break
            if best is None or ms < best[0]:
                best = (ms, alg)
        if best is None or dense_ms < best[0]:
            return GemmChoice("dense", 0, best[0] if best else float("inf"), dense_ms)
        return GemmChoice("sparse", best[1], best[0], dense_ms)


def median_cuda_ms(fn, warmup: int = 2, iters: int = 5, setup=None) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA stream: CUDA events around ``fn`` only
    (``setup()`` runs before each call, untimed), after ``warmup`` calls. Syncs: not for hot paths."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    times = []
    for _ in range(iters):
        if setup:
            setup()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@functools.lru_cache(maxsize=None)
def shared_cusparselt(device_index: int) -> CusparseltGemm:
    """The process's cuSPARSELt backend for one GPU: its dispatch table is shared by every layer, so
    each GEMM shape is tuned once per process (set MEGATRON_SPARSE24_AUTOTUNE=0 to always use
    algorithm 0). This is the package's one process-wide cache; it holds timings, not model state."""
    return CusparseltGemm(autotune=os.environ.get("MEGATRON_SPARSE24_AUTOTUNE", "1") != "0")


def cusparselt_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the cuSPARSELt backend cannot run on (device, dtype), or None if it can."""
    if device.type != "cuda":
        return f"tensors are on {device.type}, cuSPARSELt needs CUDA tensors"
    if not hasattr(torch, "_cslt_sparse_mm"):
        return f"this torch ({torch.__version__}) has no torch._cslt_sparse_mm"
    if not torch.backends.cusparselt.is_available():
        return "this torch build has no cuSPARSELt (torch.backends.cusparselt.is_available() is False)"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return (f"GPU {torch.cuda.get_device_name(device)} (sm{major}{minor}) has no sparse tensor cores: "
                "2:4 GEMMs need sm80 or newer (A100, H100, H200, ...)")
    if dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {dtype}: the sparse GEMMs run in bfloat16 or float16 (use --bf16)"
    return None


def cusparselt_shape_problem(tokens: int, features: int, hidden: int) -> str | None:
    """Why an FFN of this shape cannot use cuSPARSELt (alignment), or None."""
    for name, n in (("tokens per micro-batch", tokens), ("FFN width per rank", features),
                    ("hidden size", hidden)):
        if n % CUSPARSELT_ALIGN:
            return f"{name}={n} is not a multiple of {CUSPARSELT_ALIGN}"
    return None


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int]):
    """Backend object for config name ``name`` on (device, dtype) for an FFN of shape (T, F, D).

    "auto" picks cuSPARSELt where it can run and the emulated backend elsewhere (on a GPU with a
    Sparse24FallbackWarning, shown once per reason); "cusparselt" raises a ValueError naming the fix when it cannot run.
    """
    if name == "emulated":
        return EmulatedGemm()
    reason = cusparselt_unavailable_reason(device, dtype) or cusparselt_shape_problem(*shape)
    if name == "cusparselt":
        if reason:
            raise ValueError(f"backend='cusparselt' cannot run: {reason}. Fix that, or use backend='auto' "
                             "or 'emulated'")
        return shared_cusparselt(device.index if device.index is not None else torch.cuda.current_device())
    if name != "auto":
        raise ValueError(f"unknown backend {name!r}; expected 'auto', 'cusparselt' or 'emulated'")
    if reason:
        if device.type != "cuda":  # CPU runs are emulated by design: nothing to warn about
            return EmulatedGemm()
        # Python shows each distinct warning once per call site, so this does not flood the log.
        warnings.warn(f"megatron_sparse24: backend 'auto' uses the emulated (dense) GEMMs: {reason}",
                      Sparse24FallbackWarning, stacklevel=3)
        return EmulatedGemm()
    return shared_cusparselt(device.index if device.index is not None else torch.cuda.current_device())

