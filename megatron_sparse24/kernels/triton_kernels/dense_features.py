"""The dense features (the ~5 % of F with the most non-zeros, kept out of the backward's feature-wise
2:4): which ones they are, and writing their columns of dW2 (reference twins:
``reference.select_dense_features``, ``reference.write_dense_columns``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import _tile

DENSE_COLUMNS_CONFIG = (256, 32, 4)  # (BR, BC, num_warps) of write_dense_columns: fastest on the H200 (bench_pack)
DENSE_SPLIT_CONFIG = (32, 256, 4)  # (BI, BJ, num_warps) of dense_feature_split: fastest (bench_pack --split)
#: widest F for which dense_feature_split's all-pairs ranking beats torch's sort on the H200 (GPU time
#: 0.045 vs 0.052 ms at 8192, 0.105 vs 0.056 ms at 16384; host time always ~1/3 of the sort's)
DENSE_SPLIT_MAX_FEATURES = 8192


# --- their columns of dW2 ----------------------------------------------------------------------------
#
# dW2 [D, F] comes out of the 2:4 GEMM with zeros in the dense features' columns (5 % of F, spread
# over all of it). Writing them element by element touches ~80 % of dW2's 32-byte sectors with
# 2-byte partial writes (index_copy_: 0.21 ms at 4096 x 16384, longer than rewriting all of dW2).
# This kernel works in whole sectors instead: a tile of BC columns is read, merged and written back
# only if it holds a dense feature (0.125 ms there, 0.42 vs 0.83 ms at 8192 x 32768).


@triton.jit
def _write_dense_columns_kernel(dst_ptr, pos_ptr, rows_ptr, n_rows, n_cols, BR: tl.constexpr, BC: tl.constexpr):
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    j = tl.load(pos_ptr + c, mask=c < n_cols, other=-1)
    if tl.max(j, axis=0) >= 0:
        r = tl.program_id(0) * BR + tl.arange(0, BR)
        ok = (r < n_rows)[:, None] & (c < n_cols)[None, :]
        offs = r.to(tl.int64)[:, None] * n_cols + c[None, :]
        old = tl.load(dst_ptr + offs, mask=ok & (j < 0)[None, :])
        new = tl.load(rows_ptr + j.to(tl.int64)[None, :] * n_rows + r[:, None], mask=ok & (j >= 0)[None, :])
        tl.store(dst_ptr + offs, tl.where((j >= 0)[None, :], new, old), mask=ok)


def write_dense_columns(dst: torch.Tensor, dense_pos: torch.Tensor, rows: torch.Tensor, config=None) -> torch.Tensor:
    """Twin of reference.write_dense_columns (dst, rows contiguous, same dtype); config (BR, BC, num_warps)."""
    n_rows, n_cols = dst.shape
    br, bc, opts = _tile(config or DENSE_COLUMNS_CONFIG)
    _write_dense_columns_kernel[(triton.cdiv(n_rows, br), triton.cdiv(n_cols, bc))](
        dst, dense_pos, rows, n_rows, n_cols, BR=br, BC=bc, **opts)
    return dst


# --- which ones (the n_dense with the most non-zeros) ------------------------------------------------
#
# reference.select_dense_features sorts the counts (a stable radix sort: several kernels) and then
# scatters the positions: 0.03-0.06 ms of GPU time, but 0.08-0.16 ms of host time and launch gaps
# per FFN call (0.09-0.18 ms eager), which at narrow widths is as long as a 2:4 GEMM. Here each
# feature's rank in the order (count descending, index ascending) is counted directly, all pairs
# compared, and the rank is the feature's row in the dense part: one launch (0.025-0.05 ms of host
# time), but F^2 compares, so it is used up to DENSE_SPLIT_MAX_FEATURES only.


@triton.jit
def _dense_feature_split_kernel(counts_ptr, idx_ptr, pos_ptr, n_feats, n_dense,
                                BI: tl.constexpr, BJ: tl.constexpr):
    i = tl.program_id(0) * BI + tl.arange(0, BI)
    ci = tl.load(counts_ptr + i, mask=i < n_feats, other=0)
    rank = tl.zeros([BI], dtype=tl.int32)
    for j0 in range(0, n_feats, BJ):
        j = j0 + tl.arange(0, BJ)
        cj = tl.load(counts_ptr + j, mask=j < n_feats, other=-1)  # counts are >= 0: -1 never ranks first
        first = (cj[None, :] > ci[:, None]) | ((cj[None, :] == ci[:, None]) & (j[None, :] < i[:, None]))
        rank += tl.sum(first.to(tl.int32), axis=1)
    dense = (rank < n_dense) & (i < n_feats)
    tl.store(pos_ptr + i, tl.where(dense, rank, -1), mask=i < n_feats)
    tl.store(idx_ptr + rank, i.to(tl.int64), mask=dense)


def dense_feature_split(counts: torch.Tensor, n_dense: int, config=None):
    """Twin of ops.dense_feature_split's reference path (reference.select_dense_features with
    sort_indices=False, then the positions): counts int32 [F] (>= 0, contiguous) -> (dense_idx int64
    [n_dense] by decreasing count, ties by index; dense_pos int32 [F]). config (BI, BJ, num_warps)."""
    n_feats = counts.numel()
    bi, bj, opts = _tile(config or DENSE_SPLIT_CONFIG)
    dense_idx = torch.empty(n_dense, dtype=torch.int64, device=counts.device)
    dense_pos = torch.empty(n_feats, dtype=torch.int32, device=counts.device)
    _dense_feature_split_kernel[(triton.cdiv(n_feats, bi),)](counts, dense_idx, dense_pos, n_feats, n_dense,
                                                             BI=bi, BJ=bj, **opts)
    return dense_idx, dense_pos
