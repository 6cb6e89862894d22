"""Triton kernels: fused squared-ReLU -> 2:4 select -> pack, and the backward packers.

Each kernel has a reference twin in ``reference.py`` with the same semantics and tie-breaks (read its
module docstring for the rules). Kernels read/write contiguous row-major tensors and the packed
format of ``layout.py``. Tiles (BT x BF, powers of two >= 32) are sized so every program writes whole
metadata words (a word spans 16 rows x 32 columns) for both the [T, F] and the transposed [F, T]
operands. The backward packer needs no in-register transpose for its feature-wise selections (see
its section); ``tools/triton_kernel_stats.py`` shows what each kernel compiles to.

On CPU they run under Triton's interpreter (TRITON_INTERPRET=1 before import); there bf16 is held
as raw 16 bits, so every load is upcast to fp32 at once, as the kernels below do anyway.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import CUTLASS_META_K, DEFAULT_CODE, META_BLOCK_COLS, Packed24, _round_up
from .reference import MVUE_EPS, check_derivative, recomputes_derivative

METHOD_IDS = {"naive": 0, "mvue": 1, "soft_threshold": 2}
BLOCK_T = 64
BLOCK_F = 64
#: (BT, BF, num_warps[, maxnreg]) per kernel; BT and BF must be powers of two >= 32 (metadata words
#: span 16 rows x 32 columns of both the [T, F] and the transposed [F, T] operand).
FWD_CONFIG = (32, 64, 2)  # fastest of bench_pack --sweep on the H200
# One warp per 32 x 32 tile, registers capped at 128 (16 resident warps per SM): the kernel waits on
# its loads (ncu: L1TEX scoreboard ~40 % of its cycles), -6-8 % against (32, 64, 2, 128) (bench_pack).
BWD_CONFIG = (32, 32, 1, 128)
DENSE_COLUMNS_CONFIG = (256, 32, 4)  # (BR, BC, num_warps) of write_dense_columns: fastest on the H200 (bench_pack)
DENSE_SPLIT_CONFIG = (32, 256, 4)  # (BI, BJ, num_warps) of dense_feature_split: fastest (bench_dense_split.py)
#: widest F for which dense_feature_split's all-pairs ranking beats torch's sort on the H200 (GPU time
#: 0.045 vs 0.052 ms at 8192, 0.105 vs 0.056 ms at 16384; host time always ~1/3 of the sort's)
DENSE_SPLIT_MAX_FEATURES = 8192
MVUE_EPS_C: tl.constexpr = tl.constexpr(MVUE_EPS)
DEFAULT_CODE_C: tl.constexpr = tl.constexpr(DEFAULT_CODE)
META_BLOCK_COLS_C: tl.constexpr = tl.constexpr(META_BLOCK_COLS)
CUTLASS_META_K_C: tl.constexpr = tl.constexpr(CUTLASS_META_K)


# --- small helpers ---------------------------------------------------------------------------------


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


@triton.jit
def _cutlass_word(row, k, n_rows):
    """Index of the int16 metadata word holding row ``row``, columns k..k+15 (k % 16 == 0) in
    layout.py's "cutlass" layout (twin of layout.meta_word_index). Shifts and masks rather than //
    and % (row and k are >= 0; signed division by a power of two costs extra instructions)."""
    tl.static_assert(CUTLASS_META_K_C == 128)  # atoms of 64 rows x 128 columns, 512 words
    kk = k & 127
    mm = row & 63
    atom = (k >> 7).to(tl.int64) * ((n_rows + 63) >> 6) + (row >> 6)
    word = ((mm >> 3) & 1) + ((kk >> 5) << 1) + ((mm & 7) << 3) + (((kk >> 4) & 1) << 6) + ((mm >> 4) << 7)
    return (atom << 9) + word


@triton.jit
def _store_meta(meta_ptr, idx0, idx1, row0, grp0, n_rows, n_cols, R: tl.constexpr, G: tl.constexpr,
                CUTLASS: tl.constexpr, EVEN: tl.constexpr = False):
    """Metadata words of a tile of R rows (multiple of 16, row0 too) x G groups (multiple of 8,
    grp0 too), layout.py's format: one int16 word per (rows rlo, rlo+8) x (groups glo, glo+4)
    (cuSPARSELt), or per row x groups 4q..4q+3 (CUTLASS)."""
    codes = idx0 | (idx1 << 2)
    if CUTLASS:
        c = tl.reshape(codes, [R, G // 4, 4])
        j = tl.arange(0, 4)[None, None, :]
        wq = tl.sum(c << (4 * j), axis=2)  # [R, G // 4]
        rq = row0 + tl.arange(0, R)
        kq = 4 * grp0 + 16 * tl.arange(0, G // 4)
        wordq = _cutlass_word(rq[:, None], kq[None, :], n_rows)
        rows_p = (n_rows + 63) // 64 * 64
        cols_p = (n_cols + CUTLASS_META_K_C - 1) // CUTLASS_META_K_C * CUTLASS_META_K_C
        okq = (rq < rows_p)[:, None] & (kq < cols_p)[None, :]
        if EVEN:
            tl.store(meta_ptr + wordq, tl.where(wq >= 32768, wq - 65536, wq).to(tl.int16))
        else:
            tl.store(meta_ptr + wordq, tl.where(wq >= 32768, wq - 65536, wq).to(tl.int16), mask=okq)
    else:
        # rows r = 16 s + 8 rhi + rlo: fold rhi into bits 4..7.
        c = tl.reshape(codes, [R // 16, 2, 8 * G])
        rhi = tl.arange(0, 2)[None, :, None]
        b = tl.sum(c << (4 * rhi), axis=1)  # [R//16, 8 * G] = [s, rlo * G + g]
        # groups g = 8 cb + 4 ghi + glo: fold ghi into bits 8..15.
        b = tl.reshape(b, [R // 2, G // 8, 2, 4])
        ghi = tl.arange(0, 2)[None, None, :, None]
        w = tl.sum(b << (8 * ghi), axis=2)  # [R//2, G//8, 4] = [(s, rlo), cb, glo]
        sr = tl.arange(0, R // 2)
        row = row0 + 16 * (sr // 8) + (sr % 8)  # the rlo row of each word
        cb = grp0 // 8 + tl.arange(0, G // 8)
        glo = tl.arange(0, 4)
        blocks_per_row = (n_cols + META_BLOCK_COLS_C - 1) // META_BLOCK_COLS_C
        word = (row // 64).to(tl.int64) * (blocks_per_row * 128) + ((row % 64) // 16) * 32 + (row % 8) * 4
        word = word[:, None, None] + cb[None, :, None] * 128 + glo[None, None, :]
        n_rows_p = (n_rows + 63) // 64 * 64
        ok = (row < n_rows_p)[:, None, None] & (cb < blocks_per_row)[None, :, None] & (glo >= 0)[None, None, :]
        w16 = tl.where(w >= 32768, w - 65536, w).to(tl.int16)
        # masked even when EVEN: unmasked, Triton 3.6 emits ~130 more instructions in the backward packer
        tl.store(meta_ptr + word, w16, mask=ok)



@triton.jit
def _load_meta(meta_ptr, rows, grp0, n_rows, n_cols, G: tl.constexpr, CUTLASS: tl.constexpr,
               EVEN: tl.constexpr = False):
    """The metadata of rows ``rows`` [R] (any rows), groups grp0.. (grp0 % 8 == 0) of a packed
    [n_rows, n_cols] matrix, loaded but not decoded (``_codes`` does that), so that a kernel can issue
    all its loads before it waits on any: int32 [R, G/2] bytes (CUTLASS, two codes each) or [R, G]
    16-bit words (four codes each); outside the matrix every code in them is DEFAULT_CODE."""
    row = rows[:, None]
    if CUTLASS:
        # Groups 2p, 2p+1 share a byte (low nibble first): load bytes [R, G/2] and split them, which
        # gives the codes the layout of a tile split into pairs (no layout conversion downstream).
        pair = grp0 // 2 + tl.arange(0, G // 2)[None, :]
        byte = 2 * _cutlass_word(row, 8 * (pair - pair % 2), n_rows) + pair % 2
        ok = (row < n_rows) & (pair < n_cols // 8)
        # written out, not through _load_in: through it Triton 3.6 compiles unpack24 differently
        if EVEN:
            return tl.load(meta_ptr.to(tl.pointer_type(tl.uint8)) + byte).to(tl.int32)
        return tl.load(meta_ptr.to(tl.pointer_type(tl.uint8)) + byte, mask=ok, other=DEFAULT_CODE_C * 0x11).to(tl.int32)
    else:
        grp = grp0 + tl.arange(0, G)[None, :]
        blocks_per_row = (n_cols + META_BLOCK_COLS_C - 1) // META_BLOCK_COLS_C
        rr = row & 63  # rows are >= 0: shifts and masks (signed // and % cost sign fix-ups)
        word = (row >> 6).to(tl.int64) * (blocks_per_row * 128) + (grp // 8) * 128 + (rr >> 4) * 32
        word = word + (rr & 7) * 4 + (grp % 4)
        ok = (row < n_rows) & (grp < n_cols // 4)
        return _load_in(meta_ptr + word, ok, DEFAULT_CODE_C * 0x1111, EVEN).to(tl.int32) & 0xFFFF


@triton.jit
def _codes(meta, rows, grp0, n_rows, n_cols, G: tl.constexpr, CUTLASS: tl.constexpr, EVEN: tl.constexpr = False):
    """(idx0, idx1) [R, G] from ``_load_meta``'s tile of the same rows and groups."""
    if CUTLASS:
        codes = tl.reshape(tl.join(meta & 0xF, meta >> 4), [rows.shape[0], G])
    else:
        grp = grp0 + tl.arange(0, G)[None, :]
        shift = 4 * ((rows[:, None] >> 3) & 1) + 8 * ((grp % 8) // 4)
        # the where repeats _load_meta's fill, but without it Triton 3.6's sm_90 code of the backward
        # packer grows by ~190 instructions (offline count, tools/triton_kernel_stats.py)
        if EVEN:
            codes = (meta >> shift) & 0xF
        else:
            ok = (rows[:, None] < n_rows) & (grp < n_cols // 4)
            codes = tl.where(ok, (meta >> shift) & 0xF, DEFAULT_CODE_C)
    return codes & 3, codes >> 2


@triton.jit
def _load_codes(meta_ptr, rows, grp0, n_rows, n_cols, G: tl.constexpr, CUTLASS: tl.constexpr):
    """(idx0, idx1) [R, G] of rows ``rows`` [R] (any rows), groups grp0.. (grp0 % 8 == 0) of a packed
    [n_rows, n_cols] matrix (DEFAULT_CODE outside)."""
    return _codes(_load_meta(meta_ptr, rows, grp0, n_rows, n_cols, G, CUTLASS), rows, grp0, n_rows, n_cols, G,
                  CUTLASS)


# --- forward: relu(y1)^2 -> 2:4 along F -> packed S2, d(S2)/d(Y1), per-feature counts -------------


@triton.jit
def _relu2_sparsify24_kernel(
    y1_ptr, out_ptr, mask_ptr, vals_ptr, meta_ptr, dvals_ptr, counts_ptr, scale_ptr, row_ids_ptr,
    n_rows, n_cols, scale_val, k1, k2,
    METHOD: tl.constexpr, SCALE_FROM_PTR: tl.constexpr,
    WRITE_DENSE: tl.constexpr, WRITE_PACKED: tl.constexpr, WRITE_COUNTS: tl.constexpr,
    BT: tl.constexpr, BF: tl.constexpr, CUTLASS: tl.constexpr = False, WRITE_DVALS: tl.constexpr = True,
    WRITE_MASK: tl.constexpr = True, HAS_ROW_IDS: tl.constexpr = False,
):
    # Outputs: WRITE_PACKED -> s2 values + metadata (+ kept derivatives if WRITE_DVALS); WRITE_DENSE ->
    # s2 dense (+ the keep mask if WRITE_MASK; + the dense derivative in dvals_ptr if WRITE_DVALS).
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
        _store_meta(meta_ptr, idx0, idx1, row0, grp0, n_rows, n_cols, BT, G, CUTLASS)
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
def _is_nonzero(x):
    """1 where x != 0 (NaN included), else 0, for fp32 x >= +0 or NaN (of either sign): integer ops
    on its bits instead of a compare and a select."""
    return tl.minimum(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, 1)


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
    # Cover the metadata padding too (rows padded to 64, cols to 64 or CUTLASS's 128), so every
    # word is written.
    return (triton.cdiv(_round_up(n_rows, row_pad), bt), triton.cdiv(_round_up(n_cols, col_pad), bf))


def _col_pad(layout: str) -> int:
    return CUTLASS_META_K if layout == "cutlass" else 64


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
    _relu2_sparsify24_kernel[_grid(n_rows, n_cols, bt, bf, col_pad=_col_pad(layout))](
        y1, y1, y1, s2.values, s2.meta, d_vals if write_dvals else y1, counts, scale_t,
        y1 if row_ids is None else row_ids, n_rows, n_cols, scale_v, k1, k2, METHOD=METHOD_IDS[method],
        SCALE_FROM_PTR=from_ptr, WRITE_DENSE=False, WRITE_PACKED=True, WRITE_COUNTS=True, BT=bt, BF=bf,
        CUTLASS=layout == "cutlass", WRITE_DVALS=write_dvals, HAS_ROW_IDS=row_ids is not None, **opts,
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


# --- dense features: their columns of dW2 -----------------------------------------------------------
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


# --- dense features: which ones (the n_dense with the most non-zeros) -----------------------------
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


# --- unpack: packed -> dense (for GEMMs that run dense on the sparse operand) ----------------------


@triton.jit
def _unpack24_kernel(vals_ptr, meta_ptr, out_ptr, n_rows, n_cols, BR: tl.constexpr, BC: tl.constexpr,
                     CUTLASS: tl.constexpr):
    G: tl.constexpr = BC // 4
    row0 = tl.program_id(0) * BR
    grp0 = tl.program_id(1) * G
    idx0, idx1 = _load_codes(meta_ptr, row0 + tl.arange(0, BR), grp0, n_rows, n_cols, G, CUTLASS)
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
                                                     BR=BLOCK_T, BC=BLOCK_F, CUTLASS=packed.layout == "cutlass")
    return out


# --- feature-wise 2:4 (groups of 4 consecutive tokens) ---------------------------------------------


@triton.jit
def _featurewise_select(tile_t, R: tl.constexpr, G: tl.constexpr):
    """tile_t [R, 4G] (rows = features, cols = tokens) -> idx0, idx1, v0, v1 of top-2 |x| per 4."""
    a0, a1, a2, a3 = _split4(tile_t, R, G)
    keep0, keep1, keep2, keep3 = _top2(_abs_key(a0), _abs_key(a1), _abs_key(a2), _abs_key(a3))
    idx0, idx1 = _first_second(keep0, keep1, keep2, keep3)
    v0, v1 = _kept_values(keep0, keep1, keep2, keep3, a0, a1, a2, a3)
    return idx0, idx1, v0, v1


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


# --- backward: G2 -> G1 (token-wise, forward mask) + feature-wise packs of G1^T and S2^T ------------
#
# A tile of BT tokens x BF features is held as four [BT/4, BF] sub-tiles, sub-tile i holding tokens
# t0 + 4q + i. A feature-wise group (4 consecutive tokens of one feature) is then one element of each
# sub-tile at the same position: same thread, no transpose, while a token-wise group (4 consecutive
# features) lies inside each sub-tile's rows as in the forward kernel.


@triton.jit
def _round_to_bf16(x):
    """fp32 x >= 0 (or NaN, or +inf) rounded to the nearest bf16 value (half away from zero; kept in
    fp32). Integer ops, so the interpreter (whose bf16 casts truncate) gives the GPU's result; callers
    never hit a tie. NaN bits are first capped (unsigned) at 0x7FFF7FFF, still a NaN, so the carry of
    the rounding cannot wrap a NaN (the GPU's is 0x7FFFFFFF) into -0.0."""
    bits = tl.minimum(x.to(tl.uint32, bitcast=True), 0x7FFF7FFF).to(tl.int32, bitcast=True)
    return ((bits + 0x8000) & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _load_g1_rows(g2_ptr, s2_vals_ptr, s2_meta_ptr, d_vals_ptr, rows, grp0, n_tokens, n_feats,
                  R: tl.constexpr, G: tl.constexpr, CUTLASS: tl.constexpr, HAS_DVALS: tl.constexpr,
                  EVEN: tl.constexpr):
    """What ``_g1_rows`` reads for tokens ``rows`` [R]: (S2's metadata (``_load_meta``), S2's kept
    values [R, 2G], G2 [R, 4G], d(S2)/d(Y1) [R, 2G] (not HAS_DVALS: S2's values again), and the
    offsets and mask of the [R, 2G] kept-value tiles, where G1's are stored too). A separate
    step so that the packer issues the loads of all its rows before it waits on any: one memory
    latency per tile instead of one per row (the kernel waits on its loads, docs/performance.md)."""
    meta = _load_meta(s2_meta_ptr, rows, grp0, n_tokens, n_feats, G, CUTLASS, EVEN)
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
             R: tl.constexpr, G: tl.constexpr, CUTLASS: tl.constexpr, G1_DENSE: tl.constexpr,
             HAS_DVALS: tl.constexpr, EVEN: tl.constexpr):
    """Token-wise part for tokens ``rows`` [R], from ``_load_g1_rows``' tiles: G1 = G2 * d(S2)/d(Y1)
    on the forward mask (already 2:4 with S2's metadata) -> its kept values stored; returns dense G1
    and S2 tiles [R, 4G]. d(S2)/d(Y1) is ``dv``, or (not HAS_DVALS: method "naive", bf16) 2 sqrt(S2).
    G1_DENSE (the forward-mask-dropped ablation): ``g2`` is the dense G1, returned as is."""
    idx0, idx1 = _codes(meta, rows, grp0, n_tokens, n_feats, G, CUTLASS, EVEN)
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
    return g1, _scatter4(idx0, idx1, sv0, sv1, R, G)


@triton.jit
def _pack_featurewise4(x0, x1, x2, x3, is_dense, dpos, t0, f0, vals_ptr, meta_ptr, dense_ptr, n_tokens, n_feats,
                       Q: tl.constexpr, BF: tl.constexpr, CUTLASS: tl.constexpr, EVEN: tl.constexpr):
    """Sub-tiles x_i [Q, BF] (tokens t0 + 4q + i x features f0..) -> their feature-wise 2:4 pack at
    rows f0.. / cols t0.. of the [n_feats, n_tokens] operand (dense features zeroed), and the dense
    features' tokens into dense_ptr [n_dense, n_tokens] at row dpos[f]."""
    # One transpose of the whole tile ([BF, 4Q], a feature's 4Q tokens along its row), shared by the
    # dense features' rows and the selection, which then runs along rows as in the forward packer.
    x = tl.join(tl.join(x0, x2), tl.join(x1, x3))  # [q, f, i // 2, i % 2]
    x = tl.reshape(tl.permute(x, (1, 0, 2, 3)), [BF, 4 * Q])
    toks = t0 + tl.arange(0, 4 * Q)
    doffs = dpos.to(tl.int64)[:, None] * n_tokens + toks[None, :]
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
    _store_meta(meta_ptr, idx0, idx1, f0, t0 // 4, n_feats, n_tokens, BF, Q, CUTLASS, EVEN)


@triton.jit
def _pack_backward_kernel(
    g2_ptr, s2_vals_ptr, s2_meta_ptr, d_vals_ptr, dense_pos_ptr,
    g1_vals_ptr, g1t_vals_ptr, g1t_meta_ptr, g1_dense_ptr,
    s2t_vals_ptr, s2t_meta_ptr, s2_dense_ptr, db1_ptr, perm_ptr,
    n_tokens, n_feats,
    HAS_DB1: tl.constexpr, BT: tl.constexpr, BF: tl.constexpr, CUTLASS: tl.constexpr,
    G1_DENSE: tl.constexpr = False, HAS_DVALS: tl.constexpr = True, HAS_PERM: tl.constexpr = False,
    EVEN: tl.constexpr = False,
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
    ld0 = _load_g1_rows(g2_ptr, s2_vals_ptr, s2_meta_ptr, d_vals_ptr, r0, grp0, n_tokens, n_feats, Q, G, CUTLASS,
                        HAS_DVALS, EVEN)
    ld1 = _load_g1_rows(g2_ptr, s2_vals_ptr, s2_meta_ptr, d_vals_ptr, r1, grp0, n_tokens, n_feats, Q, G, CUTLASS,
                        HAS_DVALS, EVEN)
    ld2 = _load_g1_rows(g2_ptr, s2_vals_ptr, s2_meta_ptr, d_vals_ptr, r2, grp0, n_tokens, n_feats, Q, G, CUTLASS,
                        HAS_DVALS, EVEN)
    ld3 = _load_g1_rows(g2_ptr, s2_vals_ptr, s2_meta_ptr, d_vals_ptr, r3, grp0, n_tokens, n_feats, Q, G, CUTLASS,
                        HAS_DVALS, EVEN)
    feats = f0 + tl.arange(0, BF)
    dpos = _load_in(dense_pos_ptr + feats, feats < n_feats, -1, EVEN)
    g1_0, s2_0 = _g1_rows(*ld0, g1_vals_ptr, r0, grp0, n_tokens, n_feats, Q, G, CUTLASS, G1_DENSE, HAS_DVALS,
                          EVEN)
    g1_1, s2_1 = _g1_rows(*ld1, g1_vals_ptr, r1, grp0, n_tokens, n_feats, Q, G, CUTLASS, G1_DENSE, HAS_DVALS,
                          EVEN)
    g1_2, s2_2 = _g1_rows(*ld2, g1_vals_ptr, r2, grp0, n_tokens, n_feats, Q, G, CUTLASS, G1_DENSE, HAS_DVALS,
                          EVEN)
    g1_3, s2_3 = _g1_rows(*ld3, g1_vals_ptr, r3, grp0, n_tokens, n_feats, Q, G, CUTLASS, G1_DENSE, HAS_DVALS,
                          EVEN)
    if HAS_DB1:
        col = (g1_0.to(tl.float32) + g1_1.to(tl.float32)) + (g1_2.to(tl.float32) + g1_3.to(tl.float32))
        tl.store(db1_ptr + pid_t * n_feats + feats, tl.sum(col, axis=0), mask=feats < n_feats)
    is_dense = dpos >= 0
    _pack_featurewise4(g1_0, g1_1, g1_2, g1_3, is_dense, dpos, t0, f0, g1t_vals_ptr, g1t_meta_ptr, g1_dense_ptr,
                       n_tokens, n_feats, Q, BF, CUTLASS, EVEN)
    _pack_featurewise4(s2_0, s2_1, s2_2, s2_3, is_dense, dpos, t0, f0, s2t_vals_ptr, s2t_meta_ptr, s2_dense_ptr,
                       n_tokens, n_feats, Q, BF, CUTLASS, EVEN)


@triton.jit
def _g1_without_forward_mask_kernel(g2_ptr, y1_ptr, g1_ptr, vals_ptr, meta_ptr, n_rows, n_cols,
                                    BT: tl.constexpr, BF: tl.constexpr, CUTLASS: tl.constexpr):
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
    _store_meta(meta_ptr, idx0, idx1, row0, grp0, n_rows, n_cols, BT, G, CUTLASS)


def pack_backward(g2: torch.Tensor, s2: Packed24, d_vals: torch.Tensor, dense_pos: torch.Tensor,
                  n_dense: int, with_bias_grad: bool, config=None, perm=None):
    """Twin of reference.pack_backward (same arguments and outputs; packed outputs in s2's layout;
    d_vals None: method "naive" in bf16, d(S2)/d(Y1) = 2 sqrt(S2)); perm int64 [T] or None."""
    check_derivative(d_vals, s2.dtype)
    return _launch_pack_backward(g2, s2, d_vals, dense_pos, n_dense, with_bias_grad, config or BWD_CONFIG, perm=perm)


def _launch_pack_backward(g2, s2, d_vals, dense_pos, n_dense, with_bias_grad, config, g1_dense_in=False, perm=None):
    bt, bf, opts = _tile(config)
    n_tokens, n_feats = g2.shape
    dev, dt, layout = g2.device, g2.dtype, s2.layout
    g1 = None
    if not g1_dense_in:
        g1 = Packed24.empty(n_tokens, n_feats, dt, dev, layout)
        g1.meta.copy_(s2.meta)  # G1 keeps the forward mask
    g1t = Packed24.empty(n_feats, n_tokens, dt, dev, layout)
    s2t = Packed24.empty(n_feats, n_tokens, dt, dev, layout)
    g1_dense = torch.empty(n_dense, n_tokens, dtype=dt, device=dev)
    s2_dense = torch.empty(n_dense, n_tokens, dtype=dt, device=dev)
    # The [F, T] packs pad their columns (tokens) like the [T, F] ones pad features.
    grid = _grid(n_tokens, n_feats, bt, bf, row_pad=_col_pad(layout), col_pad=_col_pad(layout))
    even = grid[0] * bt == n_tokens and grid[1] * bf == n_feats  # no partial or padding tiles
    db1_part = torch.empty(grid[0], n_feats, dtype=torch.float32, device=dev) if with_bias_grad else g2
    _pack_backward_kernel[grid](
        g2, s2.values, s2.meta, g2 if d_vals is None else d_vals, dense_pos,
        g2 if g1 is None else g1.values, g1t.values, g1t.meta, g1_dense, s2t.values, s2t.meta, s2_dense, db1_part,
        g2 if perm is None else perm, n_tokens, n_feats, HAS_DB1=with_bias_grad, BT=bt, BF=bf,
        CUTLASS=layout == "cutlass", G1_DENSE=g1_dense_in, HAS_DVALS=d_vals is not None, HAS_PERM=perm is not None,
        EVEN=even, **opts,
    )
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
    _g1_without_forward_mask_kernel[_grid(n_tokens, n_feats, bt, bf, col_pad=_col_pad(layout))](
        g2, y1, g1_full, g1.values, g1.meta, n_tokens, n_feats, BT=bt, BF=bf, CUTLASS=layout == "cutlass", **opts,
    )
    _, g1t, g1_dense, s2t, s2_dense, db1 = _launch_pack_backward(
        g1_full, s2, s2.values, dense_pos, n_dense, with_bias_grad, config, g1_dense_in=True, perm=perm)
    return g1, g1t, g1_dense, s2t, s2_dense, db1


# --- backward for dense GEMMs: G2 -> G1, and the feature-wise 2:4 of G1 and S2, all kept dense --------
#
# Same sub-tile scheme as the packer above: sub-tile i of a tile holds the tokens at positions
# t0 + 4q + i of the permuted order, so a feature-wise group is one element of each sub-tile. The
# permutation is applied by loading and storing whole rows perm[t0 + 4q + i] (contiguous features),
# so the outputs stay in token order and no GEMM operand is ever gathered.

DENSE_BWD_CONFIG = (32, 128, 4, 128)  # registers capped: -10 % (bench_pack --maxnreg)


@triton.jit
def _load_dense_rows(g2_ptr, s2_ptr, d_ptr, rows, ok, feats, n_feats, HAS_D: tl.constexpr):
    """What ``_g1_dense_rows`` reads for tokens ``rows`` [R] x ``feats`` [BF]: (G2, S2, d or S2
    again), loaded before any is used (see ``_load_g1_rows``)."""
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
    keep0, keep1, keep2, keep3 = _top2(_abs_bits_key(x0), _abs_bits_key(x1), _abs_bits_key(x2), _abs_bits_key(x3))
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


__all__ = ["relu2_sparsify24", "pack_forward", "sparsify24_featurewise", "pack_backward",
           "pack_backward_without_forward_mask", "unpack24", "sparsify_forward_dense", "sparsify_backward_dense"]
