"""The backward pass of the dense-GEMM engine: G2 -> G1, and the feature-wise 2:4 of G1 and S2, all kept
dense (reference twin: ``reference.sparsify_backward_dense``).

Same sub-tile scheme as the backward packer (``backward.py``): sub-tile i of a tile holds the tokens
at positions t0 + 4q + i of the permuted order, so a feature-wise group is one element of each
sub-tile. The permutation is applied by loading and storing whole rows perm[t0 + 4q + i]
(contiguous features), so the outputs stay in token order and no GEMM operand is ever gathered.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import check_derivative
from .common import _abs_bits_key, _round_to_bf16, _tile, _top2, _top2_network


DENSE_BWD_CONFIG = (32, 128, 4, 128)  # registers capped: -10 % (bench_pack --maxnreg)


@triton.jit
def _load_dense_rows(g2_ptr, s2_ptr, d_ptr, rows, ok, feats, n_feats, HAS_D: tl.constexpr):
    """What ``_g1_dense_rows`` reads for tokens ``rows`` [R] x ``feats`` [BF]: (G2, S2, d or S2
    again), loaded before any is used (see ``backward._load_g1_rows``)."""
    inb = ok[:, None] & (feats < n_feats)[None, :]
    offs = rows.to(tl.int64)[:, None] * n_feats + feats[None, :]
    g2 = tl.load(g2_ptr + offs, mask=inb, other=0.0)
    s2 = tl.load(s2_ptr + offs, mask=inb, other=0.0)
    d = tl.load(d_ptr + offs, mask=inb, other=0.0) if HAS_D else s2
    return g2, s2, d


@triton.jit
def _g1_dense_rows(g2, s2, d, g1_ptr, rows, ok, feats, n_feats, HAS_D: tl.constexpr):
    """G1 = G2 * d (zero where d is zero) for tokens ``rows`` [R] x ``feats`` [BF] from
    ``_load_dense_rows``' tiles, stored; returns the G1 and S2 tiles in the element dtype. d is the
    loaded one, or (not HAS_D: "naive", bf16) 2 bf16(sqrt(S2))."""
    if HAS_D:
        d = d.to(tl.float32)
    else:
        d = 2.0 * _round_to_bf16(tl.sqrt(s2.to(tl.float32)))
    g1 = tl.where(d != 0, g2.to(tl.float32) * d, 0.0).to(g1_ptr.dtype.element_ty)
    inb = ok[:, None] & (feats < n_feats)[None, :]
    tl.store(g1_ptr + rows.to(tl.int64)[:, None] * n_feats + feats[None, :], g1, mask=inb)
    return g1, s2


@triton.jit
def _store_featurewise_dense(out_ptr, x0, x1, x2, x3, is_dense, r0, r1, r2, r3, ok, feats, n_feats):
    """Top-2 |x| of each feature-wise group (x0..x3[q, f]: its 4 tokens, ties to the lower), dense
    features whole, zeros elsewhere, stored at rows r0..r3."""
    if x0.dtype == tl.float32:  # 31-bit keys leave no room for the index bits
        keep0, keep1, keep2, keep3 = _top2(_abs_bits_key(x0), _abs_bits_key(x1), _abs_bits_key(x2),
                                           _abs_bits_key(x3))
    else:
        idx0, idx1 = _top2_network(_abs_bits_key(x0), _abs_bits_key(x1), _abs_bits_key(x2), _abs_bits_key(x3))
        keep0, keep3 = idx0 == 0, idx1 == 3
        keep1 = (idx0 == 1) | (idx1 == 1)
        keep2 = (idx0 == 2) | (idx1 == 2)
    inb = ok[:, None] & (feats < n_feats)[None, :]
    col = feats[None, :]
    dense = is_dense[None, :]
    zero = tl.zeros_like(x0)
    tl.store(out_ptr + r0.to(tl.int64)[:, None] * n_feats + col, tl.where(keep0 | dense, x0, zero), mask=inb)
    tl.store(out_ptr + r1.to(tl.int64)[:, None] * n_feats + col, tl.where(keep1 | dense, x1, zero), mask=inb)
    tl.store(out_ptr + r2.to(tl.int64)[:, None] * n_feats + col, tl.where(keep2 | dense, x2, zero), mask=inb)
    tl.store(out_ptr + r3.to(tl.int64)[:, None] * n_feats + col, tl.where(keep3 | dense, x3, zero), mask=inb)


@triton.jit
def _sparsify_backward_dense_kernel(
    g2_ptr, s2_ptr, d_ptr, perm_ptr, dense_pos_ptr, g1_ptr, g1fw_ptr, s2fw_ptr, db1_ptr, n_tokens, n_feats,
    HAS_D: tl.constexpr, HAS_PERM: tl.constexpr, HAS_DB1: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr,
):
    Q: tl.constexpr = BT // 4
    pid_t = tl.program_id(0)
    feats = tl.program_id(1) * BF + tl.arange(0, BF)
    pos = pid_t * BT + 4 * tl.arange(0, Q)
    ok = pos < n_tokens  # n_tokens % 4 == 0: a group is all in or all out
    if HAS_PERM:
        r0 = tl.load(perm_ptr + pos, mask=ok, other=0)
        r1 = tl.load(perm_ptr + pos + 1, mask=ok, other=0)
        r2 = tl.load(perm_ptr + pos + 2, mask=ok, other=0)
        r3 = tl.load(perm_ptr + pos + 3, mask=ok, other=0)
    else:
        r0, r1, r2, r3 = pos, pos + 1, pos + 2, pos + 3
    g2_0, s2_0, d_0 = _load_dense_rows(g2_ptr, s2_ptr, d_ptr, r0, ok, feats, n_feats, HAS_D)
    g2_1, s2_1, d_1 = _load_dense_rows(g2_ptr, s2_ptr, d_ptr, r1, ok, feats, n_feats, HAS_D)
    g2_2, s2_2, d_2 = _load_dense_rows(g2_ptr, s2_ptr, d_ptr, r2, ok, feats, n_feats, HAS_D)
    g2_3, s2_3, d_3 = _load_dense_rows(g2_ptr, s2_ptr, d_ptr, r3, ok, feats, n_feats, HAS_D)
    is_dense = tl.load(dense_pos_ptr + feats, mask=feats < n_feats, other=-1) >= 0
    g1_0, s2_0 = _g1_dense_rows(g2_0, s2_0, d_0, g1_ptr, r0, ok, feats, n_feats, HAS_D)
    g1_1, s2_1 = _g1_dense_rows(g2_1, s2_1, d_1, g1_ptr, r1, ok, feats, n_feats, HAS_D)
    g1_2, s2_2 = _g1_dense_rows(g2_2, s2_2, d_2, g1_ptr, r2, ok, feats, n_feats, HAS_D)
    g1_3, s2_3 = _g1_dense_rows(g2_3, s2_3, d_3, g1_ptr, r3, ok, feats, n_feats, HAS_D)
    if HAS_DB1:
        col = (g1_0.to(tl.float32) + g1_1.to(tl.float32)) + (g1_2.to(tl.float32) + g1_3.to(tl.float32))
        tl.store(db1_ptr + pid_t * n_feats + feats, tl.sum(col, axis=0), mask=feats < n_feats)
    _store_featurewise_dense(g1fw_ptr, g1_0, g1_1, g1_2, g1_3, is_dense, r0, r1, r2, r3, ok, feats, n_feats)
    _store_featurewise_dense(s2fw_ptr, s2_0, s2_1, s2_2, s2_3, is_dense, r0, r1, r2, r3, ok, feats, n_feats)


def sparsify_backward_dense(g2: torch.Tensor, s2: torch.Tensor, d, dense_pos: torch.Tensor, perm, with_bias_grad: bool,
                            config=None):
    """Twin of reference.sparsify_backward_dense: contiguous G2, S2 (and d) [T, F] -> (g1, g1_fw, s2_fw, db1)."""
    check_derivative(d, s2.dtype)
    bt, bf, opts = _tile(config or DENSE_BWD_CONFIG)
    n_tokens, n_feats = g2.shape
    g1, g1_fw, s2_fw = torch.empty_like(g2), torch.empty_like(g2), torch.empty_like(g2)
    grid = (triton.cdiv(n_tokens, bt), triton.cdiv(n_feats, bf))
    db1_part = torch.empty(grid[0], n_feats, dtype=torch.float32, device=g2.device) if with_bias_grad else g2
    _sparsify_backward_dense_kernel[grid](
        g2, s2, g2 if d is None else d, g2 if perm is None else perm, dense_pos, g1, g1_fw, s2_fw, db1_part,
        n_tokens, n_feats, HAS_D=d is not None, HAS_PERM=perm is not None, HAS_DB1=with_bias_grad, BT=bt, BF=bf,
        **opts,
    )
    return g1, g1_fw, s2_fw, db1_part.sum(0) if with_bias_grad else None
