"""GEMM backends: resolution rules and products with packed operands."""

import pytest
import torch

from megatron_sparse24 import backends
from megatron_sparse24.kernels import layout, reference
from tests.conftest import requires_gpu


def _packed(rows, cols, device, dtype=torch.bfloat16):
    x = torch.randn(rows, cols, device=device)
    keep = reference.top2_keep(x.reshape(rows, cols // 4, 4)).reshape(rows, cols)
    dense = torch.where(keep, x, 0.0).to(dtype)
    return layout.compress24(dense, keep), dense


def test_cpu_resolution():
    assert backends.resolve_backend("auto", torch.device("cpu"), torch.float32, (64, 64, 64)).name == "emulated"
    assert backends.resolve_backend("emulated", torch.device("cpu"), torch.bfloat16, (4, 4, 4)).name == "emulated"
    with pytest.raises(ValueError, match="CUDA tensors"):
        backends.resolve_backend("cusparselt", torch.device("cpu"), torch.bfloat16, (64, 64, 64))
    with pytest.raises(ValueError, match="backend='cutlass' cannot run: tensors are on cpu"):
        backends.resolve_backend("cutlass", torch.device("cpu"), torch.bfloat16, (64, 64, 64))
    with pytest.raises(ValueError, match="unknown backend"):
        backends.resolve_backend("cutlas", torch.device("cpu"), torch.bfloat16, (64, 64, 64))


def test_shape_problems_are_named():
    assert backends.cusparselt_shape_problem(4096, 8192, 2048) is None
    assert "tokens" in backends.cusparselt_shape_problem(4100, 8192, 2048)
    assert "FFN width" in backends.cusparselt_shape_problem(4096, 8196, 2048)
    assert "hidden" in backends.cusparselt_shape_problem(4096, 8192, 2050)


@pytest.mark.parametrize("transpose_result", [False, True])
def test_emulated_spmm(transpose_result, device):
    a, dense = _packed(72, 200, device, torch.float32)
    b = torch.randn(200, 24, device=device)
    out = backends.EmulatedGemm().spmm(a, b, transpose_result)
    ref = dense @ b
    torch.testing.assert_close(out, ref.t() if transpose_result else ref)
    assert out.is_contiguous()


@pytest.mark.gpu
@requires_gpu
def test_cuda_resolution_and_errors():
    dev = torch.device("cuda")
    from megatron_sparse24.cutlass import library

    expected = "cutlass" if library.unavailable_reason(dev, torch.bfloat16) is None else "cusparselt"
    assert backends.resolve_backend("auto", dev, torch.bfloat16, (256, 256, 256)).name == expected
    with pytest.warns(backends.Sparse24FallbackWarning, match="float32"):
        assert backends.resolve_backend("auto", dev, torch.float32, (256, 256, 256)).name == "emulated"
    with pytest.raises(ValueError, match="multiple of 64"):
        backends.resolve_backend("cusparselt", dev, torch.bfloat16, (100, 256, 256))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("m,k,n", [(64, 64, 64), (256, 1024, 192), (1024, 512, 320)])
@pytest.mark.parametrize("b_layout", ["row", "col"])
@pytest.mark.parametrize("transpose_result", [False, True])
def test_cusparselt_matches_emulated(m, k, n, b_layout, transpose_result):
    a, _ = _packed(m, k, "cuda")
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    if b_layout == "col":
        b = b.t().contiguous().t()
    out = backends.CusparseltGemm().spmm(a, b, transpose_result)
    ref = backends.EmulatedGemm().spmm(a, b, transpose_result)
    assert out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@requires_gpu
def test_dispatcher_tunes_each_shape_once_and_dense_fallback_is_exact_numerics():
    gemm = backends.CusparseltGemm()
    a, dense = _packed(256, 512, "cuda")
    b = torch.randn(512, 128, device="cuda", dtype=torch.bfloat16)
    out = gemm.spmm(a, b)
    assert len(gemm.choices) == 1
    choice = next(iter(gemm.choices.values()))
    assert choice.kind in ("sparse", "dense") and choice.dense_ms > 0 and choice.sparse_ms > 0
    assert torch.equal(gemm.spmm(a, b), out)  # same choice the second time
    assert len(gemm.choices) == 1
    gemm.spmm(a, b, transpose_result=True)
    assert len(gemm.choices) == 2
    ref = dense.float() @ b.float()
    for tr in (False, True):
        forced = gemm._run(backends.GemmChoice("dense"), a, b, tr)
        torch.testing.assert_close(forced.float(), ref.t() if tr else ref, rtol=1e-2, atol=1e-2)
    assert backends.resolve_backend("cusparselt", torch.device("cuda"), torch.bfloat16, (256, 256, 256)) is \
        backends.shared_cusparselt(torch.cuda.current_device())


def test_tma_aligned_copies_only_misaligned_operands():
    flat = torch.randn(1 + 64 * 32, dtype=torch.bfloat16)
    aligned = flat[:0].new_empty(64 * 32).view(64, 32)
    assert backends.tma_aligned(aligned) is aligned
    for view in (flat[1:].view(64, 32), flat[1:].view(32, 64).t()):  # 2-byte offset, both orders
        assert view.data_ptr() % 16 != 0
        out = backends.tma_aligned(view)
        assert out.data_ptr() % 16 == 0 and torch.equal(out, view)
        assert out.is_contiguous() == view.is_contiguous()
