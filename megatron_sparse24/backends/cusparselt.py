"""The cuSPARSELt backend: NVIDIA's 2:4 kernels on the packed buffer as is (sparse tensor cores, sm80+),
called directly with one plan kept per GEMM shape (``megatron_sparse24.cslt``), with per-shape dispatch
among cuSPARSELt's algorithms and the dense alternative."""

from __future__ import annotations

import functools
import os
import warnings

import torch

from ..kernels.layout import Packed24
from .dispatch import GemmChoice, TuningCache, _check_layout, _Dispatcher, _dense_product, _fastest, tuning_cache
from .timing import interleaved_median_cuda_ms

#: cuSPARSELt operand alignment we require (rows of A, K, and N), in elements.
CUSPARSELT_ALIGN = 64


class Sparse24FallbackWarning(UserWarning):
    """The 2:4 GEMMs run a slower way than asked for (emulated, or cuSPARSELt through torch's per-call
    plan), for the reason the message gives."""


class CusparseltGemm(_Dispatcher):
    """2:4 GEMMs through cuSPARSELt with per-shape dispatch.

    ``direct=True`` calls the library through ``cslt.CusparseltLibrary``: torch's descriptors, one
    plan per GEMM configuration, so a call is one ``cusparseLtMatmul`` (~0.05 ms of host time);
    ``direct=False`` calls ``torch._cslt_sparse_mm``, which sets up the plan on every call (~0.75 ms
    of host time on an H200 host, longer than a 16384 x 2048 x 8192 FFN's GEMMs). Both run the same
    kernel on the same buffers: bit-identical results (tests/test_cslt.py).

    The first product of each (M, K, N, B layout, transpose_result, dtype) times every cuSPARSELt
    algorithm id and the dense alternative (unpack the operand, cuBLAS), and keeps the fastest for
    the rest of the process in ``choices`` (``autotune=False``: always algorithm 0). The dense
    alternative keeps the 2:4 numerics: only the GEMM engine changes.
    """

    name = "cusparselt"
    layout = "cusparselt"

    def __init__(self, autotune: bool = True, max_alg_id: int = 64, device_index: int = 0,
                 cache: TuningCache | None = None, direct: bool = False):
        self.autotune = autotune
        self.max_alg_id = max_alg_id
        self._init_tables(device_index, cache)
        # direct=True: cuSPARSELt through cslt.CusparseltLibrary (plans kept per shape) instead of
        # torch._cslt_sparse_mm (~0.75 ms of host time per call); same kernels, same results.
        self.direct = None
        if direct:
            from .. import cslt

            reason = cslt.unavailable_reason(torch.device("cuda", device_index))
            if reason:
                raise RuntimeError(f"direct cuSPARSELt calls cannot run: {reason}")
            self.direct = cslt.CusparseltLibrary(cslt.library_path(), device_index)

    def spmm(self, a: Packed24, b: torch.Tensor, transpose_result: bool = False, group=None) -> torch.Tensor:
        _check_layout(self, a)
        if not (b.is_contiguous() or b.t().is_contiguous()):
            b = b.contiguous()
        key = (a.rows, a.cols, b.shape[1], b.is_contiguous(), transpose_result, a.dtype, b.device.index)
        choice = self.choices.get(key)
        if choice is None:
            choice = self._tune(a, b, transpose_result) if self.autotune else GemmChoice("sparse", 0)
            self._remember(key, choice)
        choice = self._agreed_choice(key, choice, group, b.device)
        return self._run(choice, a, b, transpose_result)

    def _run(self, choice: GemmChoice, a: Packed24, b: torch.Tensor, transpose_result: bool) -> torch.Tensor:
        if choice.kind == "dense":
            return _dense_product(a, b, transpose_result)
        if self.direct is not None:
            return self.direct.matmul(a.buffer, b, a.rows, transpose_result, choice.alg_id)
        return torch._cslt_sparse_mm(a.cslt_operand(), b, transpose_result=transpose_result,
                                     alg_id=choice.alg_id)

    def _tune(self, a: Packed24, b: torch.Tensor, transpose_result: bool) -> GemmChoice:
        # One-time, off the steady-state path: host syncs are fine here.
        choices = []
        for alg in range(self.max_alg_id):
            choice = GemmChoice("sparse", alg)
            try:
                self._run(choice, a, b, transpose_result)  # its plan is made here (not timed)
            except RuntimeError:  # past the last algorithm id of this shape
                break
            choices.append(choice)
        dense = GemmChoice("dense")
        ms = interleaved_median_cuda_ms([lambda c=c: self._run(c, a, b, transpose_result) for c in [dense, *choices]])
        return _fastest(list(zip(ms[1:], choices)), ms[0])

@functools.lru_cache(maxsize=None)
def shared_cusparselt(device_index: int) -> CusparseltGemm:
    """The process's cuSPARSELt backend for one GPU: its dispatch tables (per GEMM, and per FFN shape
    the engine) are shared by every layer, so each shape is tuned once per process (set
    MEGATRON_SPARSE24_AUTOTUNE=0 to always use algorithm 0; $MEGATRON_SPARSE24_TUNING_CACHE keeps
    them across runs, ``TuningCache``). With ``shared_cutlass``, the package's only process-wide
    caches; they hold timings, not model state (and cuSPARSELt's handle and plans).

    It calls cuSPARSELt directly (``cslt.py``) unless MEGATRON_SPARSE24_CUSPARSELT_DIRECT=0 or the
    library cannot be loaded; then through ``torch._cslt_sparse_mm`` (same results, ~0.7 ms more host
    time per GEMM), with a Sparse24FallbackWarning saying why."""
    from .. import cslt

    direct = os.environ.get("MEGATRON_SPARSE24_CUSPARSELT_DIRECT", "1") != "0"
    reason = cslt.unavailable_reason(torch.device("cuda", device_index)) if direct else None
    if reason:
        warnings.warn(f"megatron_sparse24: cuSPARSELt through torch._cslt_sparse_mm (~0.7 ms of host time per "
                      f"GEMM), not called directly: {reason}", Sparse24FallbackWarning, stacklevel=2)
        direct = False
    return CusparseltGemm(autotune=os.environ.get("MEGATRON_SPARSE24_AUTOTUNE", "1") != "0",
                          device_index=device_index, direct=direct,
                          cache=tuning_cache("cusparselt direct" if direct else "cusparselt", device_index))

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
