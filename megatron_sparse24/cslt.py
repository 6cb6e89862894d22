"""cuSPARSELt called directly (ctypes), one matmul plan per GEMM shape kept for the process.

``torch._cslt_sparse_mm`` builds cuSPARSELt's matrix descriptors and matmul plan on every call and
destroys them after it: 0.72-0.78 ms of host time per GEMM on the H200 (docs/performance.md),
longer than the GPU time of a 16384 x 2048 x 8192 FFN's GEMMs. ``CusparseltLibrary`` sets them up
once per (M, K, N, B order, D order, dtype, algorithm), with exactly torch's arguments
(aten/src/ATen/native/sparse/cuda/cuSPARSELtOps.cpp, ``_cslt_sparse_mm_impl``), so it reads the same
compressed buffers (``Packed24`` in the "cusparselt" layout = what ``torch._cslt_compress`` writes)
and runs the same kernel for the same algorithm id; each call is then one ``cusparseLtMatmul``.

Validated on the H200 (cuSPARSELt 0.8.0; tests/test_cslt.py): products bit-identical to
``torch._cslt_sparse_mm``'s in all four orientations; 0.04-0.14 ms of host time per call instead of
0.72-0.78 ms. ``backends.shared_cusparselt`` uses it unless MEGATRON_SPARSE24_CUSPARSELT_DIRECT=0 or
the library cannot be loaded. The library's handle and plans live as long as the object (one per
GPU in the process, like torch's own handle); they are not destroyed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import site
from dataclasses import dataclass
from pathlib import Path

import torch

# Enumerators of cusparse.h / cusparseLt.h (read from the headers of cuSPARSELt 0.8.0 and CUDA 13.0 on
# the H200 machine; stable across releases since 0.5).
ORDER_COL, ORDER_ROW = 1, 2  # cusparseOrder_t
OP_N, OP_T = 0, 1  # cusparseOperation_t
SPARSITY_50 = 0  # cusparseLtSparsity_t
COMPUTE_32F = 2  # cusparseComputeType (cuSPARSELt >= 0.5.2: fp16/bf16 inputs accumulate in fp32)
ALG_DEFAULT = 0  # cusparseLtMatmulAlg_t
ALG_CONFIG_ID = 0  # cusparseLtMatmulAlgAttribute_t
#: cudaDataType of the 2:4 dtypes (fp32 would mean cuSPARSELt's 1:2 TF32 sparsity, not our format)
CUDA_TYPES = {torch.float16: 2, torch.bfloat16: 14}
#: Bytes reserved for each opaque cuSPARSELt structure (the headers have used 1024 and 11024).
OPAQUE_BYTES = 16384


class _Opaque:
    """A zeroed, 16-byte-aligned host buffer for one opaque cuSPARSELt structure."""

    __slots__ = ("_buf", "ptr")

    def __init__(self):
        self._buf = (ctypes.c_uint8 * (OPAQUE_BYTES + 16))()
        addr = ctypes.addressof(self._buf)
        self.ptr = ctypes.c_void_p(addr + (-addr % 16))


def descriptor_args(m: int, k: int, n: int, b_contiguous: bool, transpose_result: bool) -> dict:
    """The descriptors torch's ``_cslt_sparse_mm`` builds for D = A @ B, A [m, k] 2:4 (compressed),
    B [k, n] (row-major, or a transposed view of a row-major [n, k]), D [m, n] (or, transposed,
    a row-major [n, m]): {"a", "b", "d": (rows, cols, ld, order), "op_b"}."""
    return {
        "a": (m, k, k, ORDER_ROW),
        "b": (k, n, n, ORDER_ROW) if b_contiguous else (n, k, k, ORDER_ROW),
        "op_b": OP_N if b_contiguous else OP_T,
        "d": (m, n, m, ORDER_COL) if transpose_result else (m, n, n, ORDER_ROW),
    }


def library_path() -> str | None:
    """Where libcusparseLt is: $MEGATRON_SPARSE24_CUSPARSELT_LIB, else the copy this process already
    loaded (torch's CUDA library links it: the same file torch._cslt_sparse_mm uses), else pip's
    nvidia-cusparselt wheel next to torch, else the system's; None if none is found."""
    env = os.environ.get("MEGATRON_SPARSE24_CUSPARSELT_LIB")
    if env:
        return env
    try:
        with open("/proc/self/maps") as maps:
            loaded = sorted({line.split()[-1] for line in maps if "libcusparseLt" in line})
    except OSError:  # not Linux
        loaded = []
    if loaded:
        return loaded[0]
    roots = [Path(torch.__file__).parents[1], *map(Path, site.getsitepackages())]
    found = [lib for root in roots for lib in sorted((root / "nvidia").glob("*/lib/libcusparseLt.so*"))]
    return str(found[0]) if found else ctypes.util.find_library("cusparseLt")


@dataclass
class _Plan:
    """Descriptors, algorithm selection and plan of one GEMM configuration (kept alive together)."""

    structs: tuple
    plan: _Opaque
    workspace_bytes: int
    out_shape: tuple[int, int]


class CusparseltLibrary:
    """libcusparseLt with one handle (per device) and its matmul plans, built on first use of each
    configuration and kept for the object's lifetime."""

    def __init__(self, path: str, device_index: int):
        self.path = path
        self.device_index = device_index
        self._lib = ctypes.CDLL(path)
        self._bind()
        self._handle = _Opaque()
        with torch.cuda.device(device_index):
            self._check(self._lib.cusparseLtInit(self._handle.ptr), "cusparseLtInit")
        self._plans: dict[tuple, _Plan] = {}

    def _bind(self):
        lib, p, i64, u32, i32, sz = self._lib, ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32, ctypes.c_int, \
            ctypes.c_size_t
        signatures = {
            "cusparseLtInit": [p],
            "cusparseLtStructuredDescriptorInit": [p, p, i64, i64, i64, u32, i32, i32, i32],
            "cusparseLtDenseDescriptorInit": [p, p, i64, i64, i64, u32, i32, i32],
            "cusparseLtMatmulDescriptorInit": [p, p, i32, i32, p, p, p, p, i32],
            "cusparseLtMatmulAlgSelectionInit": [p, p, p, i32],
            "cusparseLtMatmulAlgSetAttribute": [p, p, i32, p, sz],
            "cusparseLtMatmulPlanInit": [p, p, p, p],
            "cusparseLtMatmulGetWorkspace": [p, p, ctypes.POINTER(sz)],
            "cusparseLtMatmul": [p, p, p, p, p, p, p, p, p, ctypes.POINTER(p), i32],
        }
        for name, args in signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed with cusparseStatus_t {status}")

    def plan(self, m: int, k: int, n: int, b_contiguous: bool, transpose_result: bool, dtype: torch.dtype,
             alg_id: int) -> _Plan:
        if dtype not in CUDA_TYPES:
            raise ValueError(f"dtype {dtype}: 2:4 GEMMs run in bfloat16 or float16")
        key = (m, k, n, b_contiguous, transpose_result, dtype, alg_id)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._make_plan(*key)
        return plan

    def _make_plan(self, m, k, n, b_contiguous, transpose_result, dtype, alg_id) -> _Plan:
        lib, h, t = self._lib, self._handle.ptr, CUDA_TYPES[dtype]
        args = descriptor_args(m, k, n, b_contiguous, transpose_result)
        a, b, d, matmul, alg, plan = (_Opaque() for _ in range(6))
        self._check(lib.cusparseLtStructuredDescriptorInit(h, a.ptr, *args["a"][:3], 16, t, args["a"][3], SPARSITY_50),
                    "cusparseLtStructuredDescriptorInit")
        self._check(lib.cusparseLtDenseDescriptorInit(h, b.ptr, *args["b"][:3], 16, t, args["b"][3]),
                    "cusparseLtDenseDescriptorInit (B)")
        self._check(lib.cusparseLtDenseDescriptorInit(h, d.ptr, *args["d"][:3], 16, t, args["d"][3]),
                    "cusparseLtDenseDescriptorInit (D)")
        self._check(lib.cusparseLtMatmulDescriptorInit(h, matmul.ptr, OP_N, args["op_b"], a.ptr, b.ptr, d.ptr, d.ptr,
                                                       COMPUTE_32F), "cusparseLtMatmulDescriptorInit")
        self._check(lib.cusparseLtMatmulAlgSelectionInit(h, alg.ptr, matmul.ptr, ALG_DEFAULT),
                    "cusparseLtMatmulAlgSelectionInit")
        alg_value = ctypes.c_int(alg_id)
        self._check(lib.cusparseLtMatmulAlgSetAttribute(h, alg.ptr, ALG_CONFIG_ID, ctypes.byref(alg_value),
                                                        ctypes.sizeof(alg_value)),
                    f"cusparseLtMatmulAlgSetAttribute (algorithm {alg_id})")
        self._check(lib.cusparseLtMatmulPlanInit(h, plan.ptr, matmul.ptr, alg.ptr), "cusparseLtMatmulPlanInit")
        ws = ctypes.c_size_t(0)
        self._check(lib.cusparseLtMatmulGetWorkspace(h, plan.ptr, ctypes.byref(ws)), "cusparseLtMatmulGetWorkspace")
        return _Plan((a, b, d, matmul, alg), plan, ws.value, (n, m) if transpose_result else (m, n))

    def matmul(self, compressed: torch.Tensor, b: torch.Tensor, m: int, transpose_result: bool,
               alg_id: int) -> torch.Tensor:
        """What ``torch._cslt_sparse_mm(compressed.view(m, -1), b, transpose_result=..., alg_id=...)``
        returns: compressed is A's flat buffer (values, then metadata), b [K, N] row-major or the
        transposed view of a row-major [N, K]; on the current stream, no host sync."""
        k, n = b.shape
        plan = self.plan(m, k, n, b.is_contiguous(), transpose_result, b.dtype, alg_id)
        out = torch.empty(plan.out_shape, dtype=b.dtype, device=b.device)
        workspace = torch.empty(max(plan.workspace_bytes, 1), dtype=torch.uint8, device=b.device)
        stream = ctypes.c_void_p(torch._C._cuda_getCurrentRawStream(b.device.index))
        one, zero = ctypes.c_float(1.0), ctypes.c_float(0.0)
        self._check(self._lib.cusparseLtMatmul(
            self._handle.ptr, plan.plan.ptr, ctypes.byref(one), ctypes.c_void_p(compressed.data_ptr()),
            ctypes.c_void_p(b.data_ptr()), ctypes.byref(zero), ctypes.c_void_p(out.data_ptr()),
            ctypes.c_void_p(out.data_ptr()), ctypes.c_void_p(workspace.data_ptr()), ctypes.byref(stream), 1),
            f"cusparseLtMatmul (M={m} K={k} N={n}, algorithm {alg_id})")
        return out


def unavailable_reason(device: torch.device) -> str | None:
    """Why the direct binding cannot run on ``device``, or None."""
    if device.type != "cuda":
        return f"tensors are on {device.type}, cuSPARSELt needs CUDA tensors"
    path = library_path()
    if path is None:
        return ("libcusparseLt not found: install torch's nvidia-cusparselt wheel or set "
                "MEGATRON_SPARSE24_CUSPARSELT_LIB to libcusparseLt.so")
    try:
        ctypes.CDLL(path)
    except OSError as e:
        return f"cannot load {path}: {e}"
    return None
