"""GEMM backends for products with a packed 2:4 left operand.

Every backend computes ``A @ B`` for A a ``Packed24`` [M, K] (2:4 along K) and B a dense [K, N]
tensor, returning [M, N] (or its transpose [N, M], contiguous, with ``transpose_result=True``):

* ``EmulatedGemm``: decompresses A and runs a dense matmul. Runs anywhere; the reference numerics.
* ``CusparseltGemm``: ``torch._cslt_sparse_mm`` on the packed buffer as is (sparse tensor cores,
  sm80+). B may be row-major or the transpose of a row-major tensor (e.g. ``w.t()``).
"""

from __future__ import annotations

import warnings

import torch

from .kernels.layout import Packed24, decompress24


class Sparse24FallbackWarning(UserWarning):
    """backend='auto' could not use the sparse GEMMs and fell back to the emulated backend."""

#: cuSPARSELt operand alignment we require (rows of A, K, and N), in elements.
CUSPARSELT_ALIGN = 64


class EmulatedGemm:
    name = "emulated"

    def spmm(self, a: Packed24, b: torch.Tensor, transpose_result: bool = False) -> torch.Tensor:
        out = decompress24(a) @ b
        return out.t().contiguous() if transpose_result else out


class CusparseltGemm:
    name = "cusparselt"

    def spmm(self, a: Packed24, b: torch.Tensor, transpose_result: bool = False) -> torch.Tensor:
        if not (b.is_contiguous() or b.t().is_contiguous()):
            b = b.contiguous()
        return torch._cslt_sparse_mm(a.buffer, b, transpose_result=transpose_result)


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

    "auto" picks cuSPARSELt where it can run and the emulated backend elsewhere (logged once per
    reason); "cusparselt" raises a ValueError naming the fix when it cannot run.
    """
    if name == "emulated":
        return EmulatedGemm()
    reason = cusparselt_unavailable_reason(device, dtype) or cusparselt_shape_problem(*shape)
    if name == "cusparselt":
        if reason:
            raise ValueError(f"backend='cusparselt' cannot run: {reason}. Fix that, or use backend='auto' "
                             "or 'emulated'")
        return CusparseltGemm()
    if name != "auto":
        raise ValueError(f"unknown backend {name!r}; expected 'auto', 'cusparselt' or 'emulated'")
    if reason:
        if device.type != "cuda":  # CPU runs are emulated by design: nothing to warn about
            return EmulatedGemm()
        # Python shows each distinct warning once per call site, so this does not flood the log.
        warnings.warn(f"megatron_sparse24: backend 'auto' uses the emulated (dense) GEMMs: {reason}",
                      Sparse24FallbackWarning, stacklevel=3)
        return EmulatedGemm()
    return CusparseltGemm()

