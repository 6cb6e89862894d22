"""F1 and the forward packer, fused or not: Y1 = X W1^T (+ b1) -> relu(Y1)^2 -> 2:4 along F (values,
metadata, per-feature counts) either as cuBLAS F1 + the Triton packer, or in one CUTLASS ping-pong GEMM
that packs in its epilogue so Y1 never reaches memory (``cutlass/csrc/f1_pack_gemm.cuh``).

The fused kernel computes the same function (its epilogue rounds each accumulator to the input dtype
before the squared ReLU, as a stored Y1 would be) but is not faster everywhere: on an H200 it wins
where each output tile has a long reduction (D = 4096: 1.16x over the two passes) and loses where the
epilogue is longer than the other warp group's mainloop (D = 2048: 0.93x). So each shape is timed once
per process, the same way the GEMM backends tune (interleaved rounds), and the layer's tensor-parallel
ranks take their first rank's choice.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import torch
import torch.nn.functional as F

from .. import ops
from ..kernels.layout import Packed24
from .dispatch import GemmChoice, TuningCache, _Dispatcher, _fastest, _NamedKernelChoices, tuning_cache
from .timing import interleaved_median_cuda_ms

logger = logging.getLogger(__name__)


def unfused_f1_pack(x, w1, b1, layout: str):
    """cuBLAS F1, then the Triton forward packer ("naive" top-2): (s2 Packed24, None, counts)."""
    return ops.pack_relu2_sparse24(F.linear(x, w1, b1), "naive", None, 0, layout=layout)


class F1Packer(_NamedKernelChoices, _Dispatcher):
    """Per-shape choice between the fused kernels (``GemmChoice`` kind "sparse": ``alg_id`` indexes
    the library's ``f1_kernels``, ``sched`` its tile-scheduler options) and the two passes (kind
    "dense"). Serves the "naive" sparsifier in bf16 only: there the backward recomputes d(S2)/d(Y1)
    from S2, so the epilogue writes nothing but S2 and the counts."""

    #: how many of the fastest configurations get their tile-scheduler options timed as well
    SCHED_FINALISTS = 2

    def __init__(self, library, device_index: int, cache: TuningCache | None = None):
        self.library = library
        self.sm_count = torch.cuda.get_device_properties(device_index).multi_processor_count
        self._workspace: dict[tuple, torch.Tensor | None] = {}
        self._init_tables(device_index, cache)

    @staticmethod
    def operands_fit(x: torch.Tensor, w1: torch.Tensor, b1) -> bool:
        """Whether the fused kernels can read these operands (bf16, row-major, TMA-aligned); the shape
        is checked once per shape, by ``pack``."""
        return (x.dtype == torch.bfloat16 and x.is_cuda and x.dim() == 2 and x.is_contiguous() and w1.is_contiguous()
                and x.data_ptr() % 16 == 0 and w1.data_ptr() % 16 == 0 and x.shape[1] % 8 == 0
                and (b1 is None or b1.is_contiguous()))

    def _kernels(self, t: int, f: int, dtype, layout: str) -> list:
        return [k for k in self.library.f1_candidates(dtype, layout)
                if t % k.spec.tile[0] == 0 and f % k.spec.tile[1] == 0]

    def pack(self, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, layout: str, group=None):
        """(s2 Packed24 [T, F] in ``layout``, None, counts int32 [F+1]): ``ops.pack_relu2_sparse24`` of
        ``F.linear(x, w1, b1)`` with method "naive", by whichever way is faster for the shape."""
        if not self.operands_fit(x, w1, b1):
            return unfused_f1_pack(x, w1, b1, layout)
        t, d = x.shape
        f = w1.shape[0]
        key = (t, d, f, x.dtype, layout, b1 is not None, x.device.index)
        choice = self.choices.get(key)
        if choice is None:
            if not self._kernels(t, f, x.dtype, layout):  # no tile divides the shape: two passes, not timed
                choice = self.choices[key] = GemmChoice("dense")  # (nor kept on disk: a new library may fit)
            elif torch.cuda.is_current_stream_capturing():  # no timing inside a CUDA-graph capture
                return unfused_f1_pack(x, w1, b1, layout)
            else:
                choice = self._remember(key, self._tune(key, x, w1, b1, layout))
        choice = self._agreed_choice(key, choice, group, x.device)
        if choice.kind == "dense":
            return unfused_f1_pack(x, w1, b1, layout)
        return self._fused(choice, x, w1, b1, layout)

    def _fused(self, choice: GemmChoice, x, w1, b1, layout: str):
        t, d = x.shape
        f = w1.shape[0]
        kernel = self.library.f1_kernels[choice.alg_id]
        ws_key = (t, d, f, choice.alg_id, choice.sched)
        if ws_key not in self._workspace:
            n = kernel.workspace(t, f, d, self.sm_count, choice.sched)
            self._workspace[ws_key] = torch.empty(n, dtype=torch.uint8, device=x.device) if n else None
        s2 = Packed24.empty(t, f, x.dtype, x.device, layout)
        counts = torch.zeros(f + 1, dtype=torch.int32, device=x.device)
        self.library.f1_pack(kernel, x, w1, b1, s2.values, s2.meta, counts, self.sm_count, self._workspace[ws_key],
                             sched=choice.sched)
        return s2, None, counts

    def _tune(self, key, x, w1, b1, layout: str) -> GemmChoice:
        # One-time, off the steady-state path: host syncs are fine here.
        from ..cutlass.library import SCHED_OPTIONS

        kernels = self._kernels(x.shape[0], w1.shape[0], x.dtype, layout)
        options = [GemmChoice("sparse", self.library.f1_kernels.index(k)) for k in kernels]

        def timed(choices):
            fns = [lambda: unfused_f1_pack(x, w1, b1, layout)] + [lambda c=c: self._fused(c, x, w1, b1, layout)
                                                                  for c in choices]
            # GPU time: in training the host enqueues F1 while the GPU still runs the layer's attention,
            # so the two passes' extra launch (host time) is hidden there
            ms = interleaved_median_cuda_ms(fns, gpu_busy=True)
            return ms[0], list(zip(ms[1:], choices))

        _, first = timed(options)
        finalists = [c for _, c in sorted(first, key=lambda tc: tc[0])[: self.SCHED_FINALISTS]]
        variants = [dataclasses.replace(c, sched=s) for c in finalists for s in SCHED_OPTIONS]
        unfused_ms, second = timed(finalists + variants)
        best_ms, best = min(second, key=lambda tc: tc[0])
        logger.info("megatron_sparse24: F1 + packer T x D x F = %d x %d x %d: two passes %.3f ms, fused %.3f ms (%s) "
                    "-> %s", *key[:3], unfused_ms, best_ms, self._name(best),
                    "fused" if best_ms < unfused_ms else "two passes")
        return _fastest(second, unfused_ms)

    def _name(self, choice: GemmChoice) -> str:
        if choice.kind == "dense":
            return "two passes"
        from ..cutlass.library import sched_name

        return f"{self.library.f1_kernels[choice.alg_id].spec.name}, {sched_name(choice.sched)}"

    def describe(self) -> dict:
        """{(T, D, F, layout): (how it runs, fused ms, two passes ms) as timed} (for logs)."""
        return {key[:3] + key[4:5]: (self._name(c), c.sparse_ms, c.dense_ms) for key, c in self.choices.items()}

    def _kernel_names(self) -> list[str]:
        return [k.spec.name for k in self.library.f1_kernels]


@functools.lru_cache(maxsize=None)
def shared_f1_packer(device_index: int) -> F1Packer | None:
    """The process's F1 packer for one GPU, or None where the CUTLASS library (with its F1 kernels)
    is not built or the GPU is not sm90 (then F1 and the packer run as two passes)."""
    from ..cutlass import library

    if torch.cuda.get_device_capability(device_index) != (9, 0):
        return None
    try:
        lib = library.load()
    except RuntimeError:
        return None
    if not lib.f1_kernels:
        return None
    return F1Packer(lib, device_index, cache=tuning_cache("cutlass-f1", device_index))
