"""The backward packer of the 2:4 engine: G2 -> G1 = G2 * d(S2)/d(Y1) on the forward mask (token-wise
2:4, S2's metadata), and the feature-wise 2:4 packs of G1^T and S2^T (groups of 4 consecutive
tokens, the dense features' rows apart), in one pass (reference twins: ``reference.pack_backward``,
``reference.pack_backward_without_forward_mask``).

A tile of BT tokens x BF features is held as four [BT/4, BF] sub-tiles, sub-tile i holding tokens
t0 + 4q + i. A feature-wise group (4 consecutive tokens of one feature) is then one element of each
sub-tile at the same position: same thread, no transpose, while a token-wise group (4 consecutive
features) lies inside each sub-tile's rows as in the forward kernel.
"""

from __future__ import annotations

import torch
import triton.language as tl
import triton

from ..layout import Packed24
from ..reference import check_derivative
from .common import (_abs_key, _featurewise_select, _first_second, _grid, _kept_values, _load_in, _round_to_bf16,
                     _scatter4, _split4, _store_in, _store_values, _tile, _top2)
from .meta import grid_col_pad, layout_id, load_meta, store_meta, tile_codes

# One warp per 32 x 32 tile, registers capped at 128 (16 resident warps per SM): the kernel waits on
# its loads (ncu: L1TEX scoreboard ~40 % of its cycles), -6-8 % against (32, 64, 2, 128) (bench_pack).
BWD_CONFIG = (32, 32, 1, 128)


@triton.jit
def _load_g1_rows(g2_ptr, s2_vals_ptr, s2_meta_ptr, d_vals_ptr, rows, grp0, n_tokens, n_feats,
                  R: tl.constexpr, G: tl.constexpr, LAYOUT: tl.constexpr, HAS_DVALS: tl.constexpr,
                  EVEN: tl.constexpr):
    """What ``_g1_rows`` reads for tokens ``rows`` [R]: (S2's metadata (``load_meta``), S2's kept
    values [R, 2G], G2 [R, 4G], d(S2)/d(Y1) [R, 2G] (not HAS_DVALS: S2's values again), and the
    offsets and mask of the [R, 2G] kept-value tiles, where G1's are stored too). A separate
    step so that the packer issues the loads of all its rows before it waits on any: one memory
    latency per tile instead of one per row (the kernel waits on its loads, docs/performance.md)."""
    meta = load_meta(s2_meta_ptr, rows, grp0, n_tokens, n_feats, G, LAYOUT, EVEN)
    vcols = 2 * grp0 + tl.arange(0, 2 * G)
    voffs = rows.to(tl.int64)[:, None] * (n_feats // 2) + vcols[None, :]
    feats = 4 * grp0 + tl.arange(0, 4 * G)
    goffs = rows.to(tl.int64)[:, None] * n_feats + feats[None, :]
    vmask = (rows[:, None] < n_tokens) & (vcols[None, :] < n_feats // 2)  # unused when EVEN
    # written out, not through _load_in: through it Triton 3.6 schedules the non-EVEN CUTLASS-layout
    # variants differently (+48 sm_90 instructions in one, offline SASS)
    if EVEN:
        sv = tl.load(s2_vals_ptr + voffs)
        g2 = tl.load(g2_ptr + goffs)
        dv = tl.load(d_vals_ptr + voffs) if HAS_DVALS else sv
    else:
        sv = tl.load(s2_vals_ptr + voffs, mask=vmask, other=0.0)
        g2 = tl.load(g2_ptr + goffs, mask=(rows[:, None] < n_tokens) & (feats[None, :] < n_feats), other=0.0)
        dv = tl.load(d_vals_ptr + voffs, mask=vmask, other=0.0) if HAS_DVALS else sv
    return meta, sv, g2, dv, voffs, vmask


@triton.jit
def _g1_rows(meta, sv, g2, dv, voffs, vmask, g1_vals_ptr, rows, grp0, n_tokens, n_feats,
             R: tl.constexpr, G: tl.constexpr, LAYOUT: tl.constexpr, G1_DENSE: tl.constexpr,
             HAS_DVALS: tl.constexpr, EVEN: tl.constexpr):
    """Token-wise part for tokens ``rows`` [R], from ``_load_g1_rows``' tiles: G1 = G2 * d(S2)/d(Y1)
    on the forward mask (already 2:4 with S2's metadata) -> its kept values stored; returns the dense
    G1 tile [R, 4G] and S2's codes and kept values (idx0, idx1, v0, v1, each [R, G]: ``_scatter4``
    makes S2's dense tile of them where it is needed). d(S2)/d(Y1) is ``dv``, or (not HAS_DVALS: method "naive", bf16) 2 sqrt(S2).
    G1_DENSE (the forward-mask-dropped ablation): ``g2`` is the dense G1, returned as is."""
    idx0, idx1 = tile_codes(meta, rows, grp0, n_tokens, n_feats, G, LAYOUT, EVEN)
    sv0, sv1 = tl.split(tl.reshape(sv, [R, G, 2]))
    if G1_DENSE:
        g1 = g2
    else:
        if HAS_DVALS:
            dv0, dv1 = tl.split(tl.reshape(dv.to(tl.float32), [R, G, 2]))
        else:  # naive bf16: d relu(y)^2 / dy = 2 relu(y) = 2 bf16(sqrt(S2)) exactly (recomputes_derivative)
            dv0 = 2.0 * _round_to_bf16(tl.sqrt(sv0.to(tl.float32)))
            dv1 = 2.0 * _round_to_bf16(tl.sqrt(sv1.to(tl.float32)))
        a0, a1, a2, a3 = _split4(g2.to(tl.float32), R, G)
        # idx0 in {0, 1, 2} < idx1 in {1, 2, 3}: two selects each
        gv0 = (tl.where(idx0 == 0, a0, tl.where(idx0 == 1, a1, a2)) * dv0).to(g1_vals_ptr.dtype.element_ty)
        gv1 = (tl.where(idx1 == 3, a3, tl.where(idx1 == 2, a2, a1)) * dv1).to(g1_vals_ptr.dtype.element_ty)
        _store_in(g1_vals_ptr + voffs, tl.reshape(tl.join(gv0, gv1), [R, 2 * G]), vmask, EVEN)
        g1 = _scatter4(idx0, idx1, gv0, gv1, R, G)
    return g1, (idx0, idx1, sv0, sv1)


@triton.jit
def _pack_featurewise4(x0, x1, x2, x3, is_dense, dpos, t0, f0, vals_ptr, meta_ptr, dense_ptr, n_tokens, n_feats,
                       Q: tl.constexpr, BF: tl.constexpr, LAYOUT: tl.constexpr, EVEN: tl.constexpr,
                       WIDE_DENSE: tl.constexpr):
    """Sub-tiles x_i [Q, BF] (tokens t0 + 4q + i x features f0..) -> their feature-wise 2:4 pack at
    rows f0.. / cols t0.. of the [n_feats, n_tokens] operand (dense features zeroed), and the dense
    features' tokens into dense_ptr [n_dense, n_tokens] at row dpos[f]."""
    # One transpose of the whole tile ([BF, 4Q], a feature's 4Q tokens along its row), shared by the
    # dense features' rows and the selection, which then runs along rows as in the forward packer.
    x = tl.join(tl.join(x0, x2), tl.join(x1, x3))  # [q, f, i // 2, i % 2]
    x = tl.reshape(tl.permute(x, (1, 0, 2, 3)), [BF, 4 * Q])
    toks = t0 + tl.arange(0, 4 * Q)
    if WIDE_DENSE:
        doffs = dpos.to(tl.int64)[:, None] * n_tokens + toks[None, :]
    else:  # 32-bit offsets where the dense rows hold < 2^31 elements: fewer instructions per element
        doffs = dpos[:, None] * n_tokens + toks[None, :]
    if EVEN:
        tl.store(dense_ptr + doffs, x, mask=is_dense[:, None])
    else:
        tl.store(dense_ptr + doffs, x, mask=is_dense[:, None] & (toks < n_tokens)[None, :])
    idx0, idx1, v0, v1 = _featurewise_select(x, BF, Q)  # [BF, Q]
    # Dense features: what all-equal keys would select (the first two tokens), values zeroed.
    idx0 = tl.where(is_dense[:, None], 0, idx0)
    idx1 = tl.where(is_dense[:, None], 1, idx1)
    zero = tl.zeros_like(v0)
    v0 = tl.where(is_dense[:, None], zero, v0)
    v1 = tl.where(is_dense[:, None], zero, v1)
    _store_values(vals_ptr, v0, v1, f0, t0 // 4, n_feats, n_tokens, BF, Q, EVEN)
    store_meta(meta_ptr, idx0, idx1, f0, t0 // 4, n_feats, n_tokens, BF, Q, LAYOUT, EVEN)


@triton.jit
def _pack_backward_kernel(
    g2_ptr, s2_vals_ptr, s2_meta_ptr, d_vals_ptr, dense_pos_ptr,
    g1_vals_ptr, g1t_vals_ptr, g1t_meta_ptr, g1_dense_ptr,
    s2t_vals_ptr, s2t_meta_ptr, s2_dense_ptr, db1_ptr, perm_ptr,
    n_tokens, n_feats,
    HAS_DB1: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr, LAYOUT: tl.constexpr,
    G1_DENSE: tl.constexpr = False, HAS_DVALS: tl.constexpr = True, HAS_PERM: tl.constexpr = False,
    EVEN: tl.constexpr = False, WIDE_DENSE: tl.constexpr = False,
):
    # EVEN: the grid covers [n_tokens, n_feats] exactly (no partial tiles, no padding tiles), so loads
    # and stores need no bounds checks: fewer live predicates, -136 sm_90 instructions per thread in
    # the cuSPARSELt layout, -168 in CUTLASS's (offline counts, Triton 3.6).
    G: tl.constexpr = BF // 4
    Q: tl.constexpr = BT // 4
    pid_t = tl.program_id(0)
    pid_f = tl.program_id(1)
    t0 = pid_t * BT
    f0 = pid_f * BF
    grp0 = pid_f * G
    quad = t0 + 4 * tl.arange(0, Q)  # positions in the feature-wise packs' token order
    if HAS_PERM:  # the token-wise rows of those positions (n_tokens: none, all loads masked)
        ok = quad < n_tokens
        r0 = _load_in(perm_ptr + quad, ok, n_tokens, EVEN)
        r1 = _load_in(perm_ptr + quad + 1, ok, n_tokens, EVEN)
        r2 = _load_in(perm_ptr + quad + 2, ok, n_tokens, EVEN)
        r3 = _load_in(perm_ptr + quad + 3, ok, n_tokens, EVEN)
    else:
        r0, r1, r2, r3 = quad, quad + 1, quad + 2, quad + 3
    # all four row sub-tiles' loads first, then their arithmetic (see _load_g1_rows)
    ld0 = _load_g1_rows(g2_ptr, s2_vals_ptr, s2_meta_ptr, d_vals_ptr, r0, grp0, n_tokens, n_feats, Q, G, LAYOUT,
                        HAS_DVALS, EVEN)
    ld1 = _load_g1_rows(g2_ptr, s2_vals_ptr, s2_meta_ptr, d_vals_ptr, r1, grp0, n_tokens, n_feats, Q, G, LAYOUT,
                        HAS_DVALS, EVEN)
    ld2 = _load_g1_rows(g2_ptr, s2_vals_ptr, s2_meta_ptr, d_vals_ptr, r2, grp0, n_tokens, n_feats, Q, G, LAYOUT,
                        HAS_DVALS, EVEN)
    ld3 = _load_g1_rows(g2_ptr, s2_vals_ptr, s2_meta_ptr, d_vals_ptr, r3, grp0, n_tokens, n_feats, Q, G, LAYOUT,
                        HAS_DVALS, EVEN)
    feats = f0 + tl.arange(0, BF)
    dpos = _load_in(dense_pos_ptr + feats, feats < n_feats, -1, EVEN)
    g1_0, s2k_0 = _g1_rows(*ld0, g1_vals_ptr, r0, grp0, n_tokens, n_feats, Q, G, LAYOUT, G1_DENSE, HAS_DVALS,
                          EVEN)
    g1_1, s2k_1 = _g1_rows(*ld1, g1_vals_ptr, r1, grp0, n_tokens, n_feats, Q, G, LAYOUT, G1_DENSE, HAS_DVALS,
                          EVEN)
    g1_2, s2k_2 = _g1_rows(*ld2, g1_vals_ptr, r2, grp0, n_tokens, n_feats, Q, G, LAYOUT, G1_DENSE, HAS_DVALS,
                          EVEN)
    g1_3, s2k_3 = _g1_rows(*ld3, g1_vals_ptr, r3, grp0, n_tokens, n_feats, Q, G, LAYOUT, G1_DENSE, HAS_DVALS,
                          EVEN)
    if HAS_DB1:
        col = (g1_0.to(tl.float32) + g1_1.to(tl.float32)) + (g1_2.to(tl.float32) + g1_3.to(tl.float32))
        tl.store(db1_ptr + pid_t * n_feats + feats, tl.sum(col, axis=0), mask=feats < n_feats)
    is_dense = dpos >= 0
    _pack_featurewise4(g1_0, g1_1, g1_2, g1_3, is_dense, dpos, t0, f0, g1t_vals_ptr, g1t_meta_ptr, g1_dense_ptr,
                       n_tokens, n_feats, Q, BF, LAYOUT, EVEN, WIDE_DENSE)
    # S2's dense tiles only now, after G1's are packed: fewer live registers (its kept values and codes
    # are half of a dense tile's)
    _pack_featurewise4(_scatter4(*s2k_0, Q, G), _scatter4(*s2k_1, Q, G), _scatter4(*s2k_2, Q, G),
                       _scatter4(*s2k_3, Q, G), is_dense, dpos, t0, f0, s2t_vals_ptr, s2t_meta_ptr, s2_dense_ptr,
                       n_tokens, n_feats, Q, BF, LAYOUT, EVEN, WIDE_DENSE)


@triton.jit
def _g1_without_forward_mask_kernel(g2_ptr, y1_ptr, g1_ptr, vals_ptr, meta_ptr, n_rows, n_cols,
                                    BT: tl.constexpr, BF: tl.constexpr, LAYOUT: tl.constexpr):
    """The ablation's G1 = 2 G2 relu(Y1) (dense, rounded) and its own token-wise top-2 |G1| pack."""
    G: tl.constexpr = BF // 4
    row0 = tl.program_id(0) * BT
    grp0 = tl.program_id(1) * G
    rows = row0 + tl.arange(0, BT)
    cols = tl.program_id(1) * BF + tl.arange(0, BF)
    inb = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offs = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    g = tl.load(g2_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    y = tl.load(y1_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    g1 = (2.0 * g * tl.where(y < 0, 0.0, y)).to(g2_ptr.dtype.element_ty)
    tl.store(g1_ptr + offs, g1, mask=inb)
    a0, a1, a2, a3 = _split4(g1, BT, G)
    keep0, keep1, keep2, keep3 = _top2(_abs_key(a0), _abs_key(a1), _abs_key(a2), _abs_key(a3))
    idx0, idx1 = _first_second(keep0, keep1, keep2, keep3)
    v0, v1 = _kept_values(keep0, keep1, keep2, keep3, a0, a1, a2, a3)
    _store_values(vals_ptr, v0, v1, row0, grp0, n_rows, n_cols, BT, G)
    store_meta(meta_ptr, idx0, idx1, row0, grp0, n_rows, n_cols, BT, G, LAYOUT)


def pack_backward(g2: torch.Tensor, s2: Packed24, d_vals: torch.Tensor, dense_pos: torch.Tensor,
                  n_dense: int, with_bias_grad: bool, config=None, perm=None):
    """Twin of reference.pack_backward (same arguments and outputs; packed outputs in s2's layout;
    d_vals None: method "naive" in bf16, d(S2)/d(Y1) = 2 sqrt(S2)); perm int64 [T] or None."""
    check_derivative(d_vals, s2.dtype)
    return _launch_pack_backward(g2, s2, d_vals, dense_pos, n_dense, with_bias_grad, config or BWD_CONFIG, perm=perm)


def pack_backward_outputs(n_tokens, n_feats, dtype, device, layout, n_dense, with_bias_grad, config=None,
                          g1_meta=None):
    """The backward packer's outputs, allocated: (g1 Packed24 [T, F] with ``g1_meta`` copied into its
    metadata (the forward mask), or None where ``g1_meta`` is None; g1t, s2t Packed24 [F, T]; g1_dense,
    s2_dense [n_dense, T]; db1's partial sums fp32 [token tiles, F] or None), and the launch grid."""
    bt, bf, _ = _tile(config or BWD_CONFIG)
    g1 = None
    if g1_meta is not None:
        g1 = Packed24.empty(n_tokens, n_feats, dtype, device, layout)
        g1.meta.copy_(g1_meta)  # G1 keeps the forward mask
    g1t = Packed24.empty(n_feats, n_tokens, dtype, device, layout)
    s2t = Packed24.empty(n_feats, n_tokens, dtype, device, layout)
    g1_dense = torch.empty(n_dense, n_tokens, dtype=dtype, device=device)
    s2_dense = torch.empty(n_dense, n_tokens, dtype=dtype, device=device)
    # The [F, T] packs pad their columns (tokens) like the [T, F] ones pad features.
    grid = _grid(n_tokens, n_feats, bt, bf, row_pad=grid_col_pad(layout), col_pad=grid_col_pad(layout))
    db1_part = torch.empty(grid[0], n_feats, dtype=torch.float32, device=device) if with_bias_grad else None
    return (g1, g1t, s2t, g1_dense, s2_dense, db1_part), grid


def launch_pack_backward(g2, s2, d_vals, dense_pos, outputs, grid, config=None, perm=None):
    """One launch of the backward packer into ``outputs``/``grid`` of ``pack_backward_outputs``. Without a
    g1 output (``g1_meta`` None there), ``g2`` is taken to be G1 already, dense (the ablation's second pass)."""
    bt, bf, opts = _tile(config or BWD_CONFIG)
    g1, g1t, s2t, g1_dense, s2_dense, db1_part = outputs
    n_tokens, n_feats = g2.shape
    even = grid[0] * bt == n_tokens and grid[1] * bf == n_feats  # no partial or padding tiles
    _pack_backward_kernel[grid](
        g2, s2.values, s2.meta, g2 if d_vals is None else d_vals, dense_pos,
        g2 if g1 is None else g1.values, g1t.values, g1t.meta, g1_dense, s2t.values, s2t.meta, s2_dense,
        g2 if db1_part is None else db1_part, g2 if perm is None else perm, n_tokens, n_feats,
        HAS_DB1=db1_part is not None, BT=bt, BF=bf, LAYOUT=layout_id(s2.layout), G1_DENSE=g1 is None,
        HAS_DVALS=d_vals is not None, HAS_PERM=perm is not None, EVEN=even, WIDE_DENSE=g1_dense.numel() >= 2**31,
        **opts,
    )


def _launch_pack_backward(g2, s2, d_vals, dense_pos, n_dense, with_bias_grad, config, g1_dense_in=False, perm=None):
    n_tokens, n_feats = g2.shape
    outputs, grid = pack_backward_outputs(n_tokens, n_feats, g2.dtype, g2.device, s2.layout, n_dense,
                                          with_bias_grad, config, g1_meta=None if g1_dense_in else s2.meta)
    launch_pack_backward(g2, s2, d_vals, dense_pos, outputs, grid, config, perm=perm)
    g1, g1t, s2t, g1_dense, s2_dense, db1_part = outputs
    db1 = db1_part.sum(0) if with_bias_grad else None
    return g1, g1t, g1_dense, s2t, s2_dense, db1


def pack_backward_without_forward_mask(g2: torch.Tensor, y1: torch.Tensor, s2: Packed24, dense_pos: torch.Tensor,
                                       n_dense: int, with_bias_grad: bool, config=None, perm=None):
    """Twin of reference.pack_backward_without_forward_mask (the ablation; same outputs as
    pack_backward). Two passes with the same tiles: G1 dense + its token-wise pack, then the
    feature-wise packs."""
    config = config or BWD_CONFIG
    bt, bf, opts = _tile(config)
    n_tokens, n_feats = g2.shape
    dev, dt, layout = g2.device, g2.dtype, s2.layout
    g1_full = torch.empty_like(g2)
    g1 = Packed24.empty(n_tokens, n_feats, dt, dev, layout)
    _g1_without_forward_mask_kernel[_grid(n_tokens, n_feats, bt, bf, col_pad=grid_col_pad(layout))](
        g2, y1, g1_full, g1.values, g1.meta, n_tokens, n_feats, BT=bt, BF=bf, LAYOUT=layout_id(layout), **opts,
    )
    _, g1t, g1_dense, s2t, s2_dense, db1 = _launch_pack_backward(
        g1_full, s2, s2.values, dense_pos, n_dense, with_bias_grad, config, g1_dense_in=True, perm=perm)
    return g1, g1t, g1_dense, s2t, s2_dense, db1
