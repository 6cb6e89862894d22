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
    run: object  # ctypes function: (a, e, b, d, m, n, k, sm_count, ws, ws_bytes, stream) -> int
    workspace: object  # ctypes function: (m, n, k, sm_count) -> size_t


class CutlassLibrary:
    """The compiled kernels of one ``libsp24_cutlass.so``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lib = ctypes.CDLL(str(self.path))
        names = (self.path.parent / "kernels.txt").read_text().split()
        self.kernels: list[Kernel] = []
        for spec in map(_build.KernelSpec.from_name, names):
            run = getattr(self._lib, f"{spec.name}_run")
            run.restype = ctypes.c_int
            run.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 4 + [ctypes.c_void_p, ctypes.c_size_t,
                                                                         ctypes.c_void_p]
            ws = getattr(self._lib, f"{spec.name}_workspace")
            ws.restype = ctypes.c_size_t
            ws.argtypes = [ctypes.c_int] * 4
            self.kernels.append(Kernel(spec, run, ws))

    def candidates(self, dtype: torch.dtype, b_kmajor: bool, d_rowmajor: bool) -> list[Kernel]:
        name = _DTYPES.get(dtype)
        return [k for k in self.kernels
                if k.spec.dtype == name and k.spec.b_kmajor == b_kmajor and k.spec.d_rowmajor == d_rowmajor]

    @staticmethod
    def run(kernel: Kernel, values: torch.Tensor, meta: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
            m: int, n: int, k: int, sm_count: int, workspace: torch.Tensor | None) -> None:
        """D = A @ B on the current stream. Pointers must be 16-byte aligned; no checks beyond
        CUTLASS's own ``can_implement`` (callers validate shapes)."""
        stream = torch.cuda.current_stream(out.device).cuda_stream
        ws_ptr, ws_bytes = (workspace.data_ptr(), workspace.numel()) if workspace is not None else (None, 0)
        rc = kernel.run(values.data_ptr(), meta.data_ptr(), b.data_ptr(), out.data_ptr(), m, n, k, sm_count,
                        ws_ptr, ws_bytes, stream)
        if rc:
            what = {1: "cannot implement this shape", 2: "initialize failed", 3: "launch failed"}.get(rc, rc)
            raise RuntimeError(f"CUTLASS kernel {kernel.spec.name} on M={m} N={n} K={k}: {what}")


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
