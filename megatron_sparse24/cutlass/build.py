"""Build the CUTLASS sm90 2:4 GEMM library (a plain C shared library, loaded with ctypes).

The library holds one entry point per (dtype, operand orientation, tile, cluster) configuration of
the 2:4 GEMM (``sp24_gemm.cuh``), all sharing one metadata layout (``META_K``: the K extent of
CUTLASS's metadata atom, fixed by the kernels' K tile), and per configuration of F1 with the forward
packer in its epilogue (``f1_pack_gemm.cuh``; ``F1PackSpec``). It needs ``nvcc`` (CUDA 12.3+) and the
CUTLASS headers that ship in the ``nvidia-cutlass`` wheel (``pip install megatron_sparse24[cuda]``). No
torch headers are involved, so the library does not depend on the torch build.

    python -m megatron_sparse24.cutlass.build [--out DIR] [--jobs N]

builds into the on-disk cache (``cache_dir()``), which ``library.load()`` also fills on first use.
Each kernel takes a few CPU minutes to compile; objects are cached per kernel. Processes that build
the same library at once (the ranks of one node on first use) take turns on a lock file in the build
directory: the first builds, the others wait and load its library; every file appears whole, by
rename, under a name no other process writes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
LIB_NAME = "libsp24_cutlass.so"
#: K extent (logical columns) of the metadata atom of every kernel in the library.
META_K = 128
#: CUTLASS's element type of each dtype name.
ELEMENTS = {"bf16": "cutlass::bfloat16_t", "fp16": "cutlass::half_t"}


@dataclass(frozen=True)
class KernelSpec:
    """One compiled configuration: D[M,N] = A[M,K] (2:4, compressed) @ B[K,N]."""

    dtype: str  # "bf16" or "fp16"
    b_kmajor: bool  # B given as a row-major [N, K] tensor (else row-major [K, N])
    d_rowmajor: bool  # D written as a row-major [M, N] tensor (else row-major [N, M])
    tile: tuple[int, int, int]
    cluster: tuple[int, int]
    cooperative: bool = True

    @property
    def name(self) -> str:
        tm, tn, tk = self.tile
        return (f"sp24_{self.dtype}_{'bk' if self.b_kmajor else 'bn'}_{'dr' if self.d_rowmajor else 'dc'}_"
                f"{tm}x{tn}x{tk}_c{self.cluster[0]}x{self.cluster[1]}_{'coop' if self.cooperative else 'pp'}")

    @classmethod
    def from_name(cls, name: str) -> "KernelSpec":
        """Inverse of ``name``."""
        _, dtype, b, d, tile, cluster, sched = name.split("_")
        return cls(dtype, b == "bk", d == "dr", tuple(int(v) for v in tile.split("x")),
                   tuple(int(v) for v in cluster[1:].split("x")), sched == "coop")

    def source(self) -> str:
        tm, tn, tk = self.tile
        args = (f"{ELEMENTS[self.dtype]}, {tm}, {tn}, {tk}, {self.cluster[0]}, {self.cluster[1]}, "
                f"{str(self.cooperative).lower()}, {str(self.b_kmajor).lower()}, {str(self.d_rowmajor).lower()}")
        return (f"#define SP24_META_K {META_K}\n#include \"sp24_gemm.cuh\"\n"
                f"SP24_DEFINE_KERNEL({self.name}, {args})\n")


@dataclass(frozen=True)
class F1PackSpec:
    """One compiled F1-with-packer configuration (``f1_pack_gemm.cuh``): the dense GEMM
    Y1[M, N] = X[M, K] @ W1[N, K]^T (+ b1) whose ping-pong epilogue writes relu(Y1)^2 packed 2:4
    along N (values + metadata in ``layout``) and the per-column counts instead of Y1."""

    dtype: str
    layout: str  # a layout.LAYOUTS name
    tile: tuple[int, int, int]
    cluster: tuple[int, int]

    @property
    def name(self) -> str:
        tm, tn, tk = self.tile
        return f"f1pack_{self.dtype}_{self.layout}_{tm}x{tn}x{tk}_c{self.cluster[0]}x{self.cluster[1]}"

    @classmethod
    def from_name(cls, name: str) -> "F1PackSpec":
        """Inverse of ``name``."""
        _, dtype, layout, tile, cluster = name.split("_")
        return cls(dtype, layout, tuple(int(v) for v in tile.split("x")),
                   tuple(int(v) for v in cluster[1:].split("x")))

    def source(self) -> str:
        from ..kernels.layout import LAYOUTS  # the epilogue's Layout template argument is the index

        tm, tn, tk = self.tile
        args = (f"{ELEMENTS[self.dtype]}, {LAYOUTS.index(self.layout)}, {tm}, {tn}, {tk}, "
                f"{self.cluster[0]}, {self.cluster[1]}")
        return f"#include \"f1_pack_gemm.cuh\"\nSP24_DEFINE_F1_PACK({self.name}, {args})\n"


#: F1-with-packer tiles: ping-pong needs a warp group's accumulators (TM x TN / 128 per thread) to
#: leave registers for the epilogue, so 128 x 128 or 64 x 256. The two 128 x 128 clusters each win
#: some FFN shapes (with the right tile-scheduler options); 128 x 128 with no cluster never did, and
#: 64 x 256 with a 1 x 2 cluster was 2x slower and wrote zeros into parts of its first tiles at some
#: shapes (not investigated further), so neither is built. Cooperative tiles (256 x 128 and
#: 128 x 256, the epilogue not overlapped with a mainloop) were 0.72-0.92x of F1 + the packer: not
#: built either. bf16 only: the fused path serves the "naive" sparsifier in bf16, whose backward
#: needs no stored derivative.
F1_PACK_TILES = {"cusparselt": (((128, 128, 64), (2, 1)), ((128, 128, 64), (1, 2)), ((64, 256, 64), (2, 1))),
                 "cutlass": (((128, 128, 64), (2, 1)), ((128, 128, 64), (1, 2)))}


def default_f1_pack_kernels() -> list[F1PackSpec]:
    return [F1PackSpec("bf16", lay, tile, cluster) for lay, tiles in F1_PACK_TILES.items() for tile, cluster in tiles]


def compressor_name(dtype: str) -> str:
    """Entry-point name of CUTLASS's own compressor for ``dtype`` (every library has one per dtype)."""
    return f"sp24_compress_{dtype}"


def compressor_source(dtype: str) -> str:
    return (f"#define SP24_META_K {META_K}\n#include \"sp24_gemm.cuh\"\n"
            f"SP24_DEFINE_COMPRESSOR({compressor_name(dtype)}, {ELEMENTS[dtype]})\n")


#: The GEMM orientations the sparse FFN uses: F2 (x @ W2^T: B K-major), B2 and B4 (B N-major), and
#: B3 (N-major B, D written transposed).
ORIENTATIONS = ((True, True), (False, True), (False, False))
TILES = (((128, 128, 128), (1, 2)), ((128, 128, 128), (2, 1)), ((128, 128, 128), (1, 1)),
         ((256, 128, 128), (2, 1)), ((128, 256, 128), (1, 2)))


#: fp16 gets the two configurations the bf16 dispatcher picks at FFN shapes; bf16 also gets one
#: ping-pong configuration (two consumer warp groups on alternating tiles).
FP16_TILES = (((256, 128, 128), (2, 1)), ((128, 256, 128), (1, 2)))
PINGPONG_TILES = (((128, 128, 128), (1, 2)),)


def default_kernels() -> list[KernelSpec]:
    kernels = [KernelSpec("bf16", bk, dr, tile, cluster) for bk, dr in ORIENTATIONS for tile, cluster in TILES]
    kernels += [KernelSpec("bf16", bk, dr, tile, cluster, cooperative=False)
                for bk, dr in ORIENTATIONS for tile, cluster in PINGPONG_TILES]
    kernels += [KernelSpec("fp16", bk, dr, tile, cluster) for bk, dr in ORIENTATIONS for tile, cluster in FP16_TILES]
    return kernels


def cutlass_include() -> Path:
    """CUTLASS's include directory from the nvidia-cutlass wheel (or $CUTLASS_INCLUDE)."""
    if os.environ.get("CUTLASS_INCLUDE"):
        return Path(os.environ["CUTLASS_INCLUDE"])
    try:
        import cutlass_library
    except ImportError as e:
        raise RuntimeError("the CUTLASS headers are missing: pip install 'megatron_sparse24[cuda]' (the "
                           "nvidia-cutlass wheel) or set CUTLASS_INCLUDE to CUTLASS's include/ directory") from e
    return Path(cutlass_library.__file__).parent / "source" / "include"


def nvcc() -> str:
    path = os.environ.get("NVCC") or shutil.which("nvcc")
    if not path and Path("/usr/local/cuda/bin/nvcc").exists():
        path = "/usr/local/cuda/bin/nvcc"
    if not path:
        raise RuntimeError("nvcc not found: install the CUDA toolkit (12.3+) or set NVCC; the CUTLASS backend "
                           "is optional (backend='cusparselt' or 'emulated' work without it)")
    return path


def _nvcc_version(compiler: str) -> str:
    return subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout


FLAGS = ["-std=c++17", "-O3", "-gencode=arch=compute_90a,code=sm_90a", "-Xcompiler=-fPIC",
         "--expt-relaxed-constexpr", "-DNDEBUG"]


def library_key(kernels: list[KernelSpec], compiler: str, f1_kernels: list[F1PackSpec] | None = None) -> str:
    f1_kernels = default_f1_pack_kernels() if f1_kernels is None else f1_kernels
    h = hashlib.sha256()
    headers = [p.read_text() for p in sorted(CSRC.glob("*.cuh"))]  # every header the units may include
    for part in (*headers, _nvcc_version(compiler), " ".join(FLAGS), str(cutlass_include()),
                 *(k.source() for k in kernels), *(k.source() for k in f1_kernels),
                 *(compressor_source(d) for d in sorted({k.dtype for k in kernels}))):
        h.update(part.encode())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    root = os.environ.get("MEGATRON_SPARSE24_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "megatron_sparse24")
    return Path(root) / "cutlass"


def _compile(name: str, source: str, workdir: Path, compiler: str, include: Path) -> Path:
    obj = workdir / f"{name}.o"
    if obj.exists():
        return obj
    src = workdir / f"{name}.cu"
    src.write_text(source)
    tmp = workdir / f"{name}.o.{os.getpid()}.tmp"
    util = include.parent / "tools" / "util" / "include"  # cutlass/util/packed_stride.hpp
    cmd = [compiler, *FLAGS, f"-I{include}", f"-I{util}", f"-I{CSRC}", "-c", str(src), "-o", str(tmp)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"nvcc failed for {name}:\n{' '.join(cmd)}\n{done.stderr[-4000:]}")
    os.replace(tmp, obj)
    return obj


@contextlib.contextmanager
def _build_lock(workdir: Path):
    """Exclusive for one process at a time (an flock on workdir/.lock, released if the holder dies)."""
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning("megatron_sparse24: waiting for another process to finish building the CUTLASS library "
                           "in %s", workdir)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(kernels: list[KernelSpec] | None = None, out: Path | None = None, jobs: int | None = None,
          verbose: bool = False, f1_kernels: list[F1PackSpec] | None = None) -> Path:
    """Compile (or reuse) the library; returns the path of the shared object."""
    kernels = default_kernels() if kernels is None else kernels
    f1_kernels = default_f1_pack_kernels() if f1_kernels is None else f1_kernels
    compiler = nvcc()
    include = cutlass_include()
    workdir = Path(out) if out else cache_dir() / library_key(kernels, compiler, f1_kernels)
    lib = workdir / LIB_NAME
    if lib.exists():
        return lib
    with _build_lock(workdir):
        if lib.exists():  # another process built it while this one waited
            return lib
        return _build_locked(kernels, f1_kernels, workdir, lib, compiler, include, jobs, verbose)


def _build_locked(kernels, f1_kernels, workdir: Path, lib: Path, compiler: str, include: Path, jobs,
                  verbose: bool) -> Path:
    units = {k.name: k.source() for k in kernels}
    units.update({k.name: k.source() for k in f1_kernels})
    for dtype in sorted({k.dtype for k in kernels}):
        units[compressor_name(dtype)] = compressor_source(dtype)
    jobs = jobs or max(1, min(len(units), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = {pool.submit(_compile, name, src, workdir, compiler, include): name for name, src in units.items()}
        objs = []
        for f in concurrent.futures.as_completed(futures):
            objs.append(f.result())
            if verbose:
                print(f"compiled {futures[f]}", flush=True)
    (workdir / "kernels.txt").write_text("".join(k.name + "\n" for k in kernels))
    (workdir / "f1_kernels.txt").write_text("".join(k.name + "\n" for k in f1_kernels))
    tmp = workdir / f"{LIB_NAME}.{os.getpid()}.tmp"
    subprocess.run([compiler, "-shared", "-o", str(tmp), *sorted(map(str, objs))], check=True)
    os.replace(tmp, lib)
    return lib


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="build directory (default: the on-disk cache)")
    p.add_argument("--jobs", type=int, help="parallel nvcc processes (default: CPU count)")
    args = p.parse_args(argv)
    print(build(out=args.out, jobs=args.jobs, verbose=True))


if __name__ == "__main__":
    main()
