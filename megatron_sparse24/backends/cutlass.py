"""The CUTLASS backend: our sm90 2:4 kernels (``megatron_sparse24.cutlass``) on operands packed in
CUTLASS's metadata layout, with per-shape dispatch among the compiled tile/cluster configurations,
their tile-scheduler options and the dense alternative."""

from __future__ import annotations

import dataclasses
import functools
import os

import torch

from ..kernels.layout import Packed24
from .dispatch import (GemmChoice, TuningCache, _check_layout, _Dispatcher, _NamedKernelChoices, _dense_product,
                       _fastest, tuning_cache)
from .timing import interleaved_median_cuda_ms


class CutlassGemm(_NamedKernelChoices, _Dispatcher):
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
        from ..cutlass.library import SCHED_OPTIONS

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

    def _kernel_names(self) -> list[str]:
        return [k.spec.name for k in self.library.kernels]

    def describe(self) -> dict:
        """{shape key: chosen kernel name (+ copies) or 'dense', with the tuning times} (for logs)."""
        def name(c):
            if c.kind == "dense":
                return "dense"
            from ..cutlass.library import sched_name

            return (self.library.kernels[c.alg_id].spec.name + (" +B copy" if c.b_copy else "")
                    + (" +D transpose" if c.out_transpose else "") + (f" ({sched_name(c.sched)})" if c.sched else ""))
        return {key: (name(c), c.sparse_ms, c.dense_ms) for key, c in self.choices.items()}

def tma_aligned(b: torch.Tensor) -> torch.Tensor:
    """b itself if its data starts on a 16-byte boundary (what TMA needs), else an aligned copy in the
    same memory order (a weight that is a view into megatron's flat parameter buffer may start
    anywhere when the distributed optimizer, which pads to 64 elements, is off)."""
    if b.data_ptr() % 16 == 0:
        return b
    return b.clone() if b.is_contiguous() else b.t().clone().t()

@functools.lru_cache(maxsize=None)
def shared_cutlass(device_index: int) -> CutlassGemm:
    """The process's CUTLASS backend for one GPU (one dispatch table shared by every layer)."""
    from ..cutlass import library

    return CutlassGemm(library.load(), device_index,
                       autotune=os.environ.get("MEGATRON_SPARSE24_AUTOTUNE", "1") != "0",
                       cache=tuning_cache("cutlass", device_index))
