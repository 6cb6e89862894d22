"""Semantics of the public op API (ops.py), on CPU (interpreter) and CUDA."""

import math

import pytest
import torch

from megatron_sparse24 import ops
from megatron_sparse24.kernels import reference

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _groups(t):
    return t.reshape(-1, t.shape[-1] // 4, 4)


# --- relu2_sparsify24 ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["naive", "mvue", "soft_threshold"])
def test_pattern_and_dtype(method, dtype, device):
    y1 = torch.randn(3, 40, 32, device=device).to(dtype)
    out, mask = ops.relu2_sparsify24(y1, method, seed=1 if method == "mvue" else None)
    assert out.shape == y1.shape and out.dtype == dtype and mask.dtype == torch.bool
    assert (_groups(out != 0).sum(-1) <= 2).all()
    assert (_groups(mask).sum(-1) == 2).all()  # exactly two kept slots per group
    assert not out[~mask].any()
    assert (out >= 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_naive_keeps_two_largest(dtype, device):
    y1 = torch.randn(64, 64, device=device).to(dtype)
    out, mask = ops.relu2_sparsify24(y1)
    y2 = torch.relu(y1.float()) ** 2
    g, m = _groups(y2), _groups(mask)
    kept_min = torch.where(m, g, math.inf).amin(-1)
    dropped_max = torch.where(m, -math.inf, g).amax(-1)
    assert (kept_min >= dropped_max).all()
    torch.testing.assert_close(out.float(), torch.where(mask, y2, 0.0).to(dtype).float(), rtol=1e-2, atol=0)


def test_naive_tie_break_lower_index(device):
    y1 = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0, 3.0, 1.0, 3.0, 3.0]],
                      device=device)
    _, mask = ops.relu2_sparsify24(y1)
    expect = [1, 1, 0, 0, 0, 1, 1, 0, 1, 1, 0, 0, 1, 0, 1, 0]
    assert mask.int().flatten().tolist() == expect


def test_nan_and_inf_propagate(device):
    y1 = torch.tensor([[float("nan"), 1.0, 2.0, 3.0, float("inf"), 1.0, 0.5, -1.0]], device=device)
    for method, kw in (("naive", {}), ("mvue", {"seed": 0}), ("soft_threshold", {})):
        out, mask = ops.relu2_sparsify24(y1, method, **kw)
        assert mask[0, 0] and torch.isnan(out[0, 0])  # NaN ranks highest and is kept
        assert mask[0, 4]
        assert (_groups(mask).sum(-1) == 2).all()
    out, _ = ops.relu2_sparsify24(y1)
    assert out[0, 4] == float("inf")


def _inclusion_probability(x):
    """Independent float64 formula: P(element kept) under MVUE sampling of 2 of 4 (per group)."""
    a = x.double().reshape(-1, 4) + 1e-20
    s = a.sum(-1, keepdim=True)
    terms = (a / s)[:, None, :] * a[:, :, None] / (s - a)[:, None, :]  # [g, i, j] = (a_j/S) a_i/(S - a_j)
    p = a / s + terms.sum(-1) - torch.diagonal(terms, dim1=1, dim2=2)
    exact = (x.reshape(-1, 4) != 0).sum(-1, keepdim=True) <= 2
    return torch.where(exact, (x.reshape(-1, 4) != 0).double(), p).reshape(x.shape)


def test_mvue_unbiased(device):
    torch.manual_seed(1)
    base = torch.randn(8, 16, device=device)
    base[:, 3::4] = base[:, 3::4].abs() + 0.1  # most groups get >= 3 non-zeros
    base[:, 1::4] = base[:, 1::4].abs() + 0.1
    n = 2000
    y1 = base.repeat(n, 1)  # each copy gets its own draws (counters differ by row)
    out, mask = ops.relu2_sparsify24(y1, "mvue", seed=3)
    target = (torch.relu(base) ** 2).double()
    p = _inclusion_probability(target)
    kept_freq = ((out != 0) | (target.repeat(n, 1) == 0)).double().view(n, 8, 16).mean(0)
    kept_freq = torch.where(target == 0, torch.zeros_like(kept_freq), kept_freq)
    assert ((kept_freq - p).abs() <= 6 * (p * (1 - p) / n).sqrt() + 1e-3).all()
    mean = out.double().view(n, 8, 16).mean(0)
    se = target * ((1 - p).clamp(min=0) / p.clamp(min=1e-12)).sqrt() / n**0.5
    assert ((mean - target).abs() <= 6 * se + 1e-4 * target + 1e-6).all()
    assert (mask != (out != 0)).any() or (p < 1).any()
    assert ((p > 0) & (p < 1)).any()  # really stochastic


def test_mvue_exact_for_at_most_two_nonzeros(device):
    y1 = torch.tensor([[-1.0, 2.0, -3.0, 0.5, 0.0, 0.0, 0.0, 4.0, -1.0, -2.0, -3.0, -4.0]], device=device)
    for seed in range(5):
        out, _ = ops.relu2_sparsify24(y1, "mvue", seed=seed)
        assert torch.equal(out, torch.relu(y1) ** 2)


def test_mvue_reproducible_from_seed(device):
    y1 = torch.rand(64, 64, device=device) + 0.1
    a, ma = ops.relu2_sparsify24(y1, "mvue", seed=7)
    b, mb = ops.relu2_sparsify24(y1, "mvue", seed=7)
    c, mc = ops.relu2_sparsify24(y1, "mvue", seed=8)
    assert torch.equal(a, b) and torch.equal(ma, mb)
    assert not torch.equal(ma, mc)


def test_soft_threshold_values_and_frozen_scale(device):
    y1 = torch.tensor([[3.0, 1.0, 2.0, 0.5]], device=device)  # squares 9, 1, 4, 0.25
    out, mask = ops.relu2_sparsify24(y1, "soft_threshold")
    assert mask.int().tolist() == [[1, 0, 1, 0]]
    assert out.tolist() == [[8.0, 0.0, 3.0, 0.0]]  # shrunk by the largest dropped value, 1
    out2, _ = ops.relu2_sparsify24(y1, "soft_threshold", scale=torch.tensor(0.5, device=device))
    assert out2.tolist() == [[4.0, 0.0, 1.5, 0.0]]


def test_soft_threshold_continuous(device):
    # Crossing the 2nd/3rd order: naive jumps, soft threshold moves by O(eps).
    def at(eps):
        return torch.tensor([[3.0, 2.0, 2.0 + eps, 0.0]], device=device)
    for eps in (1e-3, 1e-4):
        lo, _ = ops.relu2_sparsify24(at(-eps), "soft_threshold")
        hi, _ = ops.relu2_sparsify24(at(eps), "soft_threshold")
        assert float((hi - lo).abs().max()) < 10 * eps
        nlo, _ = ops.relu2_sparsify24(at(-eps), "naive")
        nhi, _ = ops.relu2_sparsify24(at(eps), "naive")
        assert float((nhi - nlo).abs().max()) > 3.0


def test_soft_threshold_scale_formula(device):
    y1 = torch.randn(32, 64, device=device)
    beta = ops.soft_threshold_scale(y1)
    x = torch.relu(y1) ** 2
    s, _ = ops.relu2_sparsify24(y1, "soft_threshold")
    torch.testing.assert_close(beta, (x * s).sum() / (s * s).sum())
    assert beta.dim() == 0 and beta.dtype == torch.float32 and float(beta) >= 1.0


# --- sparsify24_featurewise ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_featurewise_pattern_and_dense_choice(dtype, device):
    t, f = 64, 80
    g = torch.randn(t, f, device=device)
    keep_rows = torch.rand(t, f, device=device) < torch.linspace(0.05, 0.9, f, device=device)
    g = torch.where(keep_rows, g, 0.0).to(dtype)  # feature f has ~ (0.05 .. 0.9) * t non-zeros
    out, dense_idx = ops.sparsify24_featurewise(g, dense_fraction=0.05)
    assert dense_idx.numel() == 8  # ceil(0.05 * 80) = 4, rounded up to 8
    assert torch.equal(dense_idx, dense_idx.sort().values)
    nnz = (g != 0).sum(0)
    others = torch.ones(f, dtype=torch.bool, device=device)
    others[dense_idx] = False
    assert nnz[dense_idx].min() >= nnz[others].max()  # the least sparse features are dense
    assert torch.equal(out[:, dense_idx], g[:, dense_idx])
    sparse_cols = out[:, others]
    assert (sparse_cols.reshape(t // 4, 4, -1).ne(0).sum(1) <= 2).all()  # 2:4 along tokens
    # kept = top-2 |g| of each 4 tokens
    a = g[:, others].float().abs().reshape(t // 4, 4, -1)
    kept = sparse_cols.reshape(t // 4, 4, -1) != 0
    assert (torch.where(kept, a, math.inf).amin(1) >= torch.where(kept, -math.inf, a).amax(1)).all()


def test_featurewise_given_idx_and_tie_break(device):
    g = torch.tensor([[1.0, -2.0], [-1.0, 2.0], [1.0, 2.0], [1.0, 0.0]], device=device)
    out, idx = ops.sparsify24_featurewise(g, dense_idx=torch.tensor([1]))
    assert idx.tolist() == [1]
    assert out[:, 0].tolist() == [1.0, -1.0, 0.0, 0.0]  # |ties| -> lower token index
    assert torch.equal(out[:, 1], g[:, 1])


def test_featurewise_dense_count_rounding():
    assert reference.num_dense_features(16384, 0.05) == 824  # ceil(819.2)=820 -> 824
    assert reference.num_dense_features(64, 0.0) == 0
    assert reference.num_dense_features(12, 1.0) == 12
    assert reference.num_dense_features(64, 0.25) == 16


# --- token_permutation -----------------------------------------------------------------------------


def test_dense_feature_split_most_nonzeros_ties_to_lower_index(device):
    counts = torch.tensor([5, 7, 7, 1, 5, 9, 0, 5], dtype=torch.int32, device=device)
    idx, pos = ops.dense_feature_split(counts, 3)
    assert idx.tolist() == [5, 1, 2]  # by decreasing count, ties to the lower index
    idx, pos = ops.dense_feature_split(counts, 4)  # a tie of three 5s: the lowest index wins
    assert idx.tolist() == [5, 1, 2, 0] and pos.tolist() == [3, 1, 2, -1, -1, 0, -1, -1]
    assert torch.equal(idx.sort().values, reference.select_dense_features(counts, 4))
    assert ops.dense_feature_split(counts, 0)[0].numel() == 0


def test_token_permutation(device):
    perm, inv = ops.token_permutation(1000, seed=5, device=device)
    assert perm.device.type == device.type and perm.dtype == torch.int64
    assert torch.equal(perm.sort().values, torch.arange(1000, device=device))
    x = torch.randn(1000, 3, device=device)
    assert torch.equal(x[perm][inv], x)
    perm2, _ = ops.token_permutation(1000, seed=5, device=device)
    perm3, _ = ops.token_permutation(1000, seed=6, device=device)
    assert torch.equal(perm, perm2) and not torch.equal(perm, perm3)
    assert torch.equal(perm.cpu(), ops.token_permutation(1000, seed=5)[0])  # device independent
    assert (perm != torch.arange(1000, device=device)).float().mean() > 0.9


# --- bad input -------------------------------------------------------------------------------------


def test_bad_input_errors():
    with pytest.raises(ValueError, match="multiple of 4"):
        ops.relu2_sparsify24(torch.randn(4, 6))
    with pytest.raises(ValueError, match="cast it"):
        ops.relu2_sparsify24(torch.ones(4, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="seed="):
        ops.relu2_sparsify24(torch.randn(4, 8), "mvue")
    with pytest.raises(ValueError, match="method"):
        ops.relu2_sparsify24(torch.randn(4, 8), "top2")
    with pytest.raises(ValueError, match="soft_threshold"):
        ops.relu2_sparsify24(torch.randn(4, 8), "naive", scale=2.0)
    with pytest.raises(ValueError, match="multiple of 4"):
        ops.sparsify24_featurewise(torch.randn(6, 8))
    with pytest.raises(ValueError, match="2-D"):
        ops.sparsify24_featurewise(torch.randn(4, 8, 2))
    with pytest.raises(ValueError, match="cast it"):
        ops.sparsify24_featurewise(torch.ones(4, 8, dtype=torch.float64))


def test_write_dense_columns_checks_its_arguments():
    dst = torch.zeros(8, 12)
    pos = torch.full((12,), -1, dtype=torch.int32)
    pos[5] = 0
    with pytest.raises(ValueError, match="do not fit"):
        ops.write_dense_columns_(dst, pos, torch.ones(8, 1))  # rows must be [n_dense, 8]
    with pytest.raises(ValueError, match="do not fit"):
        ops.write_dense_columns_(dst, pos[:8], torch.ones(1, 8))
    out = ops.write_dense_columns_(dst, pos, torch.ones(1, 8))
    assert torch.equal(out[:, 5], torch.ones(8)) and out.sum() == 8


def test_cuda_tensors_without_triton_raise_instead_of_using_the_slow_path(monkeypatch):
    from types import SimpleNamespace

    from megatron_sparse24 import kernels

    monkeypatch.setattr(kernels, "HAVE_TRITON", False)
    monkeypatch.setattr(kernels, "TRITON_IMPORT_ERROR", "ImportError: libcuda.so.1: cannot open shared object")
    with pytest.raises(RuntimeError, match="Triton kernels cannot be imported .*libcuda.so.1.*install the Triton"):
        kernels.use_triton(SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0)))
    assert kernels.use_triton(torch.zeros(1)) is False  # CPU: the reference twins, as documented
