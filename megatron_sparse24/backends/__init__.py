"""GEMM backends for products with a packed 2:4 left operand, behind one protocol and one registry.

Every backend computes ``A @ B`` for A a ``Packed24`` [M, K] (2:4 along K) and B a dense [K, N]
tensor, returning [M, N] (or its transpose [N, M], contiguous, with ``transpose_result=True``):

* ``emulated.EmulatedGemm``: decompresses A and runs a dense matmul. Runs anywhere; the reference
  numerics.
* ``cusparselt.CusparseltGemm``: cuSPARSELt on the packed buffer as is (sparse tensor cores, sm80+).
* ``cutlass.CutlassGemm``: our CUTLASS sm90 kernels on operands packed in CUTLASS's metadata layout.

The two real backends dispatch per GEMM shape among their kernels and the dense alternative
(``dispatch.py``: the choices, the on-disk tuning cache, the agreement of each choice among the ranks
of a layer's tensor-parallel group). Each backend names the metadata ``layout`` its operands must be packed in; the
FFN packs for it. Adding a backend: a module with its class (a ``Sparse24Gemm``), its process-wide
instance per GPU and its availability check, one ``Backend`` entry in ``BACKENDS`` below, and its
name in ``config.BACKENDS`` (the user-facing choices).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch

from ..kernels.layout import Packed24
from .cusparselt import (CUSPARSELT_ALIGN, CusparseltGemm, Sparse24FallbackWarning, cusparselt_shape_problem,
                         cusparselt_unavailable_reason, shared_cusparselt)
from .cutlass import CutlassGemm, shared_cutlass, tma_aligned
from .dispatch import TUNING_CACHE_ENV, GemmChoice, TuningCache, tuning_cache
from .emulated import EmulatedGemm
from .timing import interleaved_median_cuda_ms, median_cuda_ms

__all__ = ["device_index", "Sparse24Gemm", "Backend", "BACKENDS", "BACKEND_NAMES", "resolve_backend",
           "auto_alternatives", "describe_backend", "EmulatedGemm", "CusparseltGemm", "CutlassGemm", "GemmChoice",
           "TuningCache", "tuning_cache", "TUNING_CACHE_ENV", "Sparse24FallbackWarning", "CUSPARSELT_ALIGN",
           "cusparselt_shape_problem", "cusparselt_unavailable_reason", "shared_cusparselt", "shared_cutlass",
           "tma_aligned", "median_cuda_ms", "interleaved_median_cuda_ms"]


class Sparse24Gemm(Protocol):
    """What the FFN needs of a backend. ``layout``: the metadata layout its operands are packed in.
    ``group``: the layer's tensor-parallel ranks (dispatching backends agree on each shape's choice among
    them). Dispatching backends also carry ``ffn_engines`` / ``ffn_settled`` / ``remember_ffn_engine`` /
    ``device_index``, where ``engine.choose_engine`` keeps its per-FFN-shape decisions."""

    name: str
    layout: str

    def spmm(self, a: Packed24, b: torch.Tensor, transpose_result: bool = False, group=None) -> torch.Tensor: ...


@dataclass(frozen=True)
class Backend:
    """A 2:4 GEMM backend on sparse tensor cores: ``shared(device_index)`` is the process's instance for
    one GPU (one dispatch table shared by every layer); ``unavailable_reason(device, dtype, shape,
    build)`` says why it cannot run an FFN of shape (T, F, D) there, or None (``build``: whether it may
    build what it needs first, minutes)."""

    name: str
    shared: Callable[[int], Sparse24Gemm]
    unavailable_reason: Callable[[torch.device, torch.dtype, tuple, bool], Optional[str]]


def _cutlass_unavailable(device, dtype, shape, build: bool) -> Optional[str]:
    from ..cutlass import library

    return cusparselt_shape_problem(*shape) or library.unavailable_reason(device, dtype, build=build)


def _cusparselt_unavailable(device, dtype, shape, build: bool) -> Optional[str]:
    return cusparselt_unavailable_reason(device, dtype) or cusparselt_shape_problem(*shape)


#: The 2:4 backends, in the order backend "auto" prefers them where they can run.
BACKENDS = (Backend("cutlass", shared_cutlass, _cutlass_unavailable),
            Backend("cusparselt", shared_cusparselt, _cusparselt_unavailable))
BACKEND_NAMES = tuple(b.name for b in BACKENDS)


def device_index(device: torch.device) -> int:
    """The CUDA device index of ``device`` (the current device for a bare "cuda"; 0 off CUDA)."""
    if device.index is not None:
        return device.index
    return torch.cuda.current_device() if device.type == "cuda" else 0


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int]):
    """Backend object for config name ``name`` on (device, dtype) for an FFN of shape (T, F, D).

    "auto" picks the first of ``BACKENDS`` that can run as things are (our CUTLASS kernels where their
    library is built or given by $MEGATRON_SPARSE24_CUTLASS_LIB, else cuSPARSELt), else the emulated
    backend (on a GPU with a Sparse24FallbackWarning, shown once per reason). A named backend may build
    what it needs ("cutlass": its library, minutes) and raises a ValueError naming the fix when it
    cannot run.
    """
    if name == "emulated":
        return EmulatedGemm()
    by_name = {b.name: b for b in BACKENDS}
    if name != "auto":
        backend = by_name.get(name)
        if backend is None:
            raise ValueError(f"unknown backend {name!r}; expected 'auto', "
                             + ", ".join(repr(n) for n in BACKEND_NAMES) + " or 'emulated'")
        reason = backend.unavailable_reason(device, dtype, shape, True)
        if reason:
            others = ", ".join(repr(n) for n in BACKEND_NAMES if n != name)
            raise ValueError(f"backend={name!r} cannot run: {reason}. Fix that, or use backend='auto', {others} "
                             "or 'emulated'")
        return backend.shared(device_index(device))
    reason = None
    for backend in BACKENDS:
        reason = backend.unavailable_reason(device, dtype, shape, False)
        if reason is None:
            return backend.shared(device_index(device))
    if device.type == "cuda":  # CPU runs are emulated by design: nothing to warn about
        # Python shows each distinct warning once per call site, so this does not flood the log.
        warnings.warn(f"megatron_sparse24: backend 'auto' uses the emulated (dense) GEMMs: {reason}",
                      Sparse24FallbackWarning, stacklevel=3)
    return EmulatedGemm()


def auto_alternatives(primary, device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int]) -> tuple:
    """The other 2:4 backends backend "auto" times against ``primary`` (what ``resolve_backend``
    picked) per FFN shape: every other registered one that can run as things are. On an H200
    (docs/performance.md) cuSPARSELt's kernels win the large FFNs and the two are level at
    16384 x 2048 x 8192, so the choice is measured, not assumed."""
    name = getattr(primary, "name", None)
    if name not in BACKEND_NAMES:
        return ()
    return tuple(b.shared(device_index(device)) for b in BACKENDS
                 if b.name != name and b.unavailable_reason(device, dtype, shape, False) is None)


def describe_backend(name: str, device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int]) -> str:
    """One log line: what backend ``name`` resolves to for an FFN of shape (T, F, D) on (device, dtype),
    e.g. "auto -> cutlass (per FFN shape, the 2:4 or the dense-GEMM engine, timed at the first sparse
    step)". Resolving may warn (Sparse24FallbackWarning) where "auto" has to emulate."""
    if name == "dense":
        return "dense (the 2:4 model on dense GEMMs)"
    backend = resolve_backend(name, device, dtype, shape)
    if backend.name == "emulated":
        return f"{name} -> emulated (dense GEMMs on the decompressed 2:4 operands)"
    line = f"{name} -> {backend.name} (2:4 GEMMs on sparse tensor cores"
    if name == "auto":
        others = "".join(f", {b.name}'s 2:4 GEMMs" for b in auto_alternatives(backend, device, dtype, shape))
        line += f"; per FFN shape, this{others} or the same model on dense GEMMs, whichever a one-time timing " \
                "at the first sparse step finds faster"
    return line + ")"


