"""Dense outputs of packed and feature-wise 2:4 operands: ``unpack24`` (packed -> dense, for GEMMs
that run dense on a sparse operand; twin of ``layout.decompress24``) and ``sparsify24_featurewise``
(twin of ``reference.sparsify24_featurewise``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import Packed24
from .common import BLOCK_F, BLOCK_T, _featurewise_select, _grid, _scatter4
from .meta import layout_id, load_codes


@triton.jit
def _unpack24_kernel(vals_ptr, meta_ptr, out_ptr, n_rows, n_cols, BR: tl.constexpr, BC: tl.constexpr,
                     LAYOUT: tl.constexpr):
    G: tl.constexpr = BC // 4
    row0 = tl.program_id(0) * BR
    grp0 = tl.program_id(1) * G
    idx0, idx1 = load_codes(meta_ptr, row0 + tl.arange(0, BR), grp0, n_rows, n_cols, G, LAYOUT)
    rows = row0 + tl.arange(0, BR)
    vcols = 2 * grp0 + tl.arange(0, 2 * G)
    vmask = (rows[:, None] < n_rows) & (vcols[None, :] < n_cols // 2)
    v = tl.load(vals_ptr + rows.to(tl.int64)[:, None] * (n_cols // 2) + vcols[None, :], mask=vmask, other=0.0)
    v0, v1 = tl.split(tl.reshape(v, [BR, G, 2]))
    cols = 4 * grp0 + tl.arange(0, BC)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * n_cols + cols[None, :], _scatter4(idx0, idx1, v0, v1, BR, G),
             mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


def unpack24(packed: Packed24) -> torch.Tensor:
    """Twin of layout.decompress24: Packed24 [R, C] -> dense [R, C]."""
    out = torch.empty(packed.rows, packed.cols, dtype=packed.dtype, device=packed.buffer.device)
    _unpack24_kernel[_grid(packed.rows, packed.cols)](packed.values, packed.meta, out, packed.rows, packed.cols,
                                                     BR=BLOCK_T, BC=BLOCK_F, LAYOUT=layout_id(packed.layout))
    return out


@triton.jit
def _featurewise_dense_kernel(g_ptr, out_ptr, dense_pos_ptr, n_rows, n_cols,
                              BT: tl.constexpr, BF: tl.constexpr):
    G: tl.constexpr = BT // 4
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BF + tl.arange(0, BF)
    inb = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    g = tl.load(g_ptr + offs, mask=inb, other=0.0)
    idx0, idx1, v0, v1 = _featurewise_select(tl.trans(g.to(tl.float32)), BF, G)
    sparse = tl.trans(_scatter4(idx0, idx1, v0, v1, BF, G))
    is_dense = tl.load(dense_pos_ptr + cols, mask=cols < n_cols, other=-1) >= 0
    tl.store(out_ptr + offs, tl.where(is_dense[None, :], g.to(tl.float32), sparse), mask=inb)


def sparsify24_featurewise(g: torch.Tensor, dense_pos: torch.Tensor) -> torch.Tensor:
    """g [T, F] contiguous, dense_pos int32 [F] (>= 0 marks a dense feature) -> g_sparse [T, F]."""
    out = torch.empty_like(g)
    _featurewise_dense_kernel[_grid(*g.shape)](g, out, dense_pos, g.shape[0], g.shape[1], BT=BLOCK_T, BF=BLOCK_F)
    return out
