"""Triton kernels vs their PyTorch reference twins (CPU interpreter; CUDA on a GPU machine).

On CPU the interpreter truncates fp32 -> bf16/fp16 instead of rounding, so low-precision values
may differ by one ulp there; selections (masks, metadata) must still agree exactly. On CUDA the
kernels round to nearest and must match the references exactly (MVUE values up to fp32 division
rounding).
"""

import pytest
import torch
import triton
import triton.language as tl

from megatron_sparse24 import kernels, ops
from megatron_sparse24.kernels import layout, reference, rng
from megatron_sparse24.kernels import triton_kernels as tk

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def _triton_runs_here(device):
    if not kernels.use_triton(torch.empty(0, device=device)):
        pytest.skip(f"Triton cannot run on {device.type} here (set TRITON_INTERPRET=1 for CPU)")
SHAPES = [(64, 64), (72, 200), (128, 96), (4, 4)]


@triton.jit
def _min_inf_kernel(x, out):
    i = tl.arange(0, 2)
    tl.store(out + i, tl.minimum(tl.load(x + i), float("inf")))


def _min_ignores_nan(device) -> bool:
    """Whether tl.minimum ignores a NaN operand here, as the GPU's min instruction (IEEE minNum) does
    and the kernels rely on; Triton 3.7's CPU interpreter propagates it instead (3.9's ignores it)."""
    x = torch.tensor([float("nan"), 1.0], device=device)
    out = torch.empty_like(x)
    _min_inf_kernel[(1,)](x, out)
    return not bool(out.isnan().any())


@pytest.fixture
def _minnum(device):
    if not _min_ignores_nan(device):
        pytest.skip(f"Triton {triton.__version__}'s interpreter propagates NaN through tl.minimum, unlike the "
                    "GPU's minNum the kernels' NaN handling relies on (Triton >= 3.9's interpreter and GPUs ignore it)")


def _exact(device, dtype):
    return dtype == torch.float32 or device.type == "cuda"


def _close(a, b, device, dtype, method="naive"):
    a, b = a.float(), b.float()
    if _exact(device, dtype) and method == "naive":
        assert torch.equal(a, b)
    else:  # one low-precision ulp (interpreter truncation), or fp32 rounding on GPU (MVUE's
        # division, the FMA Triton forms for soft threshold's r*r - t)
        torch.testing.assert_close(a, b, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-6)


def _forward_args(shape, dtype, method, device):
    """(y1, k1, k2, scale) of the forward twins' tests; soft threshold's scale as a device tensor."""
    k1, k2 = rng.seed_keys(5)
    scale = torch.tensor(1.5, device=device) if method == "soft_threshold" else None
    return _y1(shape, dtype, device), k1, k2, scale


def _y1(shape, dtype, device):
    y = torch.randn(shape, device=device) * 2
    y[::3, ::5] = 0.0  # exact zeros and ties between them
    y[1::4, ::2] = y[1::4, 1::2].clone() if shape[1] > 1 else y[1::4, ::2]  # ties between equal values
    return y.to(dtype)


@pytest.mark.parametrize("method", ["naive", "mvue", "soft_threshold"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_relu2_sparsify24_kernel_matches_reference(shape, dtype, method, device):
    y1 = _y1(shape, dtype, device)
    k1, k2 = rng.seed_keys(11)
    scale = 0.75 if method == "soft_threshold" else None
    out, mask = tk.relu2_sparsify24(y1, method, scale, k1, k2)
    ref_out, ref_mask, _ = reference.relu2_sparsify24_full(y1, method, scale, k1, k2)
    assert torch.equal(mask, ref_mask)
    _close(out, ref_out.to(dtype), device, dtype, method)


@pytest.mark.parametrize("method", ["naive", "mvue", "soft_threshold"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_pack_forward_matches_reference(shape, dtype, method, device):
    y1, k1, k2, scale = _forward_args(shape, dtype, method, device)
    s2, d_vals, counts = tk.pack_forward(y1, method, scale, k1, k2)
    r_s2, r_d, r_counts = reference.pack_forward(y1, method, scale, k1, k2)
    assert torch.equal(s2.meta, r_s2.meta)
    _close(s2.values, r_s2.values, device, dtype, method)
    if reference.recomputes_derivative(method, dtype):  # recomputed from s2 in the backward: not saved
        assert d_vals is None and r_d is None
    else:
        _close(d_vals, r_d, device, dtype, method)
    if _exact(device, dtype):
        assert torch.equal(counts, r_counts)
    else:  # per-feature counts are of the kernel's own (truncated) values
        assert torch.equal(counts[:-1], (layout.decompress24(s2) != 0).sum(0).int())
        assert counts[-1] == r_counts[-1]
    assert counts.shape == (shape[1] + 1,)
    assert int(counts[-1]) == int((y1.float() > 0).sum())  # non-zeros before 2:4
    assert int(counts[:-1].sum()) <= int(counts[-1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dense_fraction", [0.0, 0.05, 1.0])
def test_featurewise_kernel_matches_reference(shape, dtype, dense_fraction, device):
    g = _y1(shape, dtype, device)
    out, idx = ops.sparsify24_featurewise(g, dense_fraction=dense_fraction)
    assert torch.equal(out, reference.sparsify24_featurewise(g, idx))


@triton.jit
def _featurewise_select_kernel(x_ptr, idx_ptr, v_ptr, R: tl.constexpr, G: tl.constexpr):
    rows = tl.arange(0, R)[:, None]
    x = tl.load(x_ptr + rows * (4 * G) + tl.arange(0, 4 * G)[None, :])
    idx0, idx1, v0, v1 = tk.common._featurewise_select(x, R, G)
    offs = rows * G + tl.arange(0, G)[None, :]
    tl.store(idx_ptr + offs, idx0)
    tl.store(idx_ptr + R * G + offs, idx1)
    tl.store(v_ptr + offs, v0)
    tl.store(v_ptr + R * G + offs, v1)


@triton.jit
def _store_featurewise_dense_kernel(x_ptr, out_ptr, Q: tl.constexpr, BF: tl.constexpr):
    q = tl.arange(0, Q)
    feats = tl.arange(0, BF)
    r0, r1, r2, r3 = 4 * q, 4 * q + 1, 4 * q + 2, 4 * q + 3
    x0 = tl.load(x_ptr + r0[:, None] * BF + feats[None, :])
    x1 = tl.load(x_ptr + r1[:, None] * BF + feats[None, :])
    x2 = tl.load(x_ptr + r2[:, None] * BF + feats[None, :])
    x3 = tl.load(x_ptr + r3[:, None] * BF + feats[None, :])
    tk.backward_dense._store_featurewise_dense(out_ptr, x0, x1, x2, x3, feats < 0, r0, r1, r2, r3, q >= 0, feats, BF)


@pytest.mark.parametrize("dtype", DTYPES)
def test_featurewise_select_every_tie_pattern(dtype, device):
    """The feature-wise selection of the backward packers on every group of four drawn from {0, -0, 1, -1, 2, -2,
    inf, -inf, NaN} (9^4 groups: every pattern of ties, signs and non-finite values): the kept indices
    are reference.top2_keep's on |x| (NaN as +inf, ties to the lower index), the kept values x's own
    bits; the dense-GEMM engine's backward keeps the same two. bf16/fp16 take integer keys with the
    index in their low bits, fp32 the comparison flags."""
    vals = [0.0, -0.0, 1.0, -1.0, 2.0, -2.0, float("inf"), float("-inf")]
    if dtype != torch.float32 or _min_ignores_nan(device):  # fp32's keys rely on the GPU's min for NaN
        vals.append(float("nan"))
    v = torch.tensor(vals)
    groups = torch.cartesian_prod(v, v, v, v)  # [n, 4]
    r, g = 512, 16
    x = torch.zeros(r * g, 4)
    x[: groups.shape[0]] = groups
    x = x.to(dtype).to(device)
    idx = torch.empty(2, r * g, dtype=torch.int32, device=device)
    kept = torch.empty(2, r * g, dtype=dtype, device=device)
    _featurewise_select_kernel[(1,)](x, idx, kept, R=r, G=g)
    keep = reference.top2_keep(x.float().abs())
    want_idx = torch.stack([keep.int().argmax(-1), 3 - keep.int().flip(-1).argmax(-1)])
    assert torch.equal(idx.long().cpu(), want_idx.cpu())
    want_vals = torch.gather(x, 1, want_idx.t()).t()
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(kept.view(bits).cpu(), want_vals.contiguous().view(bits).cpu())
    # the dense-GEMM engine's backward keeps the same two (groups along tokens: x^T, 4 rows per group)
    xt = x.t().contiguous().reshape(4, 128, 64).permute(1, 0, 2).reshape(512, 64)  # token 4q+i = x[64q+f, i]
    out = torch.full_like(xt, float("nan"))
    _store_featurewise_dense_kernel[(1,)](xt, out, Q=128, BF=64)
    want = torch.where(keep, x, torch.zeros((), dtype=dtype, device=device))
    want = want.t().contiguous().reshape(4, 128, 64).permute(1, 0, 2).reshape(512, 64)
    assert torch.equal(out.view(bits).cpu(), want.view(bits).cpu())


@pytest.mark.parametrize("lay", layout.LAYOUTS)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 64), (72, 200), (128, 96), (144, 200)])
def test_pack_backward_matches_reference(shape, dtype, with_bias, lay, device):
    t, f = shape
    y1, g2 = _y1(shape, dtype, device), torch.randn(shape, device=device).to(dtype)
    s2, d_vals, counts = reference.pack_forward(y1, "naive", layout=lay)
    n_dense = reference.num_dense_features(f, 0.1)
    dense_idx, dense_pos = ops.dense_feature_split(counts[:-1], n_dense)
    got = tk.pack_backward(g2, s2, d_vals, dense_pos, n_dense, with_bias)
    g1, g1t, g1_dense, s2t, s2_dense, db1 = got
    ref = reference.pack_backward(g2, s2, d_vals, dense_pos, n_dense, with_bias)
    assert torch.equal(g1.meta, s2.meta)  # the forward mask is kept
    _close(g1.values, ref[0].values, device, dtype)
    # Feature-wise packs of S2 use stored values: exact everywhere.
    assert torch.equal(s2t.buffer, ref[3].buffer) and torch.equal(s2_dense, ref[4])
    # Feature-wise packs of G1: compare against the reference applied to the kernel's own G1.
    g1_dense_full = layout.decompress24(g1)
    ref_g1t, ref_g1_dense = reference._featurewise_operand(g1_dense_full, dense_pos, n_dense, lay)
    assert torch.equal(g1t.buffer, ref_g1t.buffer) and torch.equal(g1_dense, ref_g1_dense)
    if _exact(device, dtype):
        assert torch.equal(g1t.buffer, ref[1].buffer)
    if with_bias:
        torch.testing.assert_close(db1, g1_dense_full.float().sum(0), rtol=1e-5, atol=1e-5)
    else:
        assert db1 is None
    # dense features: their rows in the sparse operands are zero
    if n_dense:
        assert not layout.decompress24(g1t)[dense_idx].any()
        assert not layout.decompress24(s2t)[dense_idx].any()


@pytest.mark.parametrize("lay", layout.LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(72, 200), (144, 136), (128, 128)])  # (128, 128): no partial or padding tile (EVEN)
def test_pack_backward_through_a_permutation(shape, dtype, lay, device):
    """perm= groups tokens perm[4q..4q+3]: the feature-wise outputs are those of the unpermuted call
    on the permuted tokens, G1 stays in token order; the kernel is its reference twin."""
    t, f = shape
    y1, g2 = _y1(shape, dtype, device), torch.randn(shape, device=device).to(dtype)
    perm, inv = ops.token_permutation(t, 3, device)
    s2, d_vals, counts = reference.pack_forward(y1, "naive", layout=lay)
    n_dense = reference.num_dense_features(f, 0.1)
    _, dense_pos = ops.dense_feature_split(counts[:-1], n_dense)
    ref = reference.pack_backward(g2, s2, d_vals, dense_pos, n_dense, True, perm=perm)
    # the reference against the plain call on permuted tokens
    s2p, d_vals_p, _ = reference.pack_forward(y1[perm], "naive", layout=lay)
    plain = reference.pack_backward(g2[perm], s2p, d_vals_p, dense_pos, n_dense, True)
    for i in (1, 3):
        assert torch.equal(ref[i].buffer, plain[i].buffer)
    assert torch.equal(ref[2], plain[2]) and torch.equal(ref[4], plain[4])
    assert torch.equal(layout.decompress24(ref[0]), layout.decompress24(plain[0])[inv])
    torch.testing.assert_close(ref[5], plain[5])
    assert not torch.equal(ref[3].buffer, reference.pack_backward(g2, s2, d_vals, dense_pos, n_dense, True)[3].buffer)
    # the kernel against the reference
    g1, g1t, g1_dense, s2t, s2_dense, db1 = tk.pack_backward(g2, s2, d_vals, dense_pos, n_dense, True, perm=perm)
    assert torch.equal(g1.meta, s2.meta)
    _close(g1.values, ref[0].values, device, dtype)
    assert torch.equal(s2t.buffer, ref[3].buffer) and torch.equal(s2_dense, ref[4])
    own_t, own_dense = reference._featurewise_operand(layout.decompress24(g1)[perm], dense_pos, n_dense, lay)
    assert torch.equal(g1t.buffer, own_t.buffer) and torch.equal(g1_dense, own_dense)
    if _exact(device, dtype):
        assert torch.equal(g1t.buffer, ref[1].buffer)
    torch.testing.assert_close(db1, layout.decompress24(g1).float().sum(0), rtol=1e-5, atol=1e-5)


def _non_finite(x):
    """x with NaN, +inf, -inf and -0.0 planted (in every group position, next to ordinary values)."""
    x = x.clone()
    x[0::5, 0::7] = float("nan")
    x[1::5, 1::7] = float("inf")
    x[2::5, 2::7] = float("-inf")
    x[3::5, 3::7] = -0.0
    x[4::5, 0:8] = float("nan")  # whole groups of NaN: ties among +inf keys
    return x


def _same(a, b, device, dtype):
    """Equal, NaN where NaN (exact on CUDA / fp32; one low-precision ulp in the interpreter)."""
    tol = {} if _exact(device, dtype) else dict(rtol=1e-2, atol=1e-6)
    torch.testing.assert_close(a.float(), b.float(), equal_nan=True, **({"rtol": 0, "atol": 0} | tol))


@pytest.mark.parametrize("lay", layout.LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_forward_non_finite_inputs(dtype, lay, device, _minnum):
    """NaN is kept as the largest value (ties to the lower index), inf too, -inf and -0.0 are zeros;
    counts count NaN and inf as non-zeros: the kernels' NaN tricks (min ignoring NaN, integer
    non-zero tests) are the reference's rules."""
    y1 = _non_finite(_y1((64, 256), dtype, device))
    s2, _, counts = tk.pack_forward(y1, "naive", None, 0, 0, layout=lay)
    r_s2, _, r_counts = reference.pack_forward(y1, "naive", layout=lay)
    assert torch.equal(s2.meta, r_s2.meta)
    _same(s2.values, r_s2.values, device, dtype)
    assert torch.equal(counts, r_counts)
    all_nan = layout.decompress24(s2)[4::5, 0:8].isnan()  # groups of four NaNs keep the first two
    assert torch.equal(all_nan, torch.tensor([True, True, False, False] * 2, device=device).expand_as(all_nan))
    dense, _, d_counts = tk.sparsify_forward_dense(y1, "naive", None, 0, 0)
    _same(dense, layout.decompress24(r_s2), device, dtype)
    assert torch.equal(d_counts, r_counts)


@pytest.mark.parametrize("lay", layout.LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pack_backward_non_finite_inputs(dtype, lay, device, _minnum):
    t, f = 64, 128
    y1 = _non_finite(_y1((t, f), dtype, device))
    g2 = _non_finite(torch.randn(t, f, device=device).to(dtype)).flip(0).contiguous()  # also where S2 is finite
    s2, d_vals, counts = reference.pack_forward(y1, "naive", layout=lay)
    n_dense = reference.num_dense_features(f, 0.1)
    _, dense_pos = ops.dense_feature_split(counts[:-1], n_dense)
    got = tk.pack_backward(g2, s2, d_vals, dense_pos, n_dense, False)
    ref = reference.pack_backward(g2, s2, d_vals, dense_pos, n_dense, False)
    _same(got[0].values, ref[0].values, device, dtype)
    # feature-wise packs (NaN ranks as +inf): S2's from stored values; G1's against the reference on
    # the kernel's own G1 (the interpreter's bf16 G1 may differ by an ulp), and the reference's on CUDA
    own_t, own_dense = reference._featurewise_operand(layout.decompress24(got[0]), dense_pos, n_dense, lay)
    for (a, a_dense), (b, b_dense) in (((got[3], got[4]), (ref[3], ref[4])), ((got[1], got[2]), (own_t, own_dense))):
        assert torch.equal(a.meta, b.meta)
        _same(a.values, b.values, device, dtype)
        _same(a_dense, b_dense, device, dtype)
    if _exact(device, dtype):
        assert torch.equal(got[1].meta, ref[1].meta)
        _same(got[1].values, ref[1].values, device, dtype)


def test_pack_forward_draws_mvue_by_place_in_the_permutation(device):
    y1 = _y1((64, 64), torch.float32, device)
    perm, inv = ops.token_permutation(64, 5, device)
    k1, k2 = rng.seed_keys(9)
    s2, d_vals, counts = tk.pack_forward(y1, "mvue", None, k1, k2, row_ids=inv)
    s2p, d_vals_p, counts_p = tk.pack_forward(y1[perm], "mvue", None, k1, k2)
    assert torch.equal(layout.decompress24(s2), layout.decompress24(s2p)[inv])
    assert torch.equal(counts, counts_p)
    r_s2, _, _ = reference.pack_forward(y1, "mvue", None, k1, k2, row_ids=inv)
    assert torch.equal(s2.meta, r_s2.meta)


@pytest.mark.parametrize("lay", layout.LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 64), (72, 200), (144, 200)])
def test_pack_backward_without_forward_mask_matches_reference(shape, dtype, lay, device):
    """The ablation's Triton path: G1 = 2 G2 relu(Y1) with its own top-2 |G1| token-wise pack.
    Small integers keep G1 exact in every dtype (the interpreter truncates instead of rounding),
    and make ties frequent."""
    t, f = shape
    y1 = torch.randint(-3, 5, shape, device=device).to(dtype)
    g2 = torch.randint(-3, 4, shape, device=device).to(dtype)
    s2, d_vals, counts = reference.pack_forward(y1, "naive", layout=lay)
    n_dense = reference.num_dense_features(f, 0.1)
    dense_idx, dense_pos = ops.dense_feature_split(counts[:-1], n_dense)
    got = tk.pack_backward_without_forward_mask(g2, y1, s2, dense_pos, n_dense, True)
    ref = reference.pack_backward_without_forward_mask(g2, y1, s2, dense_pos, n_dense, True)
    for a, b in zip(got[:5], ref[:5]):
        assert torch.equal(a.buffer, b.buffer) if isinstance(a, layout.Packed24) else torch.equal(a, b)
    torch.testing.assert_close(got[5], ref[5], rtol=1e-5, atol=1e-5)
    assert got[0].layout == lay and not torch.equal(got[0].meta, s2.meta)  # its own mask, not S2's


def test_mvue_kernel_draws_same_random_numbers_as_reference(device):
    # Groups with 4 distinct positive values: every one is sampled, so masks reveal the draws.
    y1 = (torch.rand(256, 64, device=device) + 0.5)
    k1, k2 = rng.seed_keys(99)
    _, mask = tk.relu2_sparsify24(y1, "mvue", None, k1, k2)
    _, ref_mask, _ = reference.relu2_sparsify24_full(y1, "mvue", None, k1, k2)
    assert torch.equal(mask, ref_mask)
    _, mask2 = tk.relu2_sparsify24(y1, "mvue", None, *rng.seed_keys(100))
    assert not torch.equal(mask, mask2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 64), (72, 200), (4, 4), (130, 36)])
def test_unpack24_matches_decompress(shape, dtype, device):
    x = torch.randn(shape, device=device)
    keep = reference.top2_keep(x.reshape(shape[0], -1, 4)).reshape(shape)
    packed = layout.compress24(torch.where(keep, x, 0.0).to(dtype), keep)
    assert torch.equal(tk.unpack24(packed), layout.decompress24(packed))


@pytest.mark.parametrize("config", [(32, 32, 2), (128, 64, 8), (64, 128, 4)])
def test_pack_kernels_any_tile_config(config, device):
    y1, g2 = _y1((136, 200), torch.float32, device), torch.randn(136, 200, device=device)
    s2, d_vals, counts = tk.pack_forward(y1, "naive", None, 0, 0, config=config)
    r_s2, r_d, r_counts = reference.pack_forward(y1, "naive")
    assert torch.equal(s2.buffer, r_s2.buffer) and torch.equal(d_vals, r_d) and torch.equal(counts, r_counts)
    dense_idx, dense_pos = ops.dense_feature_split(counts[:-1], 16)
    got = tk.pack_backward(g2, s2, d_vals, dense_pos, 16, True, config=config)
    ref = reference.pack_backward(g2, s2, d_vals, dense_pos, 16, True)
    for a, b in zip(got[:5], ref[:5]):
        assert torch.equal(a.buffer, b.buffer) if isinstance(a, layout.Packed24) else torch.equal(a, b)
    got = tk.pack_backward_without_forward_mask(g2, y1, s2, dense_pos, 16, True, config=config)
    ref = reference.pack_backward_without_forward_mask(g2, y1, s2, dense_pos, 16, True)
    for a, b in zip(got[:5], ref[:5]):
        assert torch.equal(a.buffer, b.buffer) if isinstance(a, layout.Packed24) else torch.equal(a, b)


@pytest.mark.parametrize("shape", [(128, 256), (64, 192), (192, 128)])
def test_pack_kernels_cutlass_layout(shape, device):
    """The packers write CUTLASS's metadata layout when asked (including its 128-column padding)."""
    y1, g2 = _y1(shape, torch.float32, device), torch.randn(shape, device=device)
    s2, d_vals, counts = tk.pack_forward(y1, "naive", None, 0, 0, layout="cutlass")
    r_s2, r_d, r_counts = reference.pack_forward(y1, "naive", layout="cutlass")
    assert s2.layout == "cutlass" and torch.equal(s2.buffer, r_s2.buffer)
    assert torch.equal(d_vals, r_d) and torch.equal(counts, r_counts)
    assert torch.equal(tk.unpack24(s2), layout.decompress24(s2))
    # same selection as the cuSPARSELt layout: only the metadata arrangement differs
    assert torch.equal(layout.decompress24(s2), layout.decompress24(reference.pack_forward(y1, "naive")[0]))
    dense_idx, dense_pos = ops.dense_feature_split(counts[:-1], 16)
    got = tk.pack_backward(g2, s2, d_vals, dense_pos, 16, True)
    ref = reference.pack_backward(g2, s2, d_vals, dense_pos, 16, True)
    for a, b in zip(got[:5], ref[:5]):
        if isinstance(a, layout.Packed24):
            assert a.layout == "cutlass" and torch.equal(a.buffer, b.buffer)
        else:
            assert torch.equal(a, b)


def test_bf16_square_root_of_the_rounded_square_is_exact():
    """Exhaustive over every positive finite bf16 r: bf16(sqrt(bf16(r*r))) == r wherever r*r neither
    overflows nor lands below the normal range (reference.recomputes_derivative's claim)."""
    bits = torch.arange(1, 0x7F80, dtype=torch.int32).to(torch.int16)  # positive finite bf16 patterns
    r = bits.view(torch.bfloat16)
    sq = (r.float() * r.float()).to(torch.bfloat16)
    ok = torch.isfinite(sq) & (sq.float() >= torch.finfo(torch.bfloat16).tiny)
    back = torch.sqrt(sq.float()).to(torch.bfloat16)
    assert ok.sum() > 16000  # most of the range
    assert torch.equal(back[ok], r[ok])
    # and with a square root off by a few fp32 ulps (the GPU's approximate one): still exact
    for eps in (2.0**-21, -(2.0**-21)):
        assert torch.equal((torch.sqrt(sq.float()) * (1 + eps)).to(torch.bfloat16)[ok], r[ok])


@pytest.mark.parametrize("lay", layout.LAYOUTS)
def test_naive_bf16_backward_recomputes_the_derivative_exactly(lay, device):
    """bf16 "naive" saves no derivative: the backward's 2 bf16(sqrt(S2)) is the saved 2 relu(Y1)."""
    g = torch.Generator().manual_seed(3)
    scale = 2.0 ** torch.randint(-30, 30, (64, 1), generator=g).float()  # magnitudes far apart
    y1 = (torch.randn(64, 128, generator=g) * scale).to(device=device, dtype=torch.bfloat16)
    g2 = torch.randn(64, 128, generator=g).to(device=device, dtype=torch.bfloat16)
    s2, d_vals, counts = tk.pack_forward(y1, "naive", None, 0, 0, layout=lay)
    r_s2, r_d, _ = reference.pack_forward(y1, "naive", layout=lay)
    assert d_vals is None and r_d is None
    # what the forward used to save: the kept values of 2 relu(Y1). (The reference's S2 is rounded to
    # nearest, as on the GPU; the interpreter's bf16 casts truncate, see _close.)
    saved = layout.compress24((2.0 * torch.relu(y1.float())).to(torch.bfloat16), layout.mask_of(r_s2), lay).values
    _, dense_pos = ops.dense_feature_split(counts[:-1], 8)
    want = reference.pack_backward(g2, r_s2, saved, dense_pos, 8, True)
    bits = lambda p: p.buffer.view(torch.int16)  # noqa: E731  (metadata words may read as NaN in bf16)
    assert torch.equal(bits(reference.pack_backward(g2, r_s2, None, dense_pos, 8, True)[0]), bits(want[0]))
    got = tk.pack_backward(g2, r_s2, None, dense_pos, 8, True)
    _close(got[0].values, want[0].values, device, torch.bfloat16)  # exact on the GPU
    s2_fp32 = reference.pack_forward(y1.float(), "naive", layout=lay)[0]
    for pack_backward in (reference.pack_backward, tk.pack_backward):  # both twins refuse it, same message
        with pytest.raises(ValueError, match="bf16"):
            pack_backward(g2.float(), s2_fp32, None, dense_pos, 8, True)


def test_derivative_is_saved_unless_recomputed_exactly():
    for method in ("naive", "mvue", "soft_threshold"):
        for dtype in DTYPES:
            assert reference.recomputes_derivative(method, dtype) == (method == "naive" and dtype == torch.bfloat16)


# --- the dense-GEMM twins: the same sparsified operands, kept dense --------------------------------


@pytest.mark.parametrize("method", ["naive", "mvue", "soft_threshold"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 64), (72, 200), (4, 4)])
def test_sparsify_forward_dense_matches_reference_and_the_packed_forward(shape, dtype, method, device):
    y1, k1, k2, scale = _forward_args(shape, dtype, method, device)
    s2, d, counts = tk.sparsify_forward_dense(y1, method, scale, k1, k2)
    r_s2, r_d, r_counts = reference.sparsify_forward_dense(y1, method, scale, k1, k2)
    _close(s2, r_s2, device, dtype, method)
    assert (d is None) == (r_d is None) == reference.recomputes_derivative(method, dtype)
    if d is not None:
        _close(d, r_d, device, dtype, method)
        assert torch.equal(d != 0, (d != 0) & layout.mask_of(reference.pack_forward(y1, method, scale, k1, k2)[0]))
    # the packed forward's operand, unpacked, is the dense one (same kernel, other outputs)
    p_s2, p_d, p_counts = tk.pack_forward(y1, method, scale, k1, k2)
    assert torch.equal(layout.decompress24(p_s2), s2) and torch.equal(p_counts, counts)
    if d is not None:
        assert torch.equal(layout.decompress24(p_s2, values=p_d), d)
    if _exact(device, dtype):
        assert torch.equal(counts, r_counts)
    if method == "mvue":  # row_ids: each row draws the random numbers of its place in a permutation
        perm, inv = ops.token_permutation(shape[0], 3, device)
        s2_p, d_p, _ = tk.sparsify_forward_dense(y1, method, None, k1, k2, row_ids=inv)
        r_p = reference.relu2_sparsify24_full(y1.index_select(0, perm), method, None, k1, k2)[0].to(dtype)
        _close(s2_p.index_select(0, perm), r_p, device, dtype, method)
        if shape[0] > 4:
            assert not torch.equal(s2_p, s2)


def _backward_inputs(shape, dtype, device, method="naive"):
    t, f = shape
    y1, g2 = _y1(shape, dtype, device), torch.randn(shape, device=device).to(dtype)
    perm, inv = ops.token_permutation(t, 7, device)
    s2, d, counts = reference.sparsify_forward_dense(y1, method, 0.5 if method == "soft_threshold" else None, 3, 4,
                                                     row_ids=inv)
    dense_idx, dense_pos = ops.dense_feature_split(counts[:-1], reference.num_dense_features(f, 0.1))
    return y1, g2, s2, d, dense_idx, dense_pos, perm


@pytest.mark.parametrize("with_perm", [True, False])
@pytest.mark.parametrize("method", ["naive", "mvue"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 64), (72, 200), (160, 136)])
def test_sparsify_backward_dense_matches_reference(shape, dtype, method, with_perm, device):
    _, g2, s2, d, dense_idx, dense_pos, perm = _backward_inputs(shape, dtype, device, method)
    perm = perm if with_perm else None
    g1, g1_fw, s2_fw, db1 = tk.sparsify_backward_dense(g2, s2, d, dense_pos, perm, True)
    r_g1, r_g1_fw, r_s2_fw, r_db1 = reference.sparsify_backward_dense(g2, s2, d, dense_pos, perm, True)
    _close(g1, r_g1, device, dtype)
    assert torch.equal(s2_fw, r_s2_fw)  # stored values: exact everywhere
    # G1's feature-wise 2:4, against the reference applied to the kernel's own G1 (interpreter rounding)
    assert torch.equal(g1_fw, reference._featurewise_dense_groups(g1, dense_pos >= 0, perm))
    if _exact(device, dtype):
        assert torch.equal(g1_fw, r_g1_fw)
    torch.testing.assert_close(db1, g1.float().sum(0), rtol=1e-5, atol=1e-5)
    assert tk.sparsify_backward_dense(g2, s2, d, dense_pos, perm, False)[3] is None
    # every sparse feature keeps at most 2 of each group of 4 (permuted) tokens; dense ones all
    order = perm if perm is not None else torch.arange(shape[0], device=device)
    groups = (g1_fw.index_select(0, order) != 0).reshape(shape[0] // 4, 4, shape[1]).sum(1)
    assert (groups[:, dense_pos < 0] <= 2).all()
    assert torch.equal(g1_fw[:, dense_idx], g1[:, dense_idx]) and torch.equal(s2_fw[:, dense_idx], s2[:, dense_idx])


@pytest.mark.parametrize("method", ["naive", "mvue"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_twins_are_the_packed_path_on_permuted_tokens(dtype, method, device):
    """The dense-GEMM operands are the packed operands, unpacked and un-permuted: same selections
    (reference twins; the kernels match them above)."""
    t, f = 96, 200
    y1, g2, s2, d, dense_idx, dense_pos, perm = _backward_inputs((t, f), dtype, device, method)
    n_dense = dense_idx.numel()
    g1, g1_fw, s2_fw, db1 = reference.sparsify_backward_dense(g2, s2, d, dense_pos, perm, True)
    p_s2, p_d, _ = reference.pack_forward(y1.index_select(0, perm), method, None, 3, 4)
    assert torch.equal(layout.decompress24(p_s2), s2.index_select(0, perm))
    p_g1, p_g1t, p_g1_dense, p_s2t, p_s2_dense, p_db1 = reference.pack_backward(
        g2.index_select(0, perm), p_s2, p_d, dense_pos, n_dense, True)
    assert torch.equal(layout.decompress24(p_g1), g1.index_select(0, perm))
    for fw, packed_t, dense_part in ((g1_fw, p_g1t, p_g1_dense), (s2_fw, p_s2t, p_s2_dense)):
        want = layout.decompress24(packed_t).t().clone()  # [T, F], permuted order, dense features zero
        want[:, dense_idx] = dense_part.t()
        assert torch.equal(fw.index_select(0, perm), want)
    torch.testing.assert_close(db1, p_db1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_rows, n_cols, n_dense", [(72, 200, 24), (64, 48, 1), (40, 96, 0), (8, 40, 40)])
def test_write_dense_columns_matches_reference(n_rows, n_cols, n_dense, dtype, device):
    """dW2's dense-feature columns written into the 2:4 GEMM's output: those columns replaced by
    their rows of the dense product, every other element untouched."""
    dense_idx = torch.randperm(n_cols, device=device)[:n_dense]
    dense_pos = ops._dense_positions(dense_idx, n_cols)
    rows = torch.randn(n_dense, n_rows, device=device).to(dtype)
    dst = torch.randn(n_rows, n_cols, device=device).to(dtype)
    want = reference.write_dense_columns(dst.clone(), dense_pos, rows)
    assert torch.equal(want[:, dense_idx], rows.t()) if n_dense else torch.equal(want, dst)
    got = tk.write_dense_columns(dst.clone(), dense_pos, rows)
    assert torch.equal(got, want)
    keep = dense_pos < 0
    assert torch.equal(got[:, keep], dst[:, keep])


@pytest.mark.parametrize("n_feats, n_dense", [(200, 24), (64, 1), (8, 8), (1000, 56), (300, 300)])
@pytest.mark.parametrize("config", [None, (32, 64, 2)])
def test_dense_feature_split_matches_the_sort(n_feats, n_dense, config, device):
    """The kernel ranks features exactly as the stable descending sort does: most non-zeros first,
    ties to the lower index (many ties here: counts drawn from a few values)."""
    counts = torch.randint(0, 5, (n_feats,), device=device, dtype=torch.int32) * 7
    counts[::3] = 7  # a large tie class
    want_idx = reference.select_dense_features(counts, n_dense, sort_indices=False)
    want_pos = ops._dense_positions(want_idx, n_feats)
    idx, pos = tk.dense_feature_split(counts, n_dense, config)
    assert idx.dtype == torch.int64 and pos.dtype == torch.int32
    assert torch.equal(idx, want_idx) and torch.equal(pos, want_pos)
    assert sorted(pos[pos >= 0].tolist()) == list(range(n_dense))


def test_dense_feature_split_op_uses_the_kernel_and_keeps_its_contract(device):
    """ops.dense_feature_split on an int32 slice (what the FFN passes: counts[:-1]) gives the
    reference's answer; n_dense = 0 gives empty dense_idx and all -1."""
    counts = torch.randint(0, 50, (129,), device=device, dtype=torch.int32)
    idx, pos = ops.dense_feature_split(counts[:-1], 16)
    assert torch.equal(idx, reference.select_dense_features(counts[:-1], 16, sort_indices=False))
    assert torch.equal(pos[idx], torch.arange(16, dtype=torch.int32, device=device))
    idx, pos = ops.dense_feature_split(counts[:-1], 0)
    assert idx.numel() == 0 and bool((pos == -1).all())


def test_dense_feature_split_op_sorts_above_the_kernels_width(device, monkeypatch):
    """Past DENSE_SPLIT_MAX_FEATURES (F^2 compares cost more than the sort) the op sorts."""
    monkeypatch.setattr(tk, "DENSE_SPLIT_MAX_FEATURES", 64)
    monkeypatch.setattr(tk, "dense_feature_split", lambda *a, **k: pytest.fail("ranking kernel used above its width"))
    counts = torch.randint(0, 50, (129,), device=device, dtype=torch.int32)
    idx, pos = ops.dense_feature_split(counts[:-1], 16)
    assert torch.equal(idx, reference.select_dense_features(counts[:-1], 16, sort_indices=False))
