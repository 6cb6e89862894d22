"""GEMM backends: resolution rules and products with packed operands."""

import pytest
import torch

from megatron_sparse24 import backends
from megatron_sparse24.kernels import layout, reference
from tests.conftest import requires_gpu


def _packed(rows, cols, device, dtype=torch.bfloat16, lay="cusparselt"):
    x = torch.randn(rows, cols, device=device)
    keep = reference.top2_keep(x.reshape(rows, cols // 4, 4)).reshape(rows, cols)
    dense = torch.where(keep, x, 0.0).to(dtype)
    return layout.compress24(dense, keep, lay), dense


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


def test_interleaved_timing_survives_a_clock_drifting_during_the_tuning(monkeypatch):
    # A GPU slowing down as it heats (+6 % per timed call here): timed one after the other, the first
    # of three candidates wins although it is the slowest; interleaved rounds in alternating order
    # must pick the fastest, and call every candidate once per round after a warm-up call.
    calls = []

    def drifting_median_ms(fn, warmup=2, iters=5, setup=None, gpu_busy=False):
        calls.append(fn())
        return fn.base * (1 + 0.06 * len(calls))

    monkeypatch.setattr(backends.timing, "median_cuda_ms", drifting_median_ms)
    fns = []
    for i, base in enumerate([1.04, 1.00, 1.03]):
        fn = (lambda i=i: i)
        fn.base = base
        fns.append(fn)
    one_after_another = [backends.timing.median_cuda_ms(fn) for fn in fns]
    assert min(range(3), key=one_after_another.__getitem__) == 0  # the bias this guards against
    calls.clear()
    ms = backends.interleaved_median_cuda_ms(fns, rounds=6)
    assert min(range(3), key=ms.__getitem__) == 1
    assert ms == pytest.approx([1.04 * 1.57, 1.57, 1.03 * 1.57])  # the drift cancels exactly
    assert calls == [0, 1, 2, 2, 1, 0] * 3  # timed calls only (warm-ups call fn directly)
    with pytest.raises(ValueError, match="even"):
        backends.interleaved_median_cuda_ms(fns, rounds=5)


def test_tma_aligned_copies_only_misaligned_operands():
    flat = torch.randn(1 + 64 * 32, dtype=torch.bfloat16)
    aligned = flat[:0].new_empty(64 * 32).view(64, 32)
    assert backends.tma_aligned(aligned) is aligned
    for view in (flat[1:].view(64, 32), flat[1:].view(32, 64).t()):  # 2-byte offset, both orders
        assert view.data_ptr() % 16 != 0
        out = backends.tma_aligned(view)
        assert out.data_ptr() % 16 == 0 and torch.equal(out, view)
        assert out.is_contiguous() == view.is_contiguous()


# --- the on-disk tuning cache ----------------------------------------------------------------------


def test_tuning_cache_round_trip_sections_and_merging(tmp_path):
    path = tmp_path / "tuning.json"
    a = backends.TuningCache(path, "cutlass | H200 | torch x")
    b = backends.TuningCache(path, "cutlass | H200 | torch x")  # another rank, same file
    other = backends.TuningCache(path, "cusparselt | H200 | torch x")
    assert a.load() == {"gemm": {}, "ffn": {}}
    a.store("gemm", "[1, 2]", {"kind": "dense"})
    b.store("ffn", "[3]", "sparse")  # merges with a's entry instead of overwriting it
    assert a.load() == {"gemm": {"[1, 2]": {"kind": "dense"}}, "ffn": {"[3]": "sparse"}}
    assert other.load() == {"gemm": {}, "ffn": {}}
    assert not list(tmp_path.glob("*.tmp"))  # written through a temporary file, atomically replaced
    path.write_text("{ not json")
    with pytest.warns(UserWarning, match="ignoring the tuning cache"):
        assert a.load() == {"gemm": {}, "ffn": {}}


def test_dispatch_tables_reload_from_disk(tmp_path):
    """What a dispatcher tuned comes back in a new process (a new backend object): GEMM choices and
    FFN engines, keyed for this object's GPU; entries naming kernels a library lacks are dropped."""
    cache = backends.TuningCache(tmp_path / "t.json", "cusparselt | GPU | v")
    first = backends.CusparseltGemm(device_index=1, cache=cache)
    key = (256, 512, 128, True, False, torch.bfloat16, 1)
    choice = backends.GemmChoice("sparse", 3, sparse_ms=0.5, dense_ms=float("nan"))
    first._remember(key, choice)
    first.remember_ffn_engine(((1024, 512, 256), torch.bfloat16, "naive", True, True, True, 1), "dense")
    again = backends.CusparseltGemm(device_index=0, cache=cache)  # same GPU model, device 0 this time
    loaded = again.choices[key[:-1] + (0,)]
    assert (loaded.kind, loaded.alg_id, loaded.sparse_ms) == ("sparse", 3, 0.5)
    assert again.ffn_engines == {((1024, 512, 256), torch.bfloat16, "naive", True, True, True, 0): "dense"}

    class Spec:
        def __init__(self, name):
            self.name = name

    class Lib:
        kernels = [type("K", (), {"spec": Spec(n)})() for n in ("k_a", "k_b")]

    cutlass = object.__new__(backends.CutlassGemm)  # no GPU here: only the disk form is exercised
    cutlass.library = Lib()
    on_disk = cutlass._choice_to_disk(backends.GemmChoice("sparse", 1, sched=2))
    assert on_disk["alg_id"] == "k_b"  # by name: kernel indices change with the library
    back = cutlass._choice_from_disk(on_disk)
    assert (back.kind, back.alg_id, back.sched) == ("sparse", 1, 2)
    assert cutlass._choice_from_disk(dict(on_disk, alg_id="k_gone")) is None
    assert cutlass._choice_from_disk(cutlass._choice_to_disk(backends.GemmChoice("dense"))).kind == "dense"


@pytest.mark.gpu
@requires_gpu
def test_tuning_cache_skips_tuning_in_a_new_process(tmp_path, monkeypatch):
    monkeypatch.setenv(backends.TUNING_CACHE_ENV, str(tmp_path / "tuning.json"))
    a, _ = _packed(256, 512, "cuda")
    b = torch.randn(512, 128, device="cuda", dtype=torch.bfloat16)
    index = torch.cuda.current_device()
    makers = [lambda c: backends.CusparseltGemm(device_index=index, cache=c)]
    from megatron_sparse24.cutlass import library

    if library.unavailable_reason(torch.device("cuda"), torch.bfloat16, build=False) is None:
        makers.append(lambda c: backends.CutlassGemm(library.load(), index, cache=c))
        a_cutlass, _ = _packed(256, 512, "cuda", lay="cutlass")
    for i, make in enumerate(makers):
        name = "cusparselt" if i == 0 else "cutlass"
        operand = a if i == 0 else a_cutlass
        first = make(backends.tuning_cache(name, index))
        out = first.spmm(operand, b)
        second = make(backends.tuning_cache(name, index))
        monkeypatch.setattr(second, "_tune", lambda *args: pytest.fail("tuned again despite the cache"))
        assert second.choices == first.choices
        assert torch.equal(second.spmm(operand, b), out)


def test_describe_backend_says_what_auto_resolved_to():
    cpu = torch.device("cpu")
    assert backends.describe_backend("auto", cpu, torch.float32, (64, 64, 64)).startswith("auto -> emulated")
    assert backends.describe_backend("dense", cpu, torch.float32, (64, 64, 64)).startswith("dense")
    with pytest.raises(ValueError, match="cannot run"):
        backends.describe_backend("cusparselt", cpu, torch.bfloat16, (64, 64, 64))


def test_describe_backend_names_what_auto_times(monkeypatch):
    """On a GPU with both 2:4 backends the log line names both and the dense-GEMM engine."""
    class Named:
        def __init__(self, name):
            self.name = name

    monkeypatch.setattr(backends, "resolve_backend", lambda *args: Named("cutlass"))
    monkeypatch.setattr(backends, "auto_alternatives", lambda *args: (Named("cusparselt"),))
    line = backends.describe_backend("auto", torch.device("cuda", 0), torch.bfloat16, (64, 64, 64))
    assert line.startswith("auto -> cutlass (2:4 GEMMs on sparse tensor cores; per FFN shape, this, "
                           "cusparselt's 2:4 GEMMs or the same model on dense GEMMs")


def test_auto_alternatives_need_cutlass_first_and_cusparselt_runnable():
    class Named:
        def __init__(self, name):
            self.name = name

    cpu = torch.device("cpu")
    assert backends.auto_alternatives(Named("cutlass"), cpu, torch.bfloat16, (64, 64, 64)) == ()  # no CUDA
    assert backends.auto_alternatives(backends.EmulatedGemm(), cpu, torch.bfloat16, (64, 64, 64)) == ()
