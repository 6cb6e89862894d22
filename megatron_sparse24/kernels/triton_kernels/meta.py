"""Metadata layouts in Triton: where each 4-bit group code lives, for the packers to write and read.

The layouts themselves are specified (and decoded in plain PyTorch) in ``kernels/layout.py``; a
kernel takes ``LAYOUT: tl.constexpr``, one of ``LAYOUT_IDS``' values, and calls the three
functions below, which pick the layout's own code at compile time:

    store_meta(...)   codes of a register tile -> metadata words in memory
    load_meta(...)    the raw words (or bytes) of a tile, loaded but not decoded, so that a kernel
                      issues all its loads before it waits on any
    tile_codes(...)   load_meta's tile -> (idx0, idx1) per group

A third layout is one more branch in each of them (plus its word index in layout.py): the
per-layout functions are written for the way their words tile a register block (cuSPARSELt's word
spans 2 rows x 2 half-blocks of groups, CUTLASS's 4 consecutive groups of one row), which a
generic word-by-word scatter would lose.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..layout import CUTLASS_META_K, DEFAULT_CODE, LAYOUTS, META_BLOCK_COLS, meta_col_multiple
from .common import _load_in

#: ``LAYOUT`` constexpr of each packed layout (``layout.LAYOUTS``' names).
LAYOUT_IDS = {name: i for i, name in enumerate(LAYOUTS)}
CUSPARSELT: tl.constexpr = tl.constexpr(LAYOUT_IDS["cusparselt"])
CUTLASS: tl.constexpr = tl.constexpr(LAYOUT_IDS["cutlass"])
DEFAULT_CODE_C: tl.constexpr = tl.constexpr(DEFAULT_CODE)
META_BLOCK_COLS_C: tl.constexpr = tl.constexpr(META_BLOCK_COLS)
CUTLASS_META_K_C: tl.constexpr = tl.constexpr(CUTLASS_META_K)


def layout_id(layout: str) -> int:
    """The ``LAYOUT`` constexpr of a packed layout name."""
    return LAYOUT_IDS[layout]


def grid_col_pad(layout: str) -> int:
    """Columns a packer's grid must cover so every metadata word of a [., cols] operand is written
    (cols padded to the layout's multiple, and to 64 at least, the widest default tile)."""
    return max(64, meta_col_multiple(layout))


# --- dispatch by layout ------------------------------------------------------------------------------


@triton.jit
def store_meta(meta_ptr, idx0, idx1, row0, grp0, n_rows, n_cols, R: tl.constexpr, G: tl.constexpr,
               LAYOUT: tl.constexpr, EVEN: tl.constexpr = False):
    """Metadata words of a tile of R rows (multiple of 16, row0 too) x G groups (multiple of 8,
    grp0 too) with kept columns idx0 < idx1 [R, G] (EVEN: the tile lies inside the matrix)."""
    if LAYOUT == CUTLASS:
        _cutlass_store_meta(meta_ptr, idx0, idx1, row0, grp0, n_rows, n_cols, R, G, EVEN)
    else:
        tl.static_assert(LAYOUT == CUSPARSELT)
        _cusparselt_store_meta(meta_ptr, idx0, idx1, row0, grp0, n_rows, n_cols, R, G)


@triton.jit
def load_meta(meta_ptr, rows, grp0, n_rows, n_cols, G: tl.constexpr, LAYOUT: tl.constexpr,
              EVEN: tl.constexpr = False):
    """The metadata of rows ``rows`` [R] (any rows), groups grp0.. (grp0 % 8 == 0) of a packed
    [n_rows, n_cols] matrix, loaded but not decoded (``tile_codes`` does that); outside the matrix
    every code in it is DEFAULT_CODE."""
    if LAYOUT == CUTLASS:
        return _cutlass_load_meta(meta_ptr, rows, grp0, n_rows, n_cols, G, EVEN)
    else:
        tl.static_assert(LAYOUT == CUSPARSELT)
        return _cusparselt_load_meta(meta_ptr, rows, grp0, n_rows, n_cols, G, EVEN)


@triton.jit
def tile_codes(meta, rows, grp0, n_rows, n_cols, G: tl.constexpr, LAYOUT: tl.constexpr, EVEN: tl.constexpr = False):
    """(idx0, idx1) [R, G] from ``load_meta``'s tile of the same rows and groups."""
    if LAYOUT == CUTLASS:
        codes = _cutlass_codes(meta, rows, G)
    else:
        tl.static_assert(LAYOUT == CUSPARSELT)
        codes = _cusparselt_codes(meta, rows, grp0, n_rows, n_cols, G, EVEN)
    return codes & 3, codes >> 2


@triton.jit
def load_codes(meta_ptr, rows, grp0, n_rows, n_cols, G: tl.constexpr, LAYOUT: tl.constexpr):
    """(idx0, idx1) [R, G] of rows ``rows`` [R] (any rows), groups grp0.. (grp0 % 8 == 0) of a packed
    [n_rows, n_cols] matrix (DEFAULT_CODE outside)."""
    return tile_codes(load_meta(meta_ptr, rows, grp0, n_rows, n_cols, G, LAYOUT), rows, grp0, n_rows, n_cols, G,
                      LAYOUT)


# --- cuSPARSELt: a word holds rows (rlo, rlo + 8) x groups (glo, glo + 4) of a 64 x 32 block --------


@triton.jit
def _cusparselt_store_meta(meta_ptr, idx0, idx1, row0, grp0, n_rows, n_cols, R: tl.constexpr, G: tl.constexpr):
    codes = idx0 | (idx1 << 2)
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
def _cusparselt_load_meta(meta_ptr, rows, grp0, n_rows, n_cols, G: tl.constexpr, EVEN: tl.constexpr):
    """16-bit words [R, G], four codes each (a group's word, read once per group)."""
    row = rows[:, None]
    grp = grp0 + tl.arange(0, G)[None, :]
    blocks_per_row = (n_cols + META_BLOCK_COLS_C - 1) // META_BLOCK_COLS_C
    rr = row & 63  # rows are >= 0: shifts and masks (signed // and % cost sign fix-ups)
    word = (row >> 6).to(tl.int64) * (blocks_per_row * 128) + (grp // 8) * 128 + (rr >> 4) * 32
    word = word + (rr & 7) * 4 + (grp % 4)
    ok = (row < n_rows) & (grp < n_cols // 4)
    return _load_in(meta_ptr + word, ok, DEFAULT_CODE_C * 0x1111, EVEN).to(tl.int32) & 0xFFFF


@triton.jit
def _cusparselt_codes(meta, rows, grp0, n_rows, n_cols, G: tl.constexpr, EVEN: tl.constexpr):
    grp = grp0 + tl.arange(0, G)[None, :]
    shift = 4 * ((rows[:, None] >> 3) & 1) + 8 * ((grp % 8) // 4)
    # the where repeats the load's fill, but without it Triton 3.6's sm_90 code of the backward
    # packer grows by ~190 instructions (offline count, tools/triton_kernel_stats.py)
    if EVEN:
        return (meta >> shift) & 0xF
    ok = (rows[:, None] < n_rows) & (grp < n_cols // 4)
    return tl.where(ok, (meta >> shift) & 0xF, DEFAULT_CODE_C)


# --- CUTLASS: a word holds groups 4q .. 4q + 3 of one row, in 64 x 128 atoms ------------------------


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
def _cutlass_store_meta(meta_ptr, idx0, idx1, row0, grp0, n_rows, n_cols, R: tl.constexpr, G: tl.constexpr,
                        EVEN: tl.constexpr):
    codes = idx0 | (idx1 << 2)
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


@triton.jit
def _cutlass_load_meta(meta_ptr, rows, grp0, n_rows, n_cols, G: tl.constexpr, EVEN: tl.constexpr):
    """Bytes [R, G/2] as int32, two codes each: groups 2p, 2p+1 share a byte (low nibble first), which
    gives the codes the layout of a tile split into pairs (no layout conversion downstream)."""
    row = rows[:, None]
    pair = grp0 // 2 + tl.arange(0, G // 2)[None, :]
    byte = 2 * _cutlass_word(row, 8 * (pair - pair % 2), n_rows) + pair % 2
    ok = (row < n_rows) & (pair < n_cols // 8)
    # written out, not through _load_in: through it Triton 3.6 compiles unpack24 differently
    if EVEN:
        return tl.load(meta_ptr.to(tl.pointer_type(tl.uint8)) + byte).to(tl.int32)
    return tl.load(meta_ptr.to(tl.pointer_type(tl.uint8)) + byte, mask=ok, other=DEFAULT_CODE_C * 0x11).to(tl.int32)


@triton.jit
def _cutlass_codes(meta, rows, G: tl.constexpr):
    return tl.reshape(tl.join(meta & 0xF, meta >> 4), [rows.shape[0], G])
