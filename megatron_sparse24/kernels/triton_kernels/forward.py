"""The forward packer: Y1 -> relu(Y1)^2 -> 2:4 along the features -> packed S2, d(S2)/d(Y1) and the
per-feature non-zero counts, in one pass over Y1 (reference twins: ``reference.pack_forward``,
``reference.sparsify_forward_dense``, ``reference.relu2_sparsify24``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import Packed24
from ..reference import MVUE_EPS, recomputes_derivative
from .common import (BLOCK_F, BLOCK_T, _first_second, _gather4, _grid, _is_nonzero, _join4, _kept_values,
                     _nan_to_inf, _scale_args, _scatter4, _split4, _store_values, _tile, _top2, _uniform)
from .meta import grid_col_pad, layout_id, store_meta

METHOD_IDS = {"naive": 0, "mvue": 1, "soft_threshold": 2}
#: (BT, BF, num_warps[, maxnreg]); BT and BF powers of two >= 32 (a metadata word spans 16 rows x 32
#: columns of the operand).
FWD_CONFIG = (32, 64, 2)  # fastest of bench_pack --sweep on the H200
MVUE_EPS_C: tl.constexpr = tl.constexpr(MVUE_EPS)
#: Int arguments that change every step (the MVUE seed keys, passed whatever the method). Triton
#: specializes an int argument on being 1 or a multiple of 16, so each key landing in a class not seen
#: yet would compile a new variant: 200-300 ms stalls at random training steps (measured on the H200).
PER_STEP_ARGS = ("k1", "k2")


@triton.jit(do_not_specialize=PER_STEP_ARGS)
def _relu2_sparsify24_kernel(
    y1_ptr, out_ptr, mask_ptr, vals_ptr, meta_ptr, dvals_ptr, counts_ptr, scale_ptr, row_ids_ptr,
    n_rows, n_cols, scale_val, k1, k2,
    METHOD: tl.constexpr, SCALE_FROM_PTR: tl.constexpr,
    WRITE_DENSE: tl.constexpr, WRITE_PACKED: tl.constexpr, WRITE_COUNTS: tl.constexpr,
    BT: tl.constexpr, BF: tl.constexpr, LAYOUT: tl.constexpr = 0, WRITE_DVALS: tl.constexpr = True,
    WRITE_MASK: tl.constexpr = True, HAS_ROW_IDS: tl.constexpr = False,
):
    # Outputs: WRITE_PACKED -> s2 values + metadata (+ kept derivatives if WRITE_DVALS); WRITE_DENSE ->
    # s2 dense (+ the keep mask if WRITE_MASK; + the dense derivative in dvals_ptr if WRITE_DVALS).
    # LAYOUT (meta.LAYOUT_IDS) is read only when WRITE_PACKED.
    G: tl.constexpr = BF // 4
    pid_t = tl.program_id(0)
    pid_f = tl.program_id(1)
    row0 = pid_t * BT
    grp0 = pid_f * G
    rows = row0 + tl.arange(0, BT)
    cols = pid_f * BF + tl.arange(0, BF)
    inb = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    y = tl.load(y1_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    r = tl.maximum(y, 0.0, propagate_nan=tl.PropagateNan.ALL)
    x = r * r
    x0, x1, x2, x3 = _split4(x, BT, G)
    r0, r1, r2, r3 = _split4(r, BT, G)
    keep0, keep1, keep2, keep3 = _top2(_nan_to_inf(x0), _nan_to_inf(x1), _nan_to_inf(x2), _nan_to_inf(x3))
    if METHOD == 2:  # soft threshold: shrink by the largest dropped value, times the frozen scale
        if SCALE_FROM_PTR:
            sc = tl.load(scale_ptr).to(tl.float32)
        else:
            sc = scale_val
        ninf = float("-inf")
        t = tl.maximum(
            tl.maximum(tl.where(keep0, ninf, x0), tl.where(keep1, ninf, x1), propagate_nan=tl.PropagateNan.ALL),
            tl.maximum(tl.where(keep2, ninf, x2), tl.where(keep3, ninf, x3), propagate_nan=tl.PropagateNan.ALL),
            propagate_nan=tl.PropagateNan.ALL,
        )
        o0, o1, o2, o3 = sc * (x0 - t), sc * (x1 - t), sc * (x2 - t), sc * (x3 - t)
        d0, d1, d2, d3 = sc * (2.0 * r0), sc * (2.0 * r1), sc * (2.0 * r2), sc * (2.0 * r3)
    elif METHOD == 1:  # MVUE: unbiased sampling of 2 of 4, exact when <= 2 non-zeros
        a0, a1, a2, a3 = x0 + MVUE_EPS_C, x1 + MVUE_EPS_C, x2 + MVUE_EPS_C, x3 + MVUE_EPS_C
        s = ((a0 + a1) + a2) + a3
        if HAS_ROW_IDS:  # MVUE's random numbers of each row's place in the permuted order
            row_ids = tl.load(row_ids_ptr + rows, mask=rows < n_rows, other=0)
        else:
            row_ids = rows
        gid = row_ids.to(tl.int64)[:, None] * (n_cols // 4) + (grp0 + tl.arange(0, G))[None, :]
        ctr = (2 * gid).to(tl.uint32)
        u1 = _uniform(ctr, k1, k2)
        u2 = _uniform(ctr + 1, k1, k2)
        v = u1 * s
        c2 = a0 + a1
        i = (v >= a0).to(tl.int32) + (v >= c2).to(tl.int32) + (v >= c2 + a2).to(tl.int32)
        o0i = tl.where(i == 0, 1, 0)
        o1i = tl.where(i <= 1, 2, 1)
        o2i = tl.where(i <= 2, 3, 2)
        b0 = _gather4(o0i, a0, a1, a2, a3)
        b1 = _gather4(o1i, a0, a1, a2, a3)
        b2 = _gather4(o2i, a0, a1, a2, a3)
        w = u2 * ((b0 + b1) + b2)
        jj = (w >= b0).to(tl.int32) + (w >= b0 + b1).to(tl.int32)
        j = tl.where(jj == 0, o0i, tl.where(jj == 1, o1i, o2i))
        q0 = a0 / ((a1 + a2) + a3)
        q1 = a1 / ((a0 + a2) + a3)
        q2 = a2 / ((a0 + a1) + a3)
        q3 = a3 / ((a0 + a1) + a2)
        p0 = (a0 / s) * (1.0 + ((q1 + q2) + q3))
        p1 = (a1 / s) * (1.0 + ((q0 + q2) + q3))
        p2 = (a2 / s) * (1.0 + ((q0 + q1) + q3))
        p3 = (a3 / s) * (1.0 + ((q0 + q1) + q2))
        nnz = (x0 != 0).to(tl.int32) + (x1 != 0).to(tl.int32) + (x2 != 0).to(tl.int32) + (x3 != 0).to(tl.int32)
        exact = (nnz <= 2) | ~(tl.abs(((x0 + x1) + x2) + x3) < float("inf"))  # NaN/inf: keep exactly
        keep0 = tl.where(exact, keep0, (i == 0) | (j == 0))
        keep1 = tl.where(exact, keep1, (i == 1) | (j == 1))
        keep2 = tl.where(exact, keep2, (i == 2) | (j == 2))
        keep3 = tl.where(exact, keep3, (i == 3) | (j == 3))
        o0 = tl.where(exact, x0, x0 / p0)
        o1 = tl.where(exact, x1, x1 / p1)
        o2 = tl.where(exact, x2, x2 / p2)
        o3 = tl.where(exact, x3, x3 / p3)
        d0 = tl.where(exact, 2.0 * r0, (2.0 * r0) / p0)
        d1 = tl.where(exact, 2.0 * r1, (2.0 * r1) / p1)
        d2 = tl.where(exact, 2.0 * r2, (2.0 * r2) / p2)
        d3 = tl.where(exact, 2.0 * r3, (2.0 * r3) / p3)
    else:  # naive top-2
        o0, o1, o2, o3 = x0, x1, x2, x3
        d0, d1, d2, d3 = 2.0 * r0, 2.0 * r1, 2.0 * r2, 2.0 * r3

    idx0, idx1 = _first_second(keep0, keep1, keep2, keep3)
    v0, v1 = _kept_values(keep0, keep1, keep2, keep3, o0, o1, o2, o3)
    v0 = v0.to(y1_ptr.dtype.element_ty)
    v1 = v1.to(y1_ptr.dtype.element_ty)
    if WRITE_PACKED:
        _store_values(vals_ptr, v0, v1, row0, grp0, n_rows, n_cols, BT, G)
        if WRITE_DVALS:
            dv0, dv1 = _kept_values(keep0, keep1, keep2, keep3, d0, d1, d2, d3)
            _store_values(dvals_ptr, dv0, dv1, row0, grp0, n_rows, n_cols, BT, G)
        store_meta(meta_ptr, idx0, idx1, row0, grp0, n_rows, n_cols, BT, G, LAYOUT)
    if WRITE_DENSE:
        dense = _scatter4(idx0, idx1, v0, v1, BT, G)
        tl.store(out_ptr + offs, dense, mask=inb)
        if WRITE_MASK:
            kept = _join4(keep0.to(tl.int8), keep1.to(tl.int8), keep2.to(tl.int8), keep3.to(tl.int8), BT, G)
            tl.store(mask_ptr + offs, kept, mask=inb)
        if WRITE_DVALS:
            dv0, dv1 = _kept_values(keep0, keep1, keep2, keep3, d0, d1, d2, d3)
            dd = _scatter4(idx0, idx1, dv0.to(y1_ptr.dtype.element_ty), dv1.to(y1_ptr.dtype.element_ty), BT, G)
            tl.store(dvals_ptr + offs, dd, mask=inb)
    if WRITE_COUNTS:
        if WRITE_DENSE:  # the dense tile is at hand: count it
            tl.atomic_add(counts_ptr + cols, tl.sum((dense != 0).to(tl.int32), axis=0), mask=cols < n_cols,
                          sem="relaxed")
        else:
            _add_kept_counts(counts_ptr, idx0, idx1, v0, v1, pid_f * BF, n_cols, BT, G)
        # non-zeros before 2:4, for telemetry (one atomic per tile)
        nnz = (_is_nonzero(x0) + _is_nonzero(x1)) + (_is_nonzero(x2) + _is_nonzero(x3))
        tl.atomic_add(counts_ptr + n_cols, tl.sum(tl.sum(nnz, axis=1), axis=0), sem="relaxed")


@triton.jit
def _add_kept_counts(counts_ptr, idx0, idx1, v0, v1, col0, n_cols, R: tl.constexpr, G: tl.constexpr):
    """counts[col0 + c] += non-zeros kept in column c of a tile of R rows x G groups. The four columns
    of a group are counted in the bytes of one int32 (a tile column holds at most R <= 255
    non-zeros), so the tile's reduction adds G words per row instead of 4G (the packer is bound by
    integer instructions)."""
    tl.static_assert(R <= 255)
    w = tl.where(v0 != 0, 1 << (8 * idx0), 0) + tl.where(v1 != 0, 1 << (8 * idx1), 0)
    ws = tl.sum(w, axis=0)  # [G]
    c = tl.reshape(tl.join(tl.join(ws & 255, (ws >> 16) & 255), tl.join((ws >> 8) & 255, ws >> 24)), [4 * G])
    cols = col0 + tl.arange(0, 4 * G)
    # plain counters, read after the kernel: no ordering needed
    tl.atomic_add(counts_ptr + cols, c, mask=cols < n_cols, sem="relaxed")


def relu2_sparsify24(y1: torch.Tensor, method: str, scale, k1: int, k2: int):
    """Dense outputs: y1 [R, F] contiguous -> (y2_sparse [R, F] y1.dtype, mask bool [R, F])."""
    n_rows, n_cols = y1.shape
    out = torch.empty_like(y1)
    mask = torch.empty(y1.shape, dtype=torch.uint8, device=y1.device)
    scale_t, scale_v, from_ptr = _scale_args(scale, y1)
    _relu2_sparsify24_kernel[_grid(n_rows, n_cols)](
        y1, out, mask, y1, y1, y1, y1, scale_t, y1, n_rows, n_cols, scale_v, k1, k2,
        METHOD=METHOD_IDS[method], SCALE_FROM_PTR=from_ptr,
        WRITE_DENSE=True, WRITE_PACKED=False, WRITE_COUNTS=False, BT=BLOCK_T, BF=BLOCK_F, WRITE_DVALS=False,
    )
    return out, mask.view(torch.bool)


def pack_forward(y1: torch.Tensor, method: str, scale, k1: int, k2: int, config=None, layout="cusparselt",
                 row_ids=None):
    """Twin of reference.pack_forward: y1 [T, F] -> (s2 Packed24, d_vals [T, F/2] or None (see
    reference.recomputes_derivative), counts int32 [F+1]); row_ids int64 [T] or None."""
    bt, bf, opts = _tile(config or FWD_CONFIG)
    n_rows, n_cols = y1.shape
    s2 = Packed24.empty(n_rows, n_cols, y1.dtype, y1.device, layout)
    write_dvals = not recomputes_derivative(method, y1.dtype)
    d_vals = torch.empty(n_rows, n_cols // 2, dtype=y1.dtype, device=y1.device) if write_dvals else None
    counts = torch.zeros(n_cols + 1, dtype=torch.int32, device=y1.device)
    scale_t, scale_v, from_ptr = _scale_args(scale, y1)
    _relu2_sparsify24_kernel[_grid(n_rows, n_cols, bt, bf, col_pad=grid_col_pad(layout))](
        y1, y1, y1, s2.values, s2.meta, d_vals if write_dvals else y1, counts, scale_t,
        y1 if row_ids is None else row_ids, n_rows, n_cols, scale_v, k1, k2, METHOD=METHOD_IDS[method],
        SCALE_FROM_PTR=from_ptr, WRITE_DENSE=False, WRITE_PACKED=True, WRITE_COUNTS=True, BT=bt, BF=bf,
        LAYOUT=layout_id(layout), WRITE_DVALS=write_dvals, HAS_ROW_IDS=row_ids is not None, **opts,
    )
    return s2, d_vals, counts


def sparsify_forward_dense(y1: torch.Tensor, method: str, scale, k1: int, k2: int, row_ids=None, config=None):
    """Twin of reference.sparsify_forward_dense: y1 [T, F] contiguous -> (s2 [T, F], d [T, F] or None,
    counts int32 [F+1]), one pass; row_ids int64 [T] or None."""
    bt, bf, opts = _tile(config or FWD_CONFIG)
    n_rows, n_cols = y1.shape
    s2 = torch.empty_like(y1)
    write_d = not recomputes_derivative(method, y1.dtype)
    d = torch.empty_like(y1) if write_d else None
    counts = torch.zeros(n_cols + 1, dtype=torch.int32, device=y1.device)
    scale_t, scale_v, from_ptr = _scale_args(scale, y1)
    _relu2_sparsify24_kernel[(triton.cdiv(n_rows, bt), triton.cdiv(n_cols, bf))](
        y1, s2, y1, y1, y1, d if write_d else y1, counts, scale_t, y1 if row_ids is None else row_ids,
        n_rows, n_cols, scale_v, k1, k2, METHOD=METHOD_IDS[method], SCALE_FROM_PTR=from_ptr, WRITE_DENSE=True,
        WRITE_PACKED=False, WRITE_COUNTS=True, BT=bt, BF=bf, WRITE_DVALS=write_d, WRITE_MASK=False,
        HAS_ROW_IDS=row_ids is not None, **opts,
    )
    return s2, d, counts
