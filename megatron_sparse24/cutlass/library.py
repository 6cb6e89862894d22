"""Load the CUTLASS sm90 2:4 GEMM library (``build.py``) and call its kernels on torch tensors.

``load()`` returns the process's ``CutlassLibrary``: from ``$MEGATRON_SPARSE24_CUTLASS_LIB`` (a
prebuilt ``libsp24_cutlass.so``), else from the on-disk build cache, else it builds there when
``build=True`` (minutes; ``python -m megatron_sparse24.cutlass.build`` does it ahead of time).
``unavailable_reason()`` says why the backend cannot run here (no sm90 GPU, no library), or None.
"""

from __future__ import annotations

import ctypes
import functools
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from . import build as _build

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Kernel:
    spec: _build.KernelSpec
    run: object  # ctypes function: (a, e, b, d, m, n, k, sm_count, sched, ws, ws_bytes, stream) -> int
    workspace: object  # ctypes function: (m, n, k, sm_count, sched) -> size_t


#: Tile-scheduler options a kernel takes at run time (``sched`` of ``CutlassLibrary.run``): bits 0-1
#: log2 of the swizzle width, bits 2-3 the raster order (0 CUTLASS's heuristic, 1 along M, 2 along N).
SCHED_DEFAULT = 0
SCHED_OPTIONS = tuple(swizzle | (raster << 2) for raster in (1, 2) for swizzle in range(4))


def sched_name(sched: int) -> str:
    raster = {0: "heuristic", 1: "along M", 2: "along N"}[(sched >> 2) & 3]
    return f"swizzle {1 << (sched & 3)}, raster {raster}"


class CutlassLibrary:
    """The compiled kernels of one ``libsp24_cutlass.so``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lib = ctypes.CDLL(str(self.path))
        names = (self.path.parent / "kernels.txt").read_text().split()
        self.kernels: list[Kernel] = []
        # Entry points (sp24_gemm.cuh): NAME_run(pointers..., ints..., workspace, bytes, stream) -> int
        # status and NAME_workspace(ints...) -> bytes; GEMMs take 4 pointers and (m, n, k, sm_count,
        # sched), compressors 3 pointers and (m, k, sm_count).
        for spec in map(_build.KernelSpec.from_name, names):
            self.kernels.append(Kernel(spec, *self._entry(spec.name, pointers=4, ints=5)))
        self._compressors = {dtype: self._entry(_build.compressor_name(dtype), pointers=3, ints=3)
                             for dtype in {k.spec.dtype for k in self.kernels}}
        # F1 with the forward packer (f1_pack_gemm.cuh): 7 pointers (x, w1, b1, values, meta, counts,
        # y1) and (m, n, k, sm_count, sched). A library built before these kernels existed has none.
        f1_names = self.path.parent / "f1_kernels.txt"
        self.f1_kernels: list[Kernel] = [
            Kernel(spec, *self._entry(spec.name, pointers=7, ints=5))
            for spec in map(_build.F1PackSpec.from_name, f1_names.read_text().split() if f1_names.exists() else [])]

    def _entry(self, name: str, pointers: int, ints: int):
        run = getattr(self._lib, f"{name}_run")
        run.restype = ctypes.c_int
        run.argtypes = [ctypes.c_void_p] * pointers + [ctypes.c_int] * ints + [ctypes.c_void_p, ctypes.c_size_t,
                                                                               ctypes.c_void_p]
        workspace = getattr(self._lib, f"{name}_workspace")
        workspace.restype = ctypes.c_size_t
        workspace.argtypes = [ctypes.c_int] * ints
        return run, workspace

    def candidates(self, dtype: torch.dtype, b_kmajor: bool, d_rowmajor: bool) -> list[Kernel]:
        name = _DTYPES.get(dtype)
        return [k for k in self.kernels
                if k.spec.dtype == name and k.spec.b_kmajor == b_kmajor and k.spec.d_rowmajor == d_rowmajor]

    @staticmethod
    def run(kernel: Kernel, values: torch.Tensor, meta: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
            m: int, n: int, k: int, sm_count: int, workspace: torch.Tensor | None,
            sched: int = SCHED_DEFAULT) -> None:
        """D = A @ B on the current stream. Pointers must be 16-byte aligned; no checks beyond
        CUTLASS's own ``can_implement`` (callers validate shapes)."""
        # the raw handle, without building a torch.cuda.Stream object each call (host time)
        stream = torch._C._cuda_getCurrentRawStream(out.device.index)
        ws_ptr, ws_bytes = (workspace.data_ptr(), workspace.numel()) if workspace is not None else (None, 0)
        rc = kernel.run(values.data_ptr(), meta.data_ptr(), b.data_ptr(), out.data_ptr(), m, n, k, sm_count,
                        sched, ws_ptr, ws_bytes, stream)
        _check(rc, f"CUTLASS kernel {kernel.spec.name} on M={m} N={n} K={k}")

    def f1_candidates(self, dtype: torch.dtype, layout: str) -> list[Kernel]:
        name = _DTYPES.get(dtype)
        return [k for k in self.f1_kernels if k.spec.dtype == name and k.spec.layout == layout]

    @staticmethod
    def f1_pack(kernel: Kernel, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None,
                values: torch.Tensor | None, meta: torch.Tensor | None, counts: torch.Tensor | None, sm_count: int,
                workspace: torch.Tensor | None, y1: torch.Tensor | None = None, sched: int = SCHED_DEFAULT) -> None:
        """F1 and the forward packer in one kernel on the current stream: x [M, K], w1 [N, K] (both
        row-major, 16-byte aligned) -> values [M, N/2], meta (``kernel.spec.layout``), counts int32
        [N+1] accumulated into (zero it first); y1 [M, N] also written when given. M and N must be
        multiples of the kernel's tile. values, meta, counts and y1 all None: the GEMM's mainloop
        alone, nothing written (benchmarks)."""
        def ptr(t):
            return t.data_ptr() if t is not None else None

        stream = torch._C._cuda_getCurrentRawStream(x.device.index)
        m, k = x.shape
        n = w1.shape[0]
        rc = kernel.run(x.data_ptr(), w1.data_ptr(), ptr(b1), ptr(values), ptr(meta), ptr(counts), ptr(y1), m, n, k,
                        sm_count, sched, ptr(workspace), workspace.numel() if workspace is not None else 0, stream)
        _check(rc, f"CUTLASS F1+pack kernel {kernel.spec.name} on M={m} N={n} K={k}")

    def compress(self, dense: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, sm_count: int) -> None:
        """CUTLASS's own compressor: dense row-major [M, K] (<= 2 non-zeros per 4 along K) -> values
        [M, K/2] and metadata in the layout the kernels read (the tests compare our packers with it).
        ``meta`` must hold CUTLASS's padded metadata (M to 64 rows, K to META_K columns)."""
        dtype = _DTYPES.get(dense.dtype)
        if dtype not in self._compressors:
            raise ValueError(f"no {dense.dtype} kernels (and so no compressor) in {self.path}")
        run, ws_size = self._compressors[dtype]
        m, k = dense.shape
        ws_bytes = ws_size(m, k, sm_count)
        ws = torch.empty(ws_bytes, dtype=torch.uint8, device=dense.device) if ws_bytes else None
        stream = torch.cuda.current_stream(dense.device).cuda_stream
        rc = run(dense.data_ptr(), values.data_ptr(), meta.data_ptr(), m, k, sm_count,
                 ws.data_ptr() if ws is not None else None, ws_bytes, stream)
        _check(rc, f"CUTLASS compressor on M={m} K={k}")


def _check(rc: int, what: str) -> None:
    if rc:
        reason = {1: "cannot implement this shape", 2: "initialize failed", 3: "launch failed"}.get(rc, rc)
        raise RuntimeError(f"{what}: {reason}")


def library_path(build: bool = False) -> Path | None:
    """Path of a usable library: $MEGATRON_SPARSE24_CUTLASS_LIB, the cache, or (build=True) a new build."""
    env = os.environ.get("MEGATRON_SPARSE24_CUTLASS_LIB")
    if env:
        if not Path(env).exists():
            raise RuntimeError(f"MEGATRON_SPARSE24_CUTLASS_LIB={env} does not exist")
        return Path(env)
    try:
        compiler = _build.nvcc()
        cached = _build.cache_dir() / _build.library_key(_build.default_kernels(), compiler) / _build.LIB_NAME
    except (RuntimeError, OSError, subprocess.CalledProcessError):
        if build:
            raise
        return None
    if cached.exists():
        return cached
    return _build.build() if build else None


@functools.lru_cache(maxsize=None)
def _load_once(build: bool) -> CutlassLibrary | str:
    # Probed once per process (layers ask on every forward): the library, or why there is none.
    try:
        path = library_path(build)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        return str(e)
    if path is None:
        return ("the CUTLASS library is not built: run `python -m megatron_sparse24.cutlass.build` (needs nvcc "
                "and `pip install megatron_sparse24[cuda]`) or set MEGATRON_SPARSE24_CUTLASS_LIB to a prebuilt "
                "libsp24_cutlass.so")
    return CutlassLibrary(path)


def load(build: bool = False) -> CutlassLibrary:
    """The process's library (loaded once; kernels only, no model state). RuntimeError if unavailable."""
    lib = _load_once(build)
    if isinstance(lib, str):
        raise RuntimeError(lib)
    return lib


def unavailable_reason(device: torch.device, dtype: torch.dtype, build: bool = False) -> str | None:
    """Why the CUTLASS backend cannot run on (device, dtype), or None if it can."""
    if device.type != "cuda":
        return f"tensors are on {device.type}, the CUTLASS backend needs CUDA tensors"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) != (9, 0):
        return (f"GPU {torch.cuda.get_device_name(device)} is sm{major}{minor}: the CUTLASS kernels are built for "
                "sm90a (H100/H200); use backend='cusparselt'")
    if dtype not in _DTYPES:
        return f"dtype {dtype}: the sparse GEMMs run in bfloat16 or float16 (use --bf16)"
    try:
        lib = load(build)
    except RuntimeError as e:
        return str(e)
    if not any(k.spec.dtype == _DTYPES[dtype] for k in lib.kernels):
        return f"the CUTLASS library at {lib.path} has no {_DTYPES[dtype]} kernels"
    return None
