"""The packed 2:4 format (kernels/layout.py): round trips, and agreement with cuSPARSELt on GPU."""

import pytest
import torch

from megatron_sparse24.kernels import layout
from megatron_sparse24.kernels.reference import top2_keep
from tests.conftest import requires_gpu


def _random_24(rows, cols, dtype=torch.bfloat16, device="cpu", exactly_two=True):
    """A random 2:4 matrix and its keep mask; non-zero kept values when exactly_two."""
    x = torch.randn(rows, cols, device=device)
    keep = top2_keep(torch.rand(rows, cols // 4, 4, device=device)).reshape(rows, cols)
    vals = x.abs() + 0.5 if exactly_two else x
    return torch.where(keep, vals, 0.0).to(dtype), keep


def _warp_shuffle_positions():
    """Independent derivation of the in-block nibble positions: simulate the two lane-exchange
    steps of the public reverse-engineered sm90 store (16x32 tile, 2 lanes per row, 4 nibbles per
    lane) and return {(row, group): nibble index within the 64-byte sub-block}."""
    step0 = {lane: [(lane // 2, 4 * (lane % 2) + i) for i in range(4)] for lane in range(32)}
    step1 = {}
    for lane in range(32):
        mine, other = step0[lane], step0[lane ^ 16]
        step1[lane] = [other[1], mine[1], other[3], mine[3]] if lane & 16 else [mine[0], other[0], mine[2], other[2]]
    pos = {}
    for lane in range(32):
        mine, other = step1[lane], step1[lane ^ 1]
        word = [other[2], other[3], mine[2], mine[3]] if lane & 1 else [mine[0], mine[1], other[0], other[1]]
        byte = (lane % 2) * 4 + ((lane % 16) // 2) * 8 + (lane // 16) * 2
        for i, rg in enumerate(word):
            pos[rg] = 2 * (byte + i // 2) + i % 2
    return pos


def test_meta_layout_matches_warp_shuffle_derivation():
    codes = torch.randint(0, 16, (128, 16))
    meta = layout.encode_meta(codes, 128, 64).view(torch.uint8)
    pos = _warp_shuffle_positions()
    for rb in range(2):
        for cb in range(2):
            for sub in range(4):
                base = (rb * 2 + cb) * 256 + sub * 64
                for (r, g), nib in pos.items():
                    byte = int(meta[base + nib // 2])
                    got = byte >> 4 if nib % 2 else byte & 0xF
                    assert got == int(codes[rb * 64 + sub * 16 + r, cb * 8 + g])


@pytest.mark.parametrize("rows,cols", [(64, 32), (128, 256), (8, 16), (100, 44), (1, 4)])
def test_encode_decode_roundtrip(rows, cols):
    codes = torch.randint(0, 16, (rows, cols // 4), dtype=torch.int32)
    assert torch.equal(layout.decode_meta(layout.encode_meta(codes, rows, cols), rows, cols), codes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,cols", [(64, 64), (72, 200), (4, 8)])
def test_compress_decompress_roundtrip(rows, cols, dtype):
    dense, keep = _random_24(rows, cols, dtype, exactly_two=False)
    packed = layout.compress24(dense, keep)
    assert packed.buffer.numel() == layout.packed_numel(rows, cols, dtype)
    assert torch.equal(layout.decompress24(packed), dense)
    assert torch.equal(layout.mask_of(packed), keep)


def test_packed_numel_matches_cusparselt_formula():
    # torch._cslt_compress allocates numel * 9 / 16 elements for 16-bit types.
    for rows, cols in [(64, 64), (1024, 4096), (16384, 2048)]:
        assert layout.packed_numel(rows, cols, torch.bfloat16) == rows * cols * 9 // 16


def test_compress_rejects_bad_masks():
    dense = torch.ones(4, 8)
    with pytest.raises(ValueError, match="exactly 2"):
        layout.compress24(dense, torch.ones(4, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="multiple of 4"):
        layout.Packed24(torch.empty(10), 2, 6)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,cols", [(64, 64), (128, 256), (1024, 512), (256, 4096)])
def test_layout_equals_cusparselt_compress(rows, cols, dtype):
    """Byte-for-byte: our packed buffer == torch._cslt_compress (groups with exactly 2 non-zeros,
    so the metadata is unambiguous)."""
    dense, keep = _random_24(rows, cols, dtype, device="cuda")
    ours = layout.compress24(dense, keep)
    theirs = torch._cslt_compress(dense)
    assert theirs.numel() == ours.buffer.numel()
    assert torch.equal(theirs.reshape(-1).view(torch.int16), ours.buffer.view(torch.int16))
    # and their metadata decodes to the same mask with our decoder
    assert torch.equal(layout.decompress24(layout.Packed24(theirs.reshape(-1), rows, cols)), dense)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("rows,cols,n", [(64, 64, 64), (256, 512, 128), (1024, 2048, 192)])
def test_cusparselt_product_on_our_layout(rows, cols, n):
    """torch._cslt_sparse_mm on our packed buffer equals the dense product, both B layouts and
    transpose_result."""
    dense, keep = _random_24(rows, cols, torch.bfloat16, device="cuda", exactly_two=False)
    packed = layout.compress24(dense, keep)
    eye = torch.eye(cols, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(torch._cslt_sparse_mm(packed.cslt_operand(), eye), dense)  # exact decompression
    b = torch.randn(cols, n, device="cuda", dtype=torch.bfloat16)
    ref = dense.float() @ b.float()
    for bb in (b, b.t().contiguous().t()):
        out = torch._cslt_sparse_mm(packed.cslt_operand(), bb)
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
        out_t = torch._cslt_sparse_mm(packed.cslt_operand(), bb, transpose_result=True)
        assert out_t.shape == (n, rows) and out_t.is_contiguous()
        torch.testing.assert_close(out_t.float(), ref.t(), rtol=2e-2, atol=2e-2)


def test_a_new_metadata_layout_is_its_word_index(monkeypatch):
    """The reference side of a layout is one entry (column multiple, word index): encode, decode,
    compress, decompress and the buffer size follow from it. A toy layout (row-major words of 4
    consecutive groups, columns padded to 16) round-trips and differs from both real layouts."""

    def row_major_words(row, group, cols, rows):
        return row * (layout._round_up(cols, 16) // 16) + group // 4, 4 * (group % 4)

    monkeypatch.setitem(layout._META_LAYOUTS, "row_major", (16, row_major_words))
    rows, cols = 70, 48
    dense = torch.randn(rows, cols)
    keep = top2_keep(dense.abs().reshape(rows, cols // 4, 4)).reshape(rows, cols)
    packed = layout.compress24(dense, keep, "row_major")
    assert packed.meta.numel() == layout._round_up(rows, 64) * 48 // 16
    assert torch.equal(layout.decompress24(packed), torch.where(keep, dense, 0.0))
    assert torch.equal(layout.mask_of(packed), keep)
    for real in ("cusparselt", "cutlass"):
        assert not torch.equal(packed.meta, layout.compress24(dense, keep, real).meta[: packed.meta.numel()])
    with pytest.raises(ValueError, match="unknown packed layout"):
        layout.meta_bytes(64, 64, "nope")
