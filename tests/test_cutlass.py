"""The CUTLASS sm90 backend: build cache and availability (CPU), products and the FFN (H200).

GPU tests need a built library: `python -m megatron_sparse24.cutlass.build` or
MEGATRON_SPARSE24_CUTLASS_LIB pointing at a prebuilt libsp24_cutlass.so.
"""

import dataclasses

import pytest
import torch

from megatron_sparse24 import Sparse24Config, backends, ops, sparse24_ffn
from megatron_sparse24.cutlass import build, library
from megatron_sparse24.kernels import layout, reference
from tests.conftest import cuda_ffn_leaves, requires_gpu


def test_kernel_names_round_trip():
    for spec in build.default_kernels():
        assert build.KernelSpec.from_name(spec.name) == spec
        assert f"SP24_META_K {build.META_K}" in spec.source()
    assert build.META_K == layout.CUTLASS_META_K
    # every orientation the FFN uses has kernels: F2 (K-major B), B2/B4 (N-major B), B3 (D transposed),
    # in both 16-bit dtypes
    for dtype in ("bf16", "fp16"):
        orientations = {(k.b_kmajor, k.d_rowmajor) for k in build.default_kernels() if k.dtype == dtype}
        assert orientations == {(True, True), (False, True), (False, False)}
    assert "SP24_DEFINE_COMPRESSOR(sp24_compress_bf16, cutlass::bfloat16_t)" in build.compressor_source("bf16")


def test_sched_options_decode():
    assert library.sched_name(library.SCHED_DEFAULT) == "swizzle 1, raster heuristic"
    names = {library.sched_name(s) for s in library.SCHED_OPTIONS}
    assert len(names) == len(library.SCHED_OPTIONS) == 8
    assert "swizzle 8, raster along N" in names and "swizzle 2, raster along M" in names


def test_build_reuses_the_cache(tmp_path, monkeypatch):
    """A second build with the same sources and compiler returns the cached library without nvcc."""
    monkeypatch.setenv("MEGATRON_SPARSE24_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "nvcc", lambda: "nvcc-test")
    monkeypatch.setattr(build, "_nvcc_version", lambda compiler: "release 13.0")
    monkeypatch.setattr(build, "cutlass_include", lambda: tmp_path / "include")
    kernels = build.default_kernels()[:2]
    key = build.library_key(kernels, "nvcc-test")
    assert key == build.library_key(kernels, "nvcc-test")
    assert key != build.library_key(kernels[:1], "nvcc-test")
    lib = build.cache_dir() / key / build.LIB_NAME
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"cached")

    def no_compile(*args, **kwargs):
        raise AssertionError("a cached library must not be recompiled")

    monkeypatch.setattr(build, "_compile", no_compile)
    assert build.build(kernels) == lib


FAKE_NVCC = """#!/usr/bin/env bash
# nvcc stand-in: logs each call, takes a while to compile, writes its -o file
out=""; prev=""
for a in "$@"; do [ "$prev" = "-o" ] && out=$a; prev=$a; done
case "$1" in
  --version) echo "release 13.0";;
  -shared) echo link >> "$FAKE_NVCC_LOG"; echo lib > "$out";;
  *) echo compile >> "$FAKE_NVCC_LOG"; sleep 1; echo obj > "$out";;
esac
"""


def _build_into(workdir):
    return str(build.build(build.default_kernels()[:1], out=workdir, f1_kernels=[]))


def test_concurrent_builds_take_turns(tmp_path, monkeypatch):
    """Ranks building the same library at once (first use on a node): one compiles and links, the
    others wait for its library; no process reads another's half-written file."""
    import concurrent.futures
    import multiprocessing
    import stat

    fake = tmp_path / "nvcc"
    fake.write_text(FAKE_NVCC)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("NVCC", str(fake))
    monkeypatch.setenv("FAKE_NVCC_LOG", str(tmp_path / "calls.log"))
    monkeypatch.setenv("CUTLASS_INCLUDE", str(tmp_path / "include"))
    workdir = tmp_path / "build"
    with concurrent.futures.ProcessPoolExecutor(3, mp_context=multiprocessing.get_context("spawn")) as pool:
        paths = list(pool.map(_build_into, [workdir] * 3))
    assert paths == [str(workdir / build.LIB_NAME)] * 3
    calls = (tmp_path / "calls.log").read_text().split()
    assert calls.count("link") == 1 and calls.count("compile") == 2  # one kernel + its compressor, once each
    assert (workdir / build.LIB_NAME).read_text() == "lib\n"
    assert not list(workdir.glob("*.tmp"))


def test_unavailable_on_cpu_without_error():
    reason = library.unavailable_reason(torch.device("cpu"), torch.bfloat16)
    assert "CUDA" in reason


def test_cutlass_layout_round_trips_on_cpu():
    x = torch.randn(192, 384)
    keep = reference.top2_keep(x.reshape(192, -1, 4)).reshape(192, 384)
    dense = torch.where(keep, x, 0.0)
    packed = layout.compress24(dense, keep, "cutlass")
    assert packed.layout == "cutlass"
    assert torch.equal(layout.decompress24(packed), dense)
    assert torch.equal(backends.EmulatedGemm().spmm(packed, torch.eye(384)), dense)
    with pytest.raises(ValueError, match="'cutlass' layout"):
        backends.dispatch._check_layout(backends.CutlassGemm.__new__(backends.CutlassGemm),
                               layout.compress24(dense, keep))


def _cutlass_or_skip():
    reason = library.unavailable_reason(torch.device("cuda"), torch.bfloat16)
    if reason:
        pytest.skip(reason)
    return backends.shared_cutlass(torch.cuda.current_device())


def _packed(rows, cols, lay, dtype=torch.bfloat16):
    x = torch.randn(rows, cols, device="cuda")
    keep = reference.top2_keep(x.reshape(rows, cols // 4, 4)).reshape(rows, cols)
    dense = torch.where(keep, x, 0.0).to(dtype)
    return layout.compress24(dense, keep, lay), dense


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,n", [(128, 128, 64), (256, 1024, 192), (1024, 512, 320), (192, 192, 64),
                                   (4096, 4096, 1024)])
@pytest.mark.parametrize("orientation", ["F2", "B2", "B3"])
def test_cutlass_matches_emulated(m, k, n, orientation, dtype):
    gemm = _cutlass_or_skip()
    a, dense = _packed(m, k, "cutlass", dtype)
    transpose_result = orientation == "B3"
    b = torch.randn(n, k, device="cuda").to(dtype).t() if orientation == "F2" else \
        torch.randn(k, n, device="cuda").to(dtype)
    ref = dense.float() @ b.float()
    ref = ref.t() if transpose_result else ref
    key = (m, k, n, orientation == "F2", transpose_result, dtype, 0)
    choices = [gemm._prepare(key, c, m, n, k, b.device)
               for c in gemm.candidates(key, a, b, orientation == "F2", transpose_result)]
    flags = {(c.b_copy, c.out_transpose) for c in choices}
    # B3's transposed D exists only for N-major B: its B copy comes with a D transpose
    assert flags == ({(False, False), (False, True), (True, True)} if transpose_result
                     else {(False, False), (True, False)})
    assert {gemm.library.kernels[c.alg_id].spec.dtype for c in choices} == {library._DTYPES[dtype]}
    # every configuration, with and without the B copy / D transpose, and every tile-scheduler
    # option of the first one
    sched = [gemm._prepare(key, dataclasses.replace(choices[0], sched=s), m, n, k, b.device)
             for s in library.SCHED_OPTIONS]
    for choice in choices + sched:
        out = gemm._run(choice, key, a, b, transpose_result)
        assert out.shape == ref.shape and out.is_contiguous()
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2 * k**0.5 / 8)
    out = gemm.spmm(a, b, transpose_result)  # through the dispatcher
    assert out.shape == ref.shape and out.is_contiguous()
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2 * k**0.5 / 8)


@pytest.mark.gpu
@requires_gpu
def test_cutlass_ffn_matches_emulated():
    _cutlass_or_skip()
    torch.manual_seed(0)
    t, d, f = 512, 256, 1024
    x, w1, w2, gy = cuda_ffn_leaves(t, d, f)
    outs = {}
    for name in ("cutlass", "emulated"):
        cfg = Sparse24Config(dense_warmup_steps=0, backend=name)
        for p in (x, w1, w2):
            p.grad = None
        y = sparse24_ffn(x, w1, w2, config=cfg, step=0, seed=3)
        y.backward(gy)
        outs[name] = [v.float() for v in (y, x.grad, w1.grad, w2.grad)]
    for a, b in zip(outs["cutlass"], outs["emulated"]):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2 * b.abs().max().item())


def _two_of_four_positive(m, k, dtype):
    """y1 [m, k] with exactly two distinct positive values per group of 4 (a unique 2:4 choice)."""
    vals = torch.tensor([-1.0, -2.0, 0.0, 0.0], device="cuda").repeat(m, k // 4, 1)
    vals[..., 2:] = 1 + torch.rand(m, k // 4, 2, device="cuda")
    vals[..., 3] += 2  # distinct
    order = torch.rand(m, k // 4, 4, device="cuda").argsort(-1)
    return vals.gather(-1, order).reshape(m, k).to(dtype)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k", [(128, 128), (192, 384), (256, 1024)])
def test_packers_match_cutlass_compressor(m, k, dtype):
    """Our Triton packer's values and metadata are byte-identical to CUTLASS's own compressor's on
    an operand with a unique 2:4 choice; and our decoder reads what CUTLASS's compressor writes for
    groups with fewer non-zeros (where the two named columns are a free choice)."""
    gemm = _cutlass_or_skip()
    s2, _, _ = ops.pack_relu2_sparse24(_two_of_four_positive(m, k, dtype), "naive", None, 0, layout="cutlass")
    dense = layout.decompress24(s2)
    assert bool(((dense != 0).reshape(m, -1, 4).sum(-1) == 2).all())
    for source in (dense, torch.where(torch.rand(m, k, device="cuda") < 0.5, dense, 0).to(dtype)):
        # generous scratch space: CUTLASS's padding must not run past our buffer sizes either
        values = torch.full((m * k,), -7, dtype=dtype, device="cuda")
        meta = torch.full((s2.meta.numel() * 2,), -7, dtype=torch.int16, device="cuda")
        gemm.library.compress(source.contiguous(), values, meta, gemm.sm_count)
        assert bool((values[m * k // 2:] == -7).all()) and bool((meta[s2.meta.numel():] == -7).all())
        theirs = layout.Packed24(torch.cat([values[: m * k // 2], meta[: s2.meta.numel()].view(dtype)]), m, k, "cutlass")
        assert torch.equal(layout.decompress24(theirs), source)
        if source is dense:
            assert torch.equal(theirs.values, s2.values) and torch.equal(theirs.meta, s2.meta)
