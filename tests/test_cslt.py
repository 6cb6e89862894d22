"""cuSPARSELt called directly (megatron_sparse24/cslt.py): the same GEMMs as torch._cslt_sparse_mm."""

import pytest
import torch

from megatron_sparse24 import backends, cslt
from megatron_sparse24.kernels import layout, reference
from tests.conftest import requires_gpu


def test_descriptors_are_torchs():
    """torch's _cslt_sparse_mm: A row-major [m, k]; B row-major [k, n], or a transposed view of a
    row-major [n, k] described as such and transposed by the op; D row-major, or column-major
    (ld m) when the result is returned transposed."""
    d = cslt.descriptor_args(64, 256, 32, b_contiguous=True, transpose_result=False)
    assert d == {"a": (64, 256, 256, cslt.ORDER_ROW), "b": (256, 32, 32, cslt.ORDER_ROW), "op_b": cslt.OP_N,
                 "d": (64, 32, 32, cslt.ORDER_ROW)}
    d = cslt.descriptor_args(64, 256, 32, b_contiguous=False, transpose_result=True)
    assert d["b"] == (32, 256, 256, cslt.ORDER_ROW) and d["op_b"] == cslt.OP_T
    assert d["d"] == (64, 32, 64, cslt.ORDER_COL)


def test_unavailable_reasons_name_the_fix(monkeypatch, tmp_path):
    assert "CUDA tensors" in cslt.unavailable_reason(torch.device("cpu"))
    monkeypatch.setenv("MEGATRON_SPARSE24_CUSPARSELT_LIB", str(tmp_path / "libcusparseLt.so.0"))
    assert cslt.library_path() == str(tmp_path / "libcusparseLt.so.0")
    assert "cannot load" in cslt.unavailable_reason(torch.device("cuda", 0))
    with pytest.raises(RuntimeError, match="direct cuSPARSELt calls cannot run: cannot load"):
        backends.CusparseltGemm(direct=True)


def test_opaque_structures_are_aligned_and_large():
    buf = cslt._Opaque()
    assert buf.ptr.value % 16 == 0 and cslt.OPAQUE_BYTES >= 11024  # the largest size a header has used


def _packed(rows, cols):
    x = torch.randn(rows, cols, device="cuda")
    keep = reference.top2_keep(x.reshape(rows, cols // 4, 4)).reshape(rows, cols)
    return layout.compress24(torch.where(keep, x, 0.0).bfloat16(), keep, "cusparselt")


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("m,k,n", [(256, 1024, 192), (1024, 512, 320)])
@pytest.mark.parametrize("b_contiguous", [True, False])
@pytest.mark.parametrize("transpose_result", [False, True])
def test_direct_calls_equal_torchs(m, k, n, b_contiguous, transpose_result):
    """Same descriptors, same algorithm id: the same kernel, so bit-identical products; and the plan
    of a configuration is built once."""
    if cslt.unavailable_reason(torch.device("cuda")):
        pytest.skip(cslt.unavailable_reason(torch.device("cuda")))
    lib = cslt.CusparseltLibrary(cslt.library_path(), torch.cuda.current_device())
    a = _packed(m, k)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    if not b_contiguous:
        b = b.t().contiguous().t()
    for alg in (0, 1):
        want = torch._cslt_sparse_mm(a.cslt_operand(), b, transpose_result=transpose_result, alg_id=alg)
        got = lib.matmul(a.buffer, b, m, transpose_result, alg)
        assert got.shape == want.shape and torch.equal(got, want)
    plan = lib.plan(m, k, n, b_contiguous, transpose_result, torch.bfloat16, 0)
    lib.matmul(a.buffer, b, m, transpose_result, 0)
    assert lib.plan(m, k, n, b_contiguous, transpose_result, torch.bfloat16, 0) is plan


@pytest.mark.gpu
@requires_gpu
def test_direct_backend_matches_emulated():
    if cslt.unavailable_reason(torch.device("cuda")):
        pytest.skip(cslt.unavailable_reason(torch.device("cuda")))
    gemm = backends.CusparseltGemm(direct=True, device_index=torch.cuda.current_device())
    a = _packed(512, 1024)
    b = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16)
    for tr in (False, True):
        torch.testing.assert_close(gemm.spmm(a, b, tr).float(), backends.EmulatedGemm().spmm(a, b, tr).float(),
                                   rtol=1e-2, atol=1e-2)


def test_fp32_is_refused_before_any_library_call():
    """cuSPARSELt reads fp32 as 1:2 (TF32) sparsity, not our 2:4 format: refused with the fix named."""
    lib = object.__new__(cslt.CusparseltLibrary)  # no library needed: the check comes first
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        lib.plan(64, 64, 64, True, False, torch.float32, 0)


def test_shared_backend_falls_back_to_torchs_call_and_says_why(monkeypatch):
    """Where the library cannot be loaded the shared backend calls torch._cslt_sparse_mm (same
    results, more host time) with a warning naming the reason; MEGATRON_SPARSE24_CUSPARSELT_DIRECT=0
    asks for torch's call and gets it silently."""
    import warnings

    monkeypatch.setattr(cslt, "unavailable_reason", lambda device: "cannot load /x/libcusparseLt.so.0: gone")
    monkeypatch.delenv("MEGATRON_SPARSE24_CUSPARSELT_DIRECT", raising=False)
    with pytest.warns(backends.Sparse24FallbackWarning, match="not called directly: cannot load /x"):
        gemm = backends.shared_cusparselt.__wrapped__(0)
    assert gemm.direct is None
    monkeypatch.setenv("MEGATRON_SPARSE24_CUSPARSELT_DIRECT", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.shared_cusparselt.__wrapped__(0).direct is None


@pytest.mark.gpu
@requires_gpu
def test_shared_backend_calls_the_library_directly():
    if cslt.unavailable_reason(torch.device("cuda")):
        pytest.skip(cslt.unavailable_reason(torch.device("cuda")))
    assert backends.shared_cusparselt(torch.cuda.current_device()).direct is not None
