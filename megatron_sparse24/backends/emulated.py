"""The emulated backend: decompress the 2:4 operand, run a dense matmul. Runs anywhere (CPU, any GPU,
fp32); the reference numerics of the 2:4 GEMMs."""

from __future__ import annotations

import torch

from ..kernels.layout import Packed24, decompress24


class EmulatedGemm:
    name = "emulated"
    layout = "cusparselt"  # any layout decompresses; this one matches the cuSPARSELt runs

    def spmm(self, a: Packed24, b: torch.Tensor, transpose_result: bool = False, group=None) -> torch.Tensor:
        out = decompress24(a) @ b
        return out.t().contiguous() if transpose_result else out
