"""Building blocks of the pack kernels: 2:4 selection in registers, the MVUE random stream,
bounds-aware loads and stores, and launch helpers (tiles, grids, the scale argument).

On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1 before import); there bf16 is
held as raw 16 bits, so every load is upcast to fp32 at once, as the kernels do anyway.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layout import _round_up

BLOCK_T = 64
BLOCK_F = 64


# --- selection of 2 of 4 in registers --------------------------------------------------------------


@triton.jit
def _split4(x, R: tl.constexpr, G: tl.constexpr):
    """[R, 4G] -> element 0, 1, 2, 3 of each group of 4 along the last dim, each [R, G]."""
    x4 = tl.reshape(x, [R, G, 2, 2])  # [..., j // 2, j % 2]
    even, odd = tl.split(x4)  # j in {0, 2} / {1, 3}
    a0, a2 = tl.split(even)
    a1, a3 = tl.split(odd)
    return a0, a1, a2, a3


@triton.jit
def _join4(a0, a1, a2, a3, R: tl.constexpr, G: tl.constexpr):
    """Inverse of _split4."""
    x = tl.join(tl.join(a0, a2), tl.join(a1, a3))  # [R, G, j // 2, j % 2]
    return tl.reshape(x, [R, 4 * G])


@triton.jit
def _nan_to_inf(x):
    # min ignores a NaN operand (IEEE minNum): one instruction instead of a compare and a select
    return tl.minimum(x, float("inf"))


@triton.jit
def _top2(k0, k1, k2, k3):
    """Keep flags of the two largest keys; ties go to the lower index (j beats i if k_j > k_i, or
    k_j == k_i and j < i). Keys must be NaN-free (see _nan_to_inf). Exactly two flags are set:
    an element is kept unless at least two of the other three beat it (six comparisons)."""
    p01 = (k1 > k0).to(tl.int32)
    p02 = (k2 > k0).to(tl.int32)
    p03 = (k3 > k0).to(tl.int32)
    p12 = (k2 > k1).to(tl.int32)
    p13 = (k3 > k1).to(tl.int32)
    p23 = (k3 > k2).to(tl.int32)
    keep0 = p01 + p02 + p03 < 2
    keep1 = p12 + p13 - p01 < 1
    keep2 = p23 - p02 - p12 < 0
    keep3 = p03 + p13 + p23 > 1
    return keep0, keep1, keep2, keep3


@triton.jit
def _first_second(keep0, keep1, keep2, keep3):
    """In-group columns (idx0 < idx1) of the two kept elements."""
    idx0 = tl.where(keep0, 0, tl.where(keep1, 1, 2))
    idx1 = tl.where(keep3, 3, tl.where(keep2, 2, 1))
    return idx0, idx1


@triton.jit
def _kept_values(keep0, keep1, keep2, keep3, a0, a1, a2, a3):
    """(a[idx0], a[idx1]) of _first_second's columns, straight from the keep flags."""
    return tl.where(keep0, a0, tl.where(keep1, a1, a2)), tl.where(keep3, a3, tl.where(keep2, a2, a1))


@triton.jit
def _abs_key(x):
    """Key ordering |x| with NaN as +inf: |x| in fp32 (exact for every input dtype), NaN mapped to
    +inf by a min that ignores NaN. Two instructions at most (the conversion; the min, which takes
    the absolute value as an operand modifier), fewer than integer keys on 16-bit bit patterns."""
    return _nan_to_inf(tl.abs(x.to(tl.float32)))


@triton.jit
def _abs_bits_key(x):
    """_abs_key's order as integers: the bits of |x| (sign cleared) capped at those of inf
    (non-negative IEEE floats order like their bit patterns). More integer instructions than
    _abs_key but fewer live fp32 registers: the dense-GEMM engine's backward pass, at its register
    cap, spilled with _abs_key (112 instead of 40 bytes) and ran 10 % slower on the H200."""
    if x.dtype == tl.float32:
        return tl.minimum(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 0x7F800000)
    elif x.dtype == tl.bfloat16:
        return tl.minimum(x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF, 0x7F80)
    else:
        tl.static_assert(x.dtype == tl.float16)
        return tl.minimum(x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF, 0x7C00)


@triton.jit
def _gather4(idx, a0, a1, a2, a3):
    return tl.where(idx == 0, a0, tl.where(idx == 1, a1, tl.where(idx == 2, a2, a3)))


@triton.jit
def _scatter4(idx0, idx1, v0, v1, R: tl.constexpr, G: tl.constexpr):
    """Dense [R, 4G] tile from the two kept values of each group (zeros elsewhere)."""
    zero = tl.zeros_like(v0)
    e0 = tl.where(idx0 == 0, v0, zero)
    e1 = tl.where(idx0 == 1, v0, tl.where(idx1 == 1, v1, zero))
    e2 = tl.where(idx0 == 2, v0, tl.where(idx1 == 2, v1, zero))
    e3 = tl.where(idx1 == 3, v1, zero)
    return _join4(e0, e1, e2, e3, R, G)


@triton.jit
def _top2_network(k0, k1, k2, k3):
    """(idx0, idx1), idx0 < idx1, of the two largest of four integer keys below 2^29 (NaN already
    capped, ``_abs_bits_key``), ties to the lower index: each key carries 3 - i in two low bits, which
    makes the four distinct and settles ties, then seven min/max find the largest two. About half of
    ``_top2`` + ``_first_second``'s instructions, and no flags kept live: the backward packer's
    spills went (docs/performance.md)."""
    c0 = (k0 << 2) | 3
    c1 = (k1 << 2) | 2
    c2 = (k2 << 2) | 1
    c3 = k3 << 2
    hi01 = tl.maximum(c0, c1)
    lo01 = tl.minimum(c0, c1)
    hi23 = tl.maximum(c2, c3)
    lo23 = tl.minimum(c2, c3)
    first = tl.maximum(hi01, hi23) & 3
    second = tl.maximum(tl.minimum(hi01, hi23), tl.maximum(lo01, lo23)) & 3
    return 3 - tl.maximum(first, second), 3 - tl.minimum(first, second)


@triton.jit
def _featurewise_select(tile_t, R: tl.constexpr, G: tl.constexpr):
    """tile_t [R, 4G] (rows = features, cols = tokens) -> idx0, idx1, v0, v1 of top-2 |x| per 4
    (NaN as +inf, ties to the lower index); 16-bit tiles through integer keys (``_top2_network``)."""
    a0, a1, a2, a3 = _split4(tile_t, R, G)
    if tile_t.dtype == tl.float32:  # 31-bit keys leave no room for the index bits
        keep0, keep1, keep2, keep3 = _top2(_abs_key(a0), _abs_key(a1), _abs_key(a2), _abs_key(a3))
        idx0, idx1 = _first_second(keep0, keep1, keep2, keep3)
    else:
        idx0, idx1 = _top2_network(_abs_bits_key(a0), _abs_bits_key(a1), _abs_bits_key(a2), _abs_bits_key(a3))
    v0 = tl.where(idx0 == 0, a0, tl.where(idx0 == 1, a1, a2))
    v1 = tl.where(idx1 == 3, a3, tl.where(idx1 == 2, a2, a1))
    return idx0, idx1, v0, v1


# --- MVUE's random stream (rng.py's twin) -----------------------------------------------------------


@triton.jit
def _fmix32(x):
    x ^= x >> 16
    x *= 0x85EBCA6B
    x ^= x >> 13
    x *= 0xC2B2AE35
    x ^= x >> 16
    return x


@triton.jit
def _uniform(counter, k1, k2):
    """Same stream as rng.uniform: counter is uint32, k1/k2 are 31-bit keys."""
    h = _fmix32(_fmix32(counter ^ k1.to(tl.uint32)) + k2.to(tl.uint32))
    return (h >> 8).to(tl.float32) * (1.0 / 16777216.0)


# --- loads and stores --------------------------------------------------------------------------------


@triton.jit
def _load_in(ptrs, mask, other, EVEN: tl.constexpr):
    """tl.load(ptrs, mask, other), unmasked when EVEN says every element is in bounds (a kernel whose
    grid covers its matrix exactly: no predicates to compute or keep live)."""
    if EVEN:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=mask, other=other)


@triton.jit
def _store_in(ptrs, value, mask, EVEN: tl.constexpr):
    """tl.store(ptrs, value, mask), unmasked when EVEN (see ``_load_in``)."""
    if EVEN:
        tl.store(ptrs, value)
    else:
        tl.store(ptrs, value, mask=mask)


@triton.jit
def _store_values(vals_ptr, v0, v1, row0, grp0, n_rows, n_cols, R: tl.constexpr, G: tl.constexpr,
                  EVEN: tl.constexpr = False):
    """Kept values of a [R, 4G] tile at (row0, 4*grp0) of a packed [n_rows, n_cols] matrix (EVEN: the
    tile is known to lie inside it, no bounds checks)."""
    v = tl.reshape(tl.join(v0, v1), [R, 2 * G])
    rows = row0 + tl.arange(0, R)
    cols = 2 * grp0 + tl.arange(0, 2 * G)
    ptrs = vals_ptr + rows.to(tl.int64)[:, None] * (n_cols // 2) + cols[None, :]
    _store_in(ptrs, v, (rows[:, None] < n_rows) & (cols[None, :] < n_cols // 2), EVEN)


# --- numerics in integer ops --------------------------------------------------------------------------


@triton.jit
def _round_to_bf16(x):
    """fp32 x >= 0 (or NaN, or +inf) rounded to the nearest bf16 value (half away from zero; kept in
    fp32). Integer ops, so the interpreter (whose bf16 casts truncate) gives the GPU's result; callers
    never hit a tie. NaN bits are first capped (unsigned) at 0x7FFF7FFF, still a NaN, so the carry of
    the rounding cannot wrap a NaN (the GPU's is 0x7FFFFFFF) into -0.0."""
    bits = tl.minimum(x.to(tl.uint32, bitcast=True), 0x7FFF7FFF).to(tl.int32, bitcast=True)
    return ((bits + 0x8000) & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _is_nonzero(x):
    """1 where x != 0 (NaN included), else 0, for fp32 x >= +0 or NaN (of either sign): integer ops
    on its bits instead of a compare and a select."""
    return tl.minimum(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 1)


# --- launch helpers ----------------------------------------------------------------------------------


def _tile(config):
    """(BT, BF, launch options) of a kernel configuration (BT, BF, num_warps[, maxnreg]); maxnreg caps
    the registers per thread (more resident warps, possibly spills; None: the compiler's choice)."""
    bt, bf, warps, *rest = config
    opts = {"num_warps": warps}
    if rest and rest[0]:
        opts["maxnreg"] = rest[0]
    return bt, bf, opts


def _scale_args(scale, like: torch.Tensor):
    """(scale pointer, scale value, SCALE_FROM_PTR): a tensor scale is read on the device (no sync);
    otherwise ``like`` stands in for the unread pointer (no allocation per call)."""
    if isinstance(scale, torch.Tensor):
        return scale.to(device=like.device, dtype=torch.float32).reshape(1), 1.0, True
    return like, float(1.0 if scale is None else scale), False


def _grid(n_rows, n_cols, bt=BLOCK_T, bf=BLOCK_F, row_pad=64, col_pad=64):
    # Cover the metadata padding too (rows padded to 64, cols to meta.grid_col_pad), so every word
    # is written.
    return (triton.cdiv(_round_up(n_rows, row_pad), bt), triton.cdiv(_round_up(n_cols, col_pad), bf))
