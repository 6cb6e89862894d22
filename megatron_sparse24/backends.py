"""GEMM backends for products with a packed 2:4 left operand.

Every backend computes ``A @ B`` for A a ``Packed24`` [M, K] (2:4 along K) and B a dense [K, N]
tensor, returning [M, N] (or its transpose [N, M], contiguous, with ``transpose_result=True``):

* ``EmulatedGemm``: decompresses A and runs a dense matmul. Runs anywhere; the reference numerics.
* ``CusparseltGemm``: cuSPARSELt on the packed buffer as is (sparse tensor cores, sm80+), called
  directly with one plan kept per GEMM shape (``cslt.py``; or through ``torch._cslt_sparse_mm``,
  which rebuilds the plan per call), with per-shape dispatch among cuSPARSELt's algorithms and a
  dense fallback for shapes where sparse loses. B may be row-major or the transpose of a row-major
  tensor (e.g. ``w.t()``).
* ``CutlassGemm``: our CUTLASS sm90 kernels (``megatron_sparse24.cutlass``) on operands packed in
  CUTLASS's metadata layout, with per-shape dispatch among the compiled tile/cluster
  configurations and the dense fallback.

Each backend names the metadata ``layout`` its operands must be packed in; the FFN packs for it.
``group``: the ranks that hold the layer; a dispatching backend's per-shape choice is agreed among
them (``agreement.agree``) on the first product of each shape.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .agreement import agree, group_size
from .kernels.layout import Packed24, decompress24
from .ops import unpack24


class Sparse24FallbackWarning(UserWarning):
    """backend='auto' could not use the sparse GEMMs and fell back to the emulated backend."""

#: cuSPARSELt operand alignment we require (rows of A, K, and N), in elements.
CUSPARSELT_ALIGN = 64


class EmulatedGemm:
    name = "emulated"
    layout = "cusparselt"  # any layout decompresses; this one matches the cuSPARSELt runs

    def spmm(self, a: Packed24, b: torch.Tensor, transpose_result: bool = False, group=None) -> torch.Tensor:
        out = decompress24(a) @ b
        return out.t().contiguous() if transpose_result else out


@dataclass(frozen=True)
class GemmChoice:
    """How one GEMM shape runs: a sparse kernel (cuSPARSELt algorithm id, or index of a CUTLASS
    kernel), or dense on the unpacked operand."""

    kind: str  # "sparse" or "dense"
    alg_id: int = 0
    sparse_ms: float = float("nan")  # best sparse time measured when tuning
    dense_ms: float = float("nan")  # unpack + dense GEMM time measured when tuning
    b_copy: bool = False  # CUTLASS: run on a copy of B in the other memory order (e.g. W^T made N-major)
    out_transpose: bool = False  # CUTLASS: write D row-major, then transpose it (for transpose_result)
    sched: int = 0  # CUTLASS: tile-scheduler options (swizzle, raster order), see cutlass.library


#: Environment variable naming the on-disk tuning cache (a JSON file); unset: tune once per process.
TUNING_CACHE_ENV = "MEGATRON_SPARSE24_TUNING_CACHE"


class TuningCache:
    """The dispatchers' choices on disk, so a restarted job reuses them instead of timing again.

    One JSON file (``$MEGATRON_SPARSE24_TUNING_CACHE``) holds a section per (backend, GPU model,
    software versions); a section maps "gemm" and "ffn" keys (JSON lists: the shape, layouts and
    dtype, no device index) to choices. Each write reads the file, merges its own entry and
    atomically replaces the file, so ranks sharing it never leave it corrupt (a write racing another
    may drop that one's newest entry, which is then timed again by the next run). An unreadable file
    is reported once and ignored, never fatal.
    """

    def __init__(self, path: str | os.PathLike, section: str):
        self.path = Path(path)
        self.section = section

    def _read_all(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            warnings.warn(f"megatron_sparse24: ignoring the tuning cache {self.path} ({type(e).__name__}: {e}); "
                          "delete it to start afresh", stacklevel=3)
            return {}

    def load(self) -> dict:
        """{"gemm": {key: value}, "ffn": {key: value}} of this section (empty if none)."""
        section = self._read_all().get(self.section, {})
        return {kind: dict(section.get(kind, {})) for kind in ("gemm", "ffn")}

    def store(self, kind: str, key: str, value) -> None:
        data = self._read_all()
        data.setdefault(self.section, {}).setdefault(kind, {})[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


def tuning_cache(backend: str, device_index: int) -> TuningCache | None:
    """The on-disk cache for a backend on one GPU if ``$MEGATRON_SPARSE24_TUNING_CACHE`` is set."""
    path = os.environ.get(TUNING_CACHE_ENV)
    if not path:
        return None
    versions = f"torch {torch.__version__}, CUDA {torch.version.cuda}"
    if backend.startswith("cusparselt"):
        versions += f", cuSPARSELt {torch.backends.cusparselt.version()}"
    return TuningCache(path, f"{backend} | {torch.cuda.get_device_name(device_index)} | {versions}")


#: What an FFN-shape entry of ``_Dispatcher.ffn_engines`` may say: the backend's own 2:4 GEMMs,
#: the dense-GEMM engine, or another backend's 2:4 GEMMs (``auto_alternatives``).
FFN_ENGINES = ("sparse", "dense", "cusparselt")


class _Dispatcher:
    """The per-shape choice tables shared by the sparse backends: ``choices`` (per GEMM shape) and
    ``ffn_engines`` (per FFN shape, filled by functional.choose_engine), kept for the process and,
    with a ``TuningCache``, on disk. Keys end with the device index, which the disk form drops."""

    def _init_tables(self, device_index: int, cache: TuningCache | None):
        self.device_index = device_index
        self.cache = cache
        self.choices: dict[tuple, GemmChoice] = {}
        self.ffn_engines: dict[tuple, str] = {}
        #: keys (GEMM and FFN) whose choice the ranks holding the layer agreed on in this process
        self.agreed: set[tuple] = set()
        if cache is None:
            return
        entries = cache.load()
        for key, value in entries["gemm"].items():
            choice = self._choice_from_disk(value)
            if choice is not None:
                self.choices[_key_from_disk(key, device_index)] = choice
        for key, engine in entries["ffn"].items():
            if engine in FFN_ENGINES:
                self.ffn_engines[_key_from_disk(key, device_index)] = engine

    def _remember(self, key: tuple, choice: GemmChoice) -> GemmChoice:
        self.choices[key] = choice
        if self.cache is not None:
            self.cache.store("gemm", _key_to_disk(key), self._choice_to_disk(choice))
        return choice

    def _agreed_choice(self, key: tuple, choice: GemmChoice, group, device) -> GemmChoice:
        """``choice``, or the group's first rank's choice for ``key`` (once per key and process)."""
        if key in self.agreed or group_size(group) == 1:
            return choice
        kind, alg_id, b_copy, out_transpose, sched = agree(
            [choice.kind == "sparse", choice.alg_id, choice.b_copy, choice.out_transpose, choice.sched], group, device)
        self.agreed.add(key)
        agreed = dataclasses.replace(choice, kind="sparse" if kind else "dense", alg_id=alg_id, b_copy=bool(b_copy),
                                     out_transpose=bool(out_transpose), sched=sched)
        return choice if agreed == choice else self._remember(key, agreed)

    def remember_ffn_engine(self, key: tuple, engine: str) -> None:
        """Record functional.choose_engine's choice (key ends with the device index)."""
        self.ffn_engines[key] = engine
        if self.cache is not None:
            self.cache.store("ffn", _key_to_disk(key), engine)

    def _choice_to_disk(self, choice: GemmChoice) -> dict:
        return dataclasses.asdict(choice)

    def _choice_from_disk(self, value) -> GemmChoice | None:
        try:
            return GemmChoice(**value)
        except TypeError:  # written by another version
            return None


def _key_to_disk(key: tuple) -> str:
    return json.dumps([str(v) if isinstance(v, torch.dtype) else v for v in key[:-1]])


def _key_from_disk(text: str, device_index: int) -> tuple:
    dtypes = {str(d): d for d in (torch.bfloat16, torch.float16, torch.float32)}
    return tuple(tuple(v) if isinstance(v, list) else dtypes.get(v, v) for v in json.loads(text)) + (device_index,)


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
            from . import cslt

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


class CutlassGemm(_Dispatcher):
    """2:4 GEMMs through our CUTLASS sm90 kernels with per-shape dispatch.

    Operands must be packed in the "cutlass" layout. The first product of each (M, K, N, B layout,
    transpose_result, dtype) times every compiled configuration of that orientation and the dense
    alternative (unpack + cuBLAS), then the tile-scheduler options (swizzle width, raster order) of
    the two fastest, and keeps the fastest in ``choices`` (``autotune=False``: the first
    configuration). B may be row-major [K, N] or the transpose of a row-major [N, K] tensor.
    """

    #: how many of the fastest configurations get their tile-scheduler options timed as well
    SCHED_FINALISTS = 2

    name = "cutlass"
    layout = "cutlass"

    def __init__(self, library, device_index: int, autotune: bool = True, cache: TuningCache | None = None):
        self.library = library
        self.autotune = autotune
        self.sm_count = torch.cuda.get_device_properties(device_index).multi_processor_count
        self._workspace: dict[tuple, torch.Tensor | None] = {}
        self._init_tables(device_index, cache)

    def spmm(self, a: Packed24, b: torch.Tensor, transpose_result: bool = False, group=None) -> torch.Tensor:
        _check_layout(self, a)
        if b.dim() != 2 or b.shape[0] != a.cols:
            raise ValueError(f"B {tuple(b.shape)} does not match the packed A [{a.rows}, {a.cols}]")
        if not (b.is_contiguous() or b.t().is_contiguous()):
            b = b.contiguous()
        b = tma_aligned(b)
        b_kmajor = not b.is_contiguous()
        key = (a.rows, a.cols, b.shape[1], b_kmajor, transpose_result, a.dtype, b.device.index)
        choice = self.choices.get(key)
        if choice is None:
            choice = self._remember(key, self._tune(key, a, b, b_kmajor, transpose_result))
        choice = self._agreed_choice(key, choice, group, b.device)
        if choice.kind == "sparse" and (key, choice.alg_id, choice.sched) not in self._workspace:  # from disk
            self._prepare(key, choice, a.rows, b.shape[1], a.cols, b.device)
        return self._run(choice, key, a, b, transpose_result)

    def _run(self, choice: GemmChoice, key, a: Packed24, b: torch.Tensor, transpose_result: bool) -> torch.Tensor:
        if choice.kind == "dense":
            return _dense_product(a, b, transpose_result)
        m, k, n = a.rows, a.cols, b.shape[1]
        if choice.b_copy:  # the other memory order of B: [K, N] row-major <-> [N, K] row-major
            b = b.contiguous() if not b.is_contiguous() else b.t().contiguous().t()
        d_transposed = transpose_result and not choice.out_transpose
        out = torch.empty((n, m) if d_transposed else (m, n), dtype=a.dtype, device=b.device)
        kernel = self.library.kernels[choice.alg_id]
        self.library.run(kernel, a.values, a.meta, b, out, m, n, k, self.sm_count,
                         self._workspace.get((key, choice.alg_id, choice.sched)), choice.sched)
        if transpose_result and choice.out_transpose:
            out = out.t().contiguous()
        return out

    def candidates(self, key, a: Packed24, b: torch.Tensor, b_kmajor: bool, transpose_result: bool):
        """Every kernel of the matching orientation, and every kernel of the other orientations
        reached by copying B into its other memory order or transposing D (a copy can cost less than
        a slower kernel)."""
        options = []
        for b_copy in (False, True):
            for out_transpose in ((False, True) if transpose_result else (False,)):
                kernels = self.library.candidates(a.dtype, b_kmajor != b_copy, not transpose_result or out_transpose)
                for kernel in kernels:
                    options.append(GemmChoice("sparse", self.library.kernels.index(kernel), b_copy=b_copy,
                                              out_transpose=out_transpose))
        return options

    def _prepare(self, key, choice: GemmChoice, m: int, n: int, k: int, device) -> GemmChoice:
        """Allocate the choice's workspace (once per shape); returns the choice."""
        if (key, choice.alg_id, choice.sched) not in self._workspace:
            ws = self.library.kernels[choice.alg_id].workspace(m, n, k, self.sm_count, choice.sched)
            self._workspace[(key, choice.alg_id, choice.sched)] = (
                torch.empty(ws, dtype=torch.uint8, device=device) if ws else None)
        return choice

    def _tune(self, key, a: Packed24, b: torch.Tensor, b_kmajor: bool, transpose_result: bool) -> GemmChoice:
        # One-time, off the steady-state path: host syncs are fine here.
        m, k, n = a.rows, a.cols, b.shape[1]
        options = [self._prepare(key, c, m, n, k, b.device) for c in self.candidates(key, a, b, b_kmajor,
                                                                                      transpose_result)]
        if not self.autotune:
            return options[0] if options else GemmChoice("dense")
        from .cutlass.library import SCHED_OPTIONS

        def runs(choice):  # False: this configuration cannot implement the shape
            try:
                self._run(choice, key, a, b, transpose_result)
                return True
            except RuntimeError:
                return False

        def timed(choices):  # [(ms, choice)], all timed together (interleaved)
            ms = interleaved_median_cuda_ms([lambda c=c: self._run(c, key, a, b, transpose_result) for c in choices])
            return list(zip(ms, choices))

        # the configurations (and the dense alternative), then the tile-scheduler options of the
        # fastest few; the choice is made among that second set, which holds the finalists too
        dense = GemmChoice("dense")
        first = timed([dense] + [c for c in options if runs(c)])
        dense_ms = first.pop(0)[0]
        finalists = [c for _, c in sorted(first, key=lambda t: t[0])[: self.SCHED_FINALISTS]]
        variants = [self._prepare(key, dataclasses.replace(c, sched=sched), m, n, k, b.device)
                    for c in finalists for sched in SCHED_OPTIONS]
        second = timed(finalists + [c for c in variants if runs(c)]) if finalists else []
        return _fastest(second, dense_ms)

    def _choice_to_disk(self, choice: GemmChoice) -> dict:
        value = dataclasses.asdict(choice)  # the kernel by name: indices change when the library does
        value["alg_id"] = self.library.kernels[choice.alg_id].spec.name if choice.kind == "sparse" else None
        return value

    def _choice_from_disk(self, value) -> GemmChoice | None:
        names = [k.spec.name for k in self.library.kernels]
        if not isinstance(value, dict) or (value.get("kind") == "sparse" and value.get("alg_id") not in names):
            return None  # a kernel this library does not have: tune again
        value = dict(value, alg_id=names.index(value["alg_id"]) if value.get("kind") == "sparse" else 0)
        return super()._choice_from_disk(value)

    def describe(self) -> dict:
        """{shape key: chosen kernel name (+ copies) or 'dense', with the tuning times} (for logs)."""
        def name(c):
            if c.kind == "dense":
                return "dense"
            from .cutlass.library import sched_name

            return (self.library.kernels[c.alg_id].spec.name + (" +B copy" if c.b_copy else "")
                    + (" +D transpose" if c.out_transpose else "") + (f" ({sched_name(c.sched)})" if c.sched else ""))
        return {key: (name(c), c.sparse_ms, c.dense_ms) for key, c in self.choices.items()}


def _fastest(timed: list[tuple[float, GemmChoice]], dense_ms: float) -> GemmChoice:
    """The fastest timed sparse choice, or dense when nothing sparse ran or dense is faster; the
    returned choice carries the best sparse and the dense time."""
    best_ms, best = min(timed, key=lambda t: t[0]) if timed else (float("inf"), None)
    if best is None or dense_ms < best_ms:
        return GemmChoice("dense", 0, best_ms, dense_ms)
    return dataclasses.replace(best, sparse_ms=best_ms, dense_ms=dense_ms)


def tma_aligned(b: torch.Tensor) -> torch.Tensor:
    """b itself if its data starts on a 16-byte boundary (what TMA needs), else an aligned copy in the
    same memory order (a weight that is a view into megatron's flat parameter buffer may start
    anywhere when the distributed optimizer, which pads to 64 elements, is off)."""
    if b.data_ptr() % 16 == 0:
        return b
    return b.clone() if b.is_contiguous() else b.t().clone().t()


def _check_layout(backend, a: Packed24) -> None:
    if a.layout != backend.layout:
        raise ValueError(f"the {backend.name} backend needs operands packed in the {backend.layout!r} layout, "
                         f"got {a.layout!r}: pack with layout=backend.layout")


def _dense_product(a: Packed24, b: torch.Tensor, transpose_result: bool) -> torch.Tensor:
    """The dense alternative: unpack A and run cuBLAS (same 2:4 numerics, dense engine)."""
    dense = unpack24(a)
    return b.t() @ dense.t() if transpose_result else dense @ b


def interleaved_median_cuda_ms(fns: list, rounds: int = 6, iters: int = 2) -> list[float]:
    """Median milliseconds of each of ``fns`` (``median_cuda_ms`` of ``iters`` calls, once per round),
    over an even number of ``rounds`` that call every function in turn, in alternating order, after
    one warm-up call each. Tuning compares candidates that differ by a few percent, while the GPU's
    clock drifts by more as it heats toward its power limit: timed one after the other, the first
    candidates ran at higher clocks and won (docs/benchmarks.md, session 12: cuSPARSELt's algorithm 0
    chosen in 4 of 4 tunings, 6.8 % slower than the best). Alternating, each function's two middle
    rounds sit, on average, at the same place in the sequence, so a steady drift cancels."""
    if rounds % 2:
        raise ValueError(f"rounds must be even (forward and reverse order in pairs), got {rounds}")
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for r in range(rounds):
        for i in (range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))):
            times[i].append(median_cuda_ms(fns[i], warmup=0, iters=iters))
    return [statistics.median(t) for t in times]


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
def shared_cutlass(device_index: int) -> CutlassGemm:
    """The process's CUTLASS backend for one GPU (one dispatch table shared by every layer)."""
    from .cutlass import library

    return CutlassGemm(library.load(), device_index,
                       autotune=os.environ.get("MEGATRON_SPARSE24_AUTOTUNE", "1") != "0",
                       cache=tuning_cache("cutlass", device_index))


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
    from . import cslt

    direct = os.environ.get("MEGATRON_SPARSE24_CUSPARSELT_DIRECT", "1") != "0"
    reason = cslt.unavailable_reason(torch.device("cuda", device_index)) if direct else None
    if reason:
        warnings.warn(f"megatron_sparse24: cuSPARSELt through torch._cslt_sparse_mm (~0.7 ms of host time per "
                      f"GEMM), not called directly: {reason}", Sparse24FallbackWarning, stacklevel=2)
        direct = False
    return CusparseltGemm(autotune=os.environ.get("MEGATRON_SPARSE24_AUTOTUNE", "1") != "0",
                          device_index=device_index, direct=direct,
                          cache=tuning_cache("cusparselt direct" if direct else "cusparselt", device_index))


def auto_alternatives(primary, device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int]) -> tuple:
    """The other 2:4 backends backend "auto" times against ``primary`` (what ``resolve_backend``
    picked) per FFN shape: cuSPARSELt next to our CUTLASS kernels where it can run. On an H200
    (docs/benchmarks.md, session 9) cuSPARSELt's kernels win the large FFNs and the two are level
    at 16384 x 2048 x 8192, so the choice is measured, not assumed."""
    if getattr(primary, "name", None) != "cutlass" or cusparselt_unavailable_reason(device, dtype) \
            or cusparselt_shape_problem(*shape):
        return ()
    index = device.index if device.index is not None else torch.cuda.current_device()
    return (shared_cusparselt(index),)


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


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int]):
    """Backend object for config name ``name`` on (device, dtype) for an FFN of shape (T, F, D).

    "auto" picks, where each can run: our CUTLASS kernels (sm90, library already built or given by
    $MEGATRON_SPARSE24_CUTLASS_LIB), else cuSPARSELt, else the emulated backend (on a GPU with a
    Sparse24FallbackWarning, shown once per reason). "cutlass" builds the library on first use if
    needed; "cutlass" and "cusparselt" raise a ValueError naming the fix when they cannot run.
    """
    if name == "emulated":
        return EmulatedGemm()
    if name not in ("auto", "cutlass", "cusparselt"):
        raise ValueError(f"unknown backend {name!r}; expected 'auto', 'cutlass', 'cusparselt' or 'emulated'")
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)
    shape_problem = cusparselt_shape_problem(*shape)
    if name == "cutlass":
        from .cutlass import library

        reason = shape_problem or library.unavailable_reason(device, dtype, build=True)
        if reason:
            raise ValueError(f"backend='cutlass' cannot run: {reason}. Fix that, or use backend='auto', "
                             "'cusparselt' or 'emulated'")
        return shared_cutlass(index)
    reason = cusparselt_unavailable_reason(device, dtype) or shape_problem
    if name == "cusparselt":
        if reason:
            raise ValueError(f"backend='cusparselt' cannot run: {reason}. Fix that, or use backend='auto' "
                             "or 'emulated'")
        return shared_cusparselt(index)
    if reason:
        if device.type != "cuda":  # CPU runs are emulated by design: nothing to warn about
            return EmulatedGemm()
        # Python shows each distinct warning once per call site, so this does not flood the log.
        warnings.warn(f"megatron_sparse24: backend 'auto' uses the emulated (dense) GEMMs: {reason}",
                      Sparse24FallbackWarning, stacklevel=3)
        return EmulatedGemm()
    from .cutlass import library

    if library.unavailable_reason(device, dtype, build=False) is None:
        return shared_cutlass(index)
    return shared_cusparselt(index)
