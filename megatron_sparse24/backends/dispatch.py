"""What the dispatching 2:4 backends share: the per-shape choice (``GemmChoice``), the tables that
hold the choices for the process (``_Dispatcher``) and on disk (``TuningCache``), the agreement of a
choice across a layer's tensor-parallel ranks, and the dense alternative every dispatcher can pick."""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..agreement import agree, group_size
from ..kernels.layout import Packed24
from ..ops import unpack24


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


class _Dispatcher:
    """The per-shape choice tables shared by the sparse backends: ``choices`` (per GEMM shape) and
    ``ffn_engines`` (per FFN shape, filled by engine.choose_engine), kept for the process and,
    with a ``TuningCache``, on disk. Keys end with the device index, which the disk form drops."""

    def _init_tables(self, device_index: int, cache: TuningCache | None):
        self.device_index = device_index
        self.cache = cache
        self.choices: dict[tuple, GemmChoice] = {}
        self.ffn_engines: dict[tuple, str] = {}
        #: GEMM keys whose choice the layer's tensor-parallel ranks agreed on in this process
        self.agreed: set[tuple] = set()
        #: FFN keys decided (and agreed) in this process: (engine, the 2:4 backend it runs on), so the
        #: steady state looks nothing up (engine.choose_engine)
        self.ffn_settled: dict[tuple, tuple] = {}
        if cache is None:
            return
        entries = cache.load()
        for key, value in entries["gemm"].items():
            choice = self._choice_from_disk(value)
            if choice is not None:
                self.choices[_key_from_disk(key, device_index)] = choice
        for key, engine in entries["ffn"].items():
            # the backend's own 2:4 GEMMs, the dense-GEMM engine, or another backend's name (one that
            # cannot run here means the backend's own: engine._with_engine)
            if isinstance(engine, str):
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
        """Record engine.choose_engine's choice (key ends with the device index)."""
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


class _NamedKernelChoices:
    """For dispatchers whose ``alg_id`` indexes a list of compiled kernels (``_kernel_names()``): the
    disk form names the kernel, since indices change when the library does."""

    def _kernel_names(self) -> list[str]:
        raise NotImplementedError

    def _choice_to_disk(self, choice: GemmChoice) -> dict:
        value = dataclasses.asdict(choice)
        value["alg_id"] = self._kernel_names()[choice.alg_id] if choice.kind == "sparse" else None
        return value

    def _choice_from_disk(self, value) -> GemmChoice | None:
        names = self._kernel_names()
        if not isinstance(value, dict) or (value.get("kind") == "sparse" and value.get("alg_id") not in names):
            return None  # a kernel this library does not have: tune again
        value = dict(value, alg_id=names.index(value["alg_id"]) if value.get("kind") == "sparse" else 0)
        return super()._choice_from_disk(value)


def _key_to_disk(key: tuple) -> str:
    return json.dumps([str(v) if isinstance(v, torch.dtype) else v for v in key[:-1]])


def _key_from_disk(text: str, device_index: int) -> tuple:
    dtypes = {str(d): d for d in (torch.bfloat16, torch.float16, torch.float32)}
    return tuple(tuple(v) if isinstance(v, list) else dtypes.get(v, v) for v in json.loads(text)) + (device_index,)


def _fastest(timed: list[tuple[float, GemmChoice]], dense_ms: float) -> GemmChoice:
    """The fastest timed sparse choice, or dense when nothing sparse ran or dense is faster; the
    returned choice carries the best sparse and the dense time."""
    best_ms, best = min(timed, key=lambda t: t[0]) if timed else (float("inf"), None)
    if best is None or dense_ms < best_ms:
        return GemmChoice("dense", 0, best_ms, dense_ms)
    return dataclasses.replace(best, sparse_ms=best_ms, dense_ms=dense_ms)


def _check_layout(backend, a: Packed24) -> None:
    if a.layout != backend.layout:
        raise ValueError(f"the {backend.name} backend needs operands packed in the {backend.layout!r} layout, "
                         f"got {a.layout!r}: pack with layout=backend.layout")


def _dense_product(a: Packed24, b: torch.Tensor, transpose_result: bool) -> torch.Tensor:
    """The dense alternative: unpack A and run cuBLAS (same 2:4 numerics, dense engine)."""
    dense = unpack24(a)
    return b.t() @ dense.t() if transpose_result else dense @ b
