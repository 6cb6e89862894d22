"""F1 with the forward packer in its epilogue (``cutlass/csrc/f1_pack_gemm.cuh``): every compiled
configuration against the plain-PyTorch packer on the Y1 the kernel itself computed (H200), and the
names and sources of the configurations (CPU)."""

import pytest
import torch
import torch.nn.functional as F

from megatron_sparse24.cutlass import build, library
from megatron_sparse24.kernels import layout, reference
from tests.conftest import cuda_ffn_leaves, requires_gpu


def test_f1_pack_names_round_trip():
    specs = build.default_f1_pack_kernels()
    assert {s.layout for s in specs} == set(layout.LAYOUTS)
    for spec in specs:
        assert build.F1PackSpec.from_name(spec.name) == spec
        assert f"SP24_DEFINE_F1_PACK({spec.name}, " in spec.source()
        assert f", {layout.LAYOUTS.index(spec.layout)}, " in spec.source()
        tm, tn, _ = spec.tile
        assert tm * tn // 128 <= 128, "a warp group's accumulators must leave registers for the epilogue"


def test_library_key_covers_the_f1_kernels(monkeypatch, tmp_path):
    monkeypatch.setattr(build, "_nvcc_version", lambda compiler: "nvcc test")
    monkeypatch.setattr(build, "cutlass_include", lambda: tmp_path / "include")
    kernels = build.default_kernels()
    f1 = build.default_f1_pack_kernels()
    assert build.library_key(kernels, "nvcc", f1) == build.library_key(kernels, "nvcc")
    assert build.library_key(kernels, "nvcc", f1[:1]) != build.library_key(kernels, "nvcc", f1)
    # every header under csrc counts (the packing epilogues include more than their own file)
    import shutil

    csrc = tmp_path / "csrc"
    shutil.copytree(build.CSRC, csrc)
    monkeypatch.setattr(build, "CSRC", csrc)
    before = build.library_key(kernels, "nvcc", f1)
    (csrc / "pack.cuh").write_text((csrc / "pack.cuh").read_text() + "\n// changed\n")
    assert build.library_key(kernels, "nvcc", f1) != before


def _library_or_skip():
    """The CUTLASS library (built on first use); skips on GPUs other than sm90, which its kernels need."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the library's kernels are sm90a-only")
    return library.load(build=True)


def _inputs(m, n, k, dtype, bias, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    w1 = (torch.randn(n, k, device="cuda", generator=g) / k**0.5).to(dtype)
    b1 = (torch.randn(n, device="cuda", generator=g) - 1.0).to(dtype) if bias else None  # ~20 % positive
    return x, w1, b1


def _run(lib, kernel, x, w1, b1, with_y1):
    m, n = x.shape[0], w1.shape[0]
    s2 = layout.Packed24.empty(m, n, x.dtype, x.device, kernel.spec.layout)
    s2.buffer.fill_(0)
    counts = torch.zeros(n + 1, dtype=torch.int32, device=x.device)
    y1 = torch.full((m, n), float("nan"), dtype=x.dtype, device=x.device) if with_y1 else None
    sm = torch.cuda.get_device_properties(x.device).multi_processor_count
    ws_bytes = kernel.workspace(m, n, x.shape[1], sm, 0)
    ws = torch.empty(ws_bytes, dtype=torch.uint8, device=x.device) if ws_bytes else None
    lib.f1_pack(kernel, x, w1, b1, s2.values, s2.meta, counts, sm, ws, y1)
    return s2, counts, y1


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(256, 512, 256), (1024, 768, 512)])
def test_f1_pack_matches_the_reference_packer(shape, bias):
    lib = _library_or_skip()
    assert lib.f1_kernels, "the library has no F1+pack kernels"
    m, n, k = shape
    for kernel in lib.f1_kernels:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[kernel.spec.dtype]
        tm, tn, _ = kernel.spec.tile
        if m % tm or n % tn:
            continue
        x, w1, b1 = _inputs(m, n, k, dtype, bias, seed=m + n)
        s2, counts, y1 = _run(lib, kernel, x, w1, b1, with_y1=True)
        torch.cuda.synchronize()
        # Y1 is the GEMM (every element written, fp32 accumulation)
        torch.testing.assert_close(y1.float(), F.linear(x, w1, b1).float(), rtol=2e-2, atol=2e-2)
        # the packed outputs are the reference packer's on that Y1, bit for bit
        ref, d_vals, ref_counts = reference.pack_forward(y1, "naive", layout=kernel.spec.layout)
        assert d_vals is None or dtype == torch.float16
        assert torch.equal(s2.values.view(torch.int16), ref.values.view(torch.int16)), kernel.spec.name
        assert torch.equal(s2.meta, ref.meta), kernel.spec.name
        assert torch.equal(counts, ref_counts), kernel.spec.name
        assert 0 < ref_counts[:-1].sum() < m * n // 2  # neither all kept nor all zero: the test can fail
        # without Y1 (the training path) the same outputs
        s2b, counts_b, _ = _run(lib, kernel, x, w1, b1, with_y1=False)
        assert torch.equal(s2b.buffer.view(torch.int16), s2.buffer.view(torch.int16)), kernel.spec.name
        assert torch.equal(counts_b, counts), kernel.spec.name


_CANARY = 4096  # elements after an output that the kernels must leave alone


def _fenced(numel, dtype, dev):
    """A NaN-filled tensor of numel elements followed by a canary region (check with _intact)."""
    return torch.full((numel + _CANARY,), float("nan"), dtype=dtype, device=dev)[:numel]


def _intact(t):
    whole = torch.empty(0, dtype=t.dtype, device=t.device).set_(t.untyped_storage(), 0, (t.numel() + _CANARY,))
    return bool(torch.isnan(whole[t.numel():].float()).all())


def test_canary_detects_a_write_past_the_end():
    a = _fenced(10, torch.bfloat16, "cpu")
    a.fill_(1.0)
    assert _intact(a)
    torch.empty(0, dtype=a.dtype).set_(a.untyped_storage(), 0, (10 + _CANARY,))[12] = 3.0
    assert not _intact(a)


@pytest.mark.gpu
@requires_gpu
def test_every_scheduler_option_stays_inside_the_outputs():
    """The persistent scheduler rounds the tile grid up to whole swizzle x cluster blocks and hands out
    the tiles past the problem too (at 8 x 8 tiles, swizzle 8 and a 2-CTA cluster, most of them): every
    configuration under every option writes the default option's outputs and nothing past them."""
    lib = _library_or_skip()
    t, d, f = 1024, 256, 1024
    x, w1, b1 = _inputs(t, f, d, torch.bfloat16, bias=True, seed=12)
    sm = torch.cuda.get_device_properties(x.device).multi_processor_count
    for kernel in lib.f1_kernels:
        outs = []
        for sched in (0,) + library.SCHED_OPTIONS:
            s2 = layout.Packed24(_fenced(layout.packed_numel(t, f, x.dtype, kernel.spec.layout), x.dtype, x.device),
                                 t, f, kernel.spec.layout)
            counts = torch.zeros(f + 1, dtype=torch.int32, device=x.device)
            n = kernel.workspace(t, f, d, sm, sched)
            ws = torch.empty(n, dtype=torch.uint8, device=x.device) if n else None
            lib.f1_pack(kernel, x, w1, b1, s2.values, s2.meta, counts, sm, ws, sched=sched)
            assert _intact(s2.buffer), f"{kernel.spec.name} sched {sched} wrote past its output"
            outs.append((s2.buffer.view(torch.int16), counts))
        for buf, counts in outs[1:]:
            assert torch.equal(buf, outs[0][0]) and torch.equal(counts, outs[0][1]), kernel.spec.name


@pytest.mark.gpu
@requires_gpu
def test_f1_pack_ties_and_nan_follow_the_reference():
    """Equal values keep the lower columns; a NaN counts as the largest value and is kept as NaN."""
    lib = _library_or_skip()
    m, n, k = 256, 256, 64
    x = torch.zeros(m, k, dtype=torch.bfloat16, device="cuda")
    x[:, 0] = 1.0
    w1 = torch.zeros(n, k, dtype=torch.bfloat16, device="cuda")
    w1[:, 0] = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0, 0.0, 2.0, 2.0], dtype=torch.bfloat16).repeat(n // 8)
    w1[8:16, 0] = float("nan")  # a NaN in every column of groups 2 and 3
    for kernel in lib.f1_candidates(torch.bfloat16, "cusparselt") + lib.f1_candidates(torch.bfloat16, "cutlass"):
        s2, counts, y1 = _run(lib, kernel, x, w1, None, with_y1=True)
        ref, _, ref_counts = reference.pack_forward(y1, "naive", layout=kernel.spec.layout)
        assert torch.equal(s2.values.view(torch.int16), ref.values.view(torch.int16)), kernel.spec.name
        assert torch.equal(s2.meta, ref.meta) and torch.equal(counts, ref_counts), kernel.spec.name
        # group 0 (1, 1, 1, 1): columns 0 and 1; group 1 (4, 0, 4, 4): columns 0 and 2
        dense = layout.decompress24(s2)
        assert dense[0, :8].tolist() == [1.0, 1.0, 0.0, 0.0, 4.0, 0.0, 4.0, 0.0]
        assert torch.isnan(dense[0, 8:10]).all()


def test_fused_f1_flag_and_plan_on_cpu():
    """The flag maps to the config; off a GPU (and with fused_f1=False) the plan has no F1 packer."""
    import argparse

    from megatron_sparse24 import Sparse24Config
    from megatron_sparse24.arguments import add_sparse24_args, sparse24_config_from_args
    from megatron_sparse24.functional import make_plan

    parser = argparse.ArgumentParser()
    add_sparse24_args(parser)
    parser.add_argument("--seed", type=int, default=1)
    assert sparse24_config_from_args(parser.parse_args([])).fused_f1 is True
    assert sparse24_config_from_args(parser.parse_args(["--no-sparse24-fused-f1"])).fused_f1 is False
    with pytest.raises(ValueError, match="fused_f1"):
        Sparse24Config(fused_f1="yes")
    plan = make_plan(Sparse24Config(), (64, 128, 32), torch.device("cpu"), torch.bfloat16, step=0, seed=0)
    assert plan.f1 is None  # emulated GEMMs on CPU: F1, then the packer


def _packer_or_skip():
    from megatron_sparse24.backends.f1_pack import shared_f1_packer

    _library_or_skip()
    packer = shared_f1_packer(torch.cuda.current_device())
    assert packer is not None, "the CUTLASS library has F1 kernels but no F1 packer was made"
    return packer


@pytest.mark.gpu
@requires_gpu
def test_f1_packer_tunes_and_both_ways_agree():
    """The tuner times the fused kernels and the two passes and keeps a valid choice; forced either way
    the packer returns the same selections as the two passes on this input (the two GEMMs accumulate in
    different orders, so a near-tie could differ: none does here), and the fused kernel really ran."""
    from megatron_sparse24.backends.dispatch import GemmChoice
    from megatron_sparse24.backends.f1_pack import unfused_f1_pack

    packer = _packer_or_skip()
    t, d, f = 1024, 512, 1024
    x, w1, b1 = _inputs(t, f, d, torch.bfloat16, bias=True, seed=5)
    s2, d_vals, counts = packer.pack(x, w1, b1, "cusparselt")
    key = (t, d, f, torch.bfloat16, "cusparselt", True, x.device.index)
    choice = packer.choices[key]
    assert choice.dense_ms > 0 and choice.sparse_ms > 0
    ref, _, ref_counts = unfused_f1_pack(x, w1, b1, "cusparselt")
    first = packer.library.f1_kernels.index(packer._kernels(t, f, x.dtype, "cusparselt")[0])
    for forced in (GemmChoice("sparse", first), GemmChoice("dense")):
        packer.choices[key] = forced
        calls = []
        run = packer.library.f1_pack
        packer.library.f1_pack = lambda *a, **k: (calls.append(1), run(*a, **k))[1]
        try:
            s2, d_vals, counts = packer.pack(x, w1, b1, "cusparselt")
        finally:
            packer.library.f1_pack = run
        assert bool(calls) == (forced.kind == "sparse")
        assert d_vals is None
        assert torch.equal(s2.meta, ref.meta) and torch.equal(counts, ref_counts)
        torch.testing.assert_close(s2.values.float(), ref.values.float(), rtol=1e-2, atol=1e-2)
    packer.choices[key] = choice


@pytest.mark.gpu
@requires_gpu
def test_ffn_with_the_fused_f1_matches_two_passes():
    """sparse24_ffn fwd + bwd with F1 fused (forced) against fused_f1=False, same seed."""
    from megatron_sparse24 import Sparse24Config, sparse24_ffn
    from megatron_sparse24.backends.dispatch import GemmChoice

    packer = _packer_or_skip()
    torch.manual_seed(0)
    t, d, f = 1024, 256, 1024
    x, w1, w2, gy = cuda_ffn_leaves(t, d, f)
    key = (t, d, f, torch.bfloat16, "cusparselt", False, x.device.index)
    kernel = packer._kernels(t, f, x.dtype, "cusparselt")[0]
    packer.choices[key] = GemmChoice("sparse", packer.library.f1_kernels.index(kernel))
    outs = {}
    calls = []
    run = packer.library.f1_pack
    packer.library.f1_pack = lambda *a, **k: (calls.append(1), run(*a, **k))[1]
    try:
        for fused in (True, False):
            calls.clear()
            cfg = Sparse24Config(dense_warmup_steps=0, backend="cusparselt", fused_f1=fused)
            for p in (x, w1, w2):
                p.grad = None
            y = sparse24_ffn(x, w1, w2, config=cfg, step=0, seed=3)
            y.backward(gy)
            outs[fused] = [v.float() for v in (y, x.grad, w1.grad, w2.grad)]
            assert bool(calls) == fused
    finally:
        packer.library.f1_pack = run
        del packer.choices[key]
    for a, b in zip(outs[True], outs[False]):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2 * b.abs().max().item())


@pytest.mark.gpu
@requires_gpu
def test_fused_f1_replays_from_a_cuda_graph():
    """The fused kernel is captured into a CUDA graph (as bench_ffn and graphed training steps do) and
    its replay gives the eager result; an untuned shape inside a capture runs the two passes."""
    from megatron_sparse24.backends.dispatch import GemmChoice

    packer = _packer_or_skip()
    t, d, f = 512, 256, 512
    x, w1, b1 = _inputs(t, f, d, torch.bfloat16, bias=False, seed=9)
    key = (t, d, f, torch.bfloat16, "cusparselt", False, x.device.index)
    kernel = packer._kernels(t, f, x.dtype, "cusparselt")[0]
    packer.choices[key] = GemmChoice("sparse", packer.library.f1_kernels.index(kernel))
    try:
        eager = packer.pack(x, w1, None, "cusparselt")
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            s2, _, counts = packer.pack(x, w1, None, "cusparselt")
        s2.buffer.zero_()
        counts.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(s2.buffer.view(torch.int16), eager[0].buffer.view(torch.int16))
        assert torch.equal(counts, eager[2]) and counts[:-1].sum() > 0
    finally:
        del packer.choices[key]
    untuned = (t, 2 * d, f, torch.bfloat16, "cusparselt", False, x.device.index)
    x2 = torch.randn(t, 2 * d, device="cuda").bfloat16()
    w2 = torch.randn(f, 2 * d, device="cuda").bfloat16()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        packer.pack(x2, w2, None, "cusparselt")
    assert untuned not in packer.choices  # nothing timed inside the capture


def test_f1_packer_runs_two_passes_untimed_where_no_tile_fits(monkeypatch):
    """A shape no compiled tile divides runs the two passes, decided once, without timing or a disk
    entry (a later library may fit it); describe() names it."""
    from types import SimpleNamespace

    from megatron_sparse24.backends import f1_pack

    spec = build.F1PackSpec("bf16", "cusparselt", (128, 128, 64), (2, 1))
    lib = SimpleNamespace(f1_kernels=[SimpleNamespace(spec=spec)],
                          f1_candidates=lambda dtype, lay: [k for k in lib.f1_kernels if k.spec.layout == lay])
    packer = f1_pack.F1Packer.__new__(f1_pack.F1Packer)
    packer.library = lib
    packer._init_tables(0, None)
    stored = []
    packer._remember = lambda key, choice: stored.append(key)
    packer._tune = lambda *a: pytest.fail("timed a shape no kernel can run")
    calls = []
    monkeypatch.setattr(f1_pack.F1Packer, "operands_fit", staticmethod(lambda x, w1, b1: True))
    monkeypatch.setattr(f1_pack, "unfused_f1_pack", lambda *a: calls.append(a) or "two passes")
    x = torch.zeros(192, 64, dtype=torch.bfloat16)  # 192 rows: no multiple of the 128-row tile
    w1 = torch.zeros(256, 64, dtype=torch.bfloat16)
    for _ in range(2):
        assert packer.pack(x, w1, None, "cusparselt") == "two passes"
    assert len(calls) == 2 and not stored
    key = (192, 64, 256, torch.bfloat16, "cusparselt", False, None)
    assert packer.choices[key].kind == "dense"
    assert packer.describe()[(192, 64, 256, "cusparselt")][0] == "two passes"
