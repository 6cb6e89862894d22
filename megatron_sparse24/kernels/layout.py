"""The compressed 2:4 operand format shared by every kernel and GEMM backend.

A 2:4-sparse matrix A [R, C] (groups of 4 consecutive elements along C, the GEMM's reduction
dimension, keep at most 2 non-zeros) is stored in ONE flat buffer, exactly as cuSPARSELt's
``cusparseLtSpMMACompress`` writes it for 16-bit types on sm90 (what ``torch._cslt_compress``
returns), so the buffer is handed to ``torch._cslt_sparse_mm`` as is:

    buffer[: R*C/2]   kept values, row-major [R, C/2]; group g of row r owns values 2g, 2g+1
                      (lower column first)
    buffer[R*C/2 :]   metadata, R*C/8 bytes (R padded to 64 and C to 32 for other shapes)

Metadata: each group has a 4-bit code ``idx0 | idx1 << 2``, the in-group columns of its two kept
values (idx0 < idx1; a group with fewer non-zeros still names two distinct columns, which hold
zeros). Codes are arranged in blocks of 64 rows x 32 columns (8 groups), 256 bytes each, blocks in
row-major order. Inside a block, row r = 16*sub + 8*rhi + rlo and group g = 4*ghi + glo; the
16-bit little-endian word ``32*sub + 4*rlo + glo`` holds the code of (r, g) at bit ``4*rhi + 8*ghi``.
So one word packs rows (rlo, rlo+8) x groups (glo, glo+4). This layout was learned from public
reverse-engineering (torchao's sm90 sparsifier) and is confirmed on the H200 by byte-for-byte round
trips against ``torch._cslt_compress`` and by ``torch._cslt_sparse_mm`` products
(tests/kernels/test_layout.py, gpu marker).

A second metadata arrangement, ``layout="cutlass"``, is the one CUTLASS 3.x sm90 sparse GEMMs read
(``Sm90GemmSparseConfig::fill_layoutE`` for 16-bit A, K-major, K tile >= 128): atoms of 64 rows x
``CUTLASS_META_K`` (128) columns, 1 KiB each, atoms of one column band contiguous (column-major atom
order); inside an atom, row mm = 16*m2 + 8*m1 + m0 and column kk = 32*k2 + 16*k1 + k0, the 16-bit
word ``m1 + 2*k2 + 8*m0 + 64*k1 + 128*m2`` holds the 4 groups of columns 16*(kk//16) .. +15 of one
row, group j at bit 4*j. Rows pad to 64 and columns to 128. The values are the same in both layouts.

The emulated backend decompresses the same buffer, so CPU runs exercise the exact layout the GPU
uses. Everything here is plain PyTorch: it is the reference twin of the Triton packers.
"""

from __future__ import annotations

import torch

META_BLOCK_ROWS = 64
META_BLOCK_COLS = 32
#: Columns of one CUTLASS metadata atom (the K tile of the CUTLASS kernels, capped at 128 by CUTLASS).
CUTLASS_META_K = 128
#: Code of a group whose kept columns are 0 and 1 (what an all-zero group selects).
DEFAULT_CODE = 0b0100
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _cusparselt_word_index(row, group, cols: int, rows: int | None):
    blocks_per_row = _round_up(cols, META_BLOCK_COLS) // META_BLOCK_COLS
    rr = row % 64
    word = (row // 64) * (blocks_per_row * 128) + (group // 8) * 128 + (rr // 16) * 32
    word = word + (rr % 8) * 4 + (group % 4)
    shift = 4 * ((rr % 16) // 8) + 8 * ((group % 8) // 4)
    return word, shift


def _cutlass_word_index(row, group, cols: int, rows: int | None):
    if rows is None:
        raise ValueError("the cutlass metadata layout needs the matrix's rows (its atoms run down the rows first)")
    nk = CUTLASS_META_K // 32
    k = 4 * group
    kk = k % CUTLASS_META_K
    mm = row % 64
    atom = (k // CUTLASS_META_K) * (_round_up(rows, META_BLOCK_ROWS) // 64) + row // 64
    word = atom * (4 * CUTLASS_META_K) + (mm // 8) % 2 + 2 * (kk // 32) + 2 * nk * (mm % 8)
    word = word + 16 * nk * ((kk // 16) % 2) + 32 * nk * (mm // 16)
    return word, 4 * (group % 4)


#: Each metadata layout: (the multiple its columns pad to, its word index). Rows always pad to 64.
#: A new layout is one entry here (its word index is its specification; encode/decode follow) plus
#: its Triton store/load in ``triton_kernels/meta.py``.
_META_LAYOUTS = {
    "cusparselt": (META_BLOCK_COLS, _cusparselt_word_index),
    "cutlass": (CUTLASS_META_K, _cutlass_word_index),
}
LAYOUTS = tuple(_META_LAYOUTS)


def _meta_layout(layout: str):
    try:
        return _META_LAYOUTS[layout]
    except KeyError:
        raise ValueError(f"unknown packed layout {layout!r}; expected one of {LAYOUTS}") from None


def meta_col_multiple(layout: str) -> int:
    """The multiple the metadata pads a matrix's columns to (32 for cuSPARSELt, 128 for CUTLASS)."""
    return _meta_layout(layout)[0]


def _meta_cols(cols: int, layout: str) -> int:
    return _round_up(cols, meta_col_multiple(layout))


def meta_bytes(rows: int, cols: int, layout: str = "cusparselt") -> int:
    """Bytes of metadata for a [rows, cols] 2:4 matrix (rows padded to 64, cols to 32 or 128)."""
    return _round_up(rows, META_BLOCK_ROWS) * _meta_cols(cols, layout) // 8


def packed_numel(rows: int, cols: int, dtype: torch.dtype, layout: str = "cusparselt") -> int:
    """Elements (of ``dtype``) in the flat compressed buffer of a [rows, cols] matrix."""
    return rows * cols // 2 + meta_bytes(rows, cols, layout) // dtype.itemsize


class Packed24:
    """A compressed 2:4 matrix [rows, cols], 2:4 along ``cols``, metadata in ``layout``
    ("cusparselt": cuSPARSELt's sm90 layout, or "cutlass": CUTLASS's sm90 layout).

    Not a tensor subclass: a thin view over one flat ``buffer`` (values, then metadata).
    """

    __slots__ = ("buffer", "rows", "cols", "layout")

    def __init__(self, buffer: torch.Tensor, rows: int, cols: int, layout: str = "cusparselt"):
        if cols % 4 != 0:
            raise ValueError(f"2:4 groups run along cols: cols={cols} must be a multiple of 4")
        if buffer.dim() != 1 or buffer.numel() != packed_numel(rows, cols, buffer.dtype, layout):
            raise ValueError(
                f"buffer of {tuple(buffer.shape)} does not hold a packed [{rows}, {cols}] "
                f"{buffer.dtype} matrix ({packed_numel(rows, cols, buffer.dtype, layout)} elements, {layout})"
            )
        self.buffer = buffer
        self.rows = rows
        self.cols = cols
        self.layout = layout

    @classmethod
    def empty(cls, rows: int, cols: int, dtype: torch.dtype, device, layout: str = "cusparselt") -> "Packed24":
        return cls(torch.empty(packed_numel(rows, cols, dtype, layout), dtype=dtype, device=device),
                   rows, cols, layout)

    @property
    def dtype(self) -> torch.dtype:
        return self.buffer.dtype

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def values(self) -> torch.Tensor:
        """Kept values, [rows, cols // 2] (a view)."""
        n = self.rows * self.cols // 2
        return self.buffer[:n].view(self.rows, self.cols // 2)

    def cslt_operand(self) -> torch.Tensor:
        """The buffer as torch's cuSPARSELt ops take it: [rows, numel/rows] (torch >= 2.10 reads M
        from dim 0; older releases derive it from numel, so the 2-D view works for both)."""
        return self.buffer.view(self.rows, -1)

    @property
    def meta(self) -> torch.Tensor:
        """Metadata as little-endian 16-bit words, int16 [meta_bytes // 2] (a view)."""
        return self.buffer[self.rows * self.cols // 2 :].view(torch.int16)


def meta_word_index(row: torch.Tensor, group: torch.Tensor, cols: int, layout: str = "cusparselt",
                    rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Word index and bit shift of group ``group`` of row ``row`` in the metadata of a [rows, cols]
    matrix (``rows`` is only needed for the "cutlass" layout, whose atoms run down the rows first)."""
    return _meta_layout(layout)[1](row, group, cols, rows)


def encode_meta(codes: torch.Tensor, rows: int, cols: int, layout: str = "cusparselt") -> torch.Tensor:
    """Group codes int [rows, cols/4] -> metadata words int16 [meta_bytes/2] (padding: DEFAULT_CODE).
    Every word holds 4 codes at distinct shifts, so adding the shifted codes into words packs them."""
    rp, cp = _round_up(rows, META_BLOCK_ROWS), _meta_cols(cols, layout)
    gp = cp // 4
    full = torch.full((rp, gp), DEFAULT_CODE, dtype=torch.int32, device=codes.device)
    full[:rows, : cols // 4] = codes.to(torch.int32)
    r = torch.arange(rp, device=codes.device).view(rp, 1)
    g = torch.arange(gp, device=codes.device).view(1, gp)
    word, shift = meta_word_index(r, g, cols, layout, rows)
    words = torch.zeros(rp * gp // 4, dtype=torch.int32, device=codes.device)
    words.index_add_(0, word.reshape(-1), (full << shift).to(torch.int32).reshape(-1))
    return torch.where(words >= 32768, words - 65536, words).to(torch.int16)


def decode_meta(meta: torch.Tensor, rows: int, cols: int, layout: str = "cusparselt") -> torch.Tensor:
    """Metadata words int16 -> group codes int32 [rows, cols/4]."""
    r = torch.arange(rows, device=meta.device).view(rows, 1)
    g = torch.arange(cols // 4, device=meta.device).view(1, cols // 4)
    word, shift = meta_word_index(r, g, cols, layout, rows)
    w = meta.to(torch.int32)[word] & 0xFFFF
    return (w >> shift) & 0xF


def compress24(dense: torch.Tensor, keep: torch.Tensor, layout: str = "cusparselt") -> Packed24:
    """Pack a [R, C] matrix given ``keep``, a bool mask with exactly 2 True per group of 4 along C."""
    rows, cols = dense.shape
    k = keep.reshape(rows, cols // 4, 4)
    if not bool((k.sum(-1) == 2).all()):
        raise ValueError("compress24 needs exactly 2 kept elements in every group of 4")
    idx0 = torch.where(k[..., 0], 0, torch.where(k[..., 1], 1, 2))
    idx1 = torch.where(k[..., 3], 3, torch.where(k[..., 2], 2, 1))
    d = dense.reshape(rows, cols // 4, 4)
    vals = torch.stack([d.gather(-1, idx0[..., None])[..., 0], d.gather(-1, idx1[..., None])[..., 0]], -1)
    out = Packed24.empty(rows, cols, dense.dtype, dense.device, layout)
    out.values.copy_(vals.reshape(rows, cols // 2))
    out.meta.copy_(encode_meta(idx0 | (idx1 << 2), rows, cols, layout))
    return out


def codes_to_mask(codes: torch.Tensor) -> torch.Tensor:
    """Group codes [R, G] -> bool keep mask [R, 4G]."""
    j = torch.arange(4, device=codes.device)
    idx0, idx1 = (codes & 3)[..., None], (codes >> 2)[..., None]
    return ((j == idx0) | (j == idx1)).reshape(codes.shape[0], -1)


def decompress24(packed: Packed24, values: torch.Tensor | None = None) -> torch.Tensor:
    """Packed24 -> dense [rows, cols] (zeros where not kept).

    ``values`` [rows, cols/2] replaces the packed values (another tensor sharing the same mask)."""
    rows, cols = packed.shape
    codes = decode_meta(packed.meta, rows, cols, packed.layout)
    vals = (packed.values if values is None else values).reshape(rows, cols // 4, 2)
    j = torch.arange(4, device=codes.device)
    idx0, idx1 = (codes & 3)[..., None], (codes >> 2)[..., None]
    zero = torch.zeros((), dtype=vals.dtype, device=codes.device)
    dense = torch.where(j == idx0, vals[..., 0:1], torch.where(j == idx1, vals[..., 1:2], zero))
    return dense.reshape(rows, cols)


def mask_of(packed: Packed24) -> torch.Tensor:
    """The bool keep mask [rows, cols] of a packed matrix (exactly 2 per group)."""
    return codes_to_mask(decode_meta(packed.meta, packed.rows, packed.cols, packed.layout))
