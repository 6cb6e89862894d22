"""benchmarks/bench_pack.py's PackProblem (the pack kernels' inputs and calls, also those of its A/B
mode) and benchmarks.common's loading of another version's kernels: both run on CPU through Triton's
interpreter on a small shape (the timing itself needs a GPU)."""

import shutil
from pathlib import Path

import pytest
import torch

from benchmarks import bench_pack, common
from megatron_sparse24.kernels import layout, reference
from megatron_sparse24.kernels import triton_kernels as tk


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    return bench_pack.PackProblem(64, 128, device="cpu")


def test_pack_problem_inputs_are_the_ffns(problem):
    assert 0.03 < float((problem.y1 > 0).float().mean()) < 0.3  # ~10 % positive: the realistic regime
    assert torch.equal(problem.perm[problem.inv], torch.arange(64))
    s2, d_vals, dense_pos = problem.operands("cutlass")
    assert s2.layout == "cutlass" and d_vals is None  # bf16 "naive" recomputes the derivative
    assert int((dense_pos >= 0).sum()) == problem.n_dense > 0
    assert problem.operands("cutlass")[0] is s2  # packed once per layout


@pytest.mark.parametrize("lay", layout.LAYOUTS)
def test_pack_problem_calls_run_the_kernels_the_ffn_runs(problem, lay):
    calls = problem.calls(tk, lay)
    assert set(calls) == set(bench_pack.CONFIGS) <= set(bench_pack.moved_bytes(64, 128))
    s2, d_vals, dense_pos = problem.operands(lay)
    # compared where the interpreter's bf16 rounding (it truncates) cannot differ from the GPU's:
    # the selections (metadata, counts) and S2's feature-wise packs, made of stored values
    got, want = calls["fwd"](), reference.pack_forward(problem.y1, "naive", layout=lay)
    assert torch.equal(got[0].meta, want[0].meta) and torch.equal(got[2], want[2])
    fwd_counts = got[2]
    for kind, config, perm in (("bwdp", (32, 64, 2), problem.perm), ("bwd", None, None)):  # a non-default tile too
        got = calls[kind](config)
        want = reference.pack_backward(problem.g2, s2, d_vals, dense_pos, problem.n_dense, True, perm=perm)
        assert torch.equal(got[3].buffer, want[3].buffer) and torch.equal(got[4], want[4])
        assert torch.equal(got[0].meta, s2.meta)  # G1 keeps the forward mask
    dense_s2, _, counts = calls["dfwd"]()
    assert torch.equal(dense_s2, problem.s2_dense) and torch.equal(counts, fwd_counts)
    g1, g1_fw, s2_fw, _ = calls["dbwd"]()
    assert g1.shape == g1_fw.shape == s2_fw.shape == (64, 128)


def test_another_version_of_the_kernels_loads_next_to_this_one(problem, tmp_path):
    """bench_pack --against: a kernels package extracted elsewhere (as git archive leaves it) loads as
    its own modules, and its kernels run and agree with this checkout's."""
    other_dir = tmp_path / "megatron_sparse24" / "kernels"
    shutil.copytree(Path(tk.__file__).resolve().parents[1], other_dir,
                    ignore=shutil.ignore_patterns("__pycache__"))
    other = common.load_kernels(str(other_dir), name="kernels_under_test")
    assert other is not tk and other.pack_forward is not tk.pack_forward
    assert Path(other.__file__).resolve().is_relative_to(tmp_path.resolve())
    a, b = problem.calls(other, "cusparselt")["bwdp"](), problem.calls(tk, "cusparselt")["bwdp"]()
    assert all(torch.equal(x, y) for x, y in zip(bench_pack._flat(a), bench_pack._flat(b)))
    with pytest.raises(SystemExit, match="not a kernels package"):
        common.load_kernels(str(tmp_path))


def test_pack_bytes_count_what_each_kernel_moves():
    t, f = 64, 128
    plain, with_d = common.pack_bytes(t, f), common.pack_bytes(t, f, derivative=True)
    assert plain["fwd"] == 2 * t * f + t * f + t * f // 8  # Y1 read; values and metadata written (bf16)
    assert with_d["fwd"] - plain["fwd"] == t * f  # the kept derivatives: half of [T, F] in bf16
    assert with_d["dfwd"] - plain["dfwd"] == 2 * t * f  # the dense-GEMM engine keeps it whole
    assert common.pack_bytes(t, f, n_dense=8)["bwd"] - plain["bwd"] == 2 * 8 * t * 2  # G1's and S2's dense rows
    assert bench_pack.moved_bytes(t, f)["bwdp"] == bench_pack.moved_bytes(t, f)["bwd"] > plain["bwd"]
