"""benchmarks/bench_ffn.py measures what it says on a small shape (GPU: it times CUDA kernels); its
FFN helper shared with profile_ffn.py also runs on CPU."""

import math

import pytest
import torch

from benchmarks import bench_ffn
from tests.conftest import requires_gpu


def test_ffn_problem_steps_run_and_produce_gradients():
    ffn = bench_ffn.FFNProblem(64, 32, 64, dtype=torch.float32, device="cpu")
    y1 = ffn.x @ ffn.w1.t() + ffn.b1
    assert 0.03 < float((y1 > 0).float().mean()) < 0.3  # ~10 % positive: the realistic regime
    perm, inv = ffn.permutation
    assert torch.equal(perm[inv], torch.arange(64))
    for fwd in (ffn.dense_fwd, ffn.sparse_fwd):
        ffn.step_of(fwd)()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ffn.leaves)
    # the sparse forward drops values the dense one keeps
    with torch.no_grad():
        assert not torch.allclose(ffn.dense_fwd(), ffn.sparse_fwd())


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_bench_shape_reports_eager_and_graphed_times(tp):
    r = bench_ffn.bench_shape(512, 256, 512, torch.bfloat16, warmup=1, iters=3, backends=("auto", "dense"), tp=tp)
    for key in ("dense_fwd", "dense_bwd", "dense_fwdbwd", "dense_fwdbwd_graph", "auto_fwd", "auto_bwd",
                "auto_fwdbwd", "auto_fwdbwd_graph", "pack_fwd_GBps", "pack_bwd_GBps", "copy_GBps",
                "dense_gemms_fwdbwd", "dense_gemms_fwdbwd_graph", "dense_engine_fwd_pass_GBps",
                "dense_engine_bwd_pass_GBps"):
        assert math.isfinite(r[key]) and r[key] > 0, (key, r.get(key))
    assert r["backends"] == ["auto", "dense_gemms"]
    # a replayed graph skips the host's launches: never meaningfully slower than eager
    assert r["auto_fwdbwd_graph"] < 1.2 * r["auto_fwdbwd"]
    assert ("perm_shard_gather_ms" in r) == (tp > 2)  # the layer permutes shards only under SP at tp > 2
    assert "| 512×256×512 |" in bench_ffn.fmt_table([dict(r, tp=tp)])


def test_mean_rows_averages_processes_and_keeps_their_choices():
    a = {"T": 8, "inputs": "blocks", "backends": ["auto"], "dense_fwd": 2.0, "runs_ms": {"dense_fwd": [2.0]}}
    b = {"T": 8, "inputs": "blocks", "backends": ["auto"], "auto_fwd": 1.0, "auto_engine": "sparse",
         "runs_ms": {"auto_fwd": [1.0]}}
    c = dict(b, auto_fwd=3.0, auto_engine="dense", runs_ms={"auto_fwd": [3.0]})
    row = bench_ffn._mean_rows([a, b, c, a])
    assert row["dense_fwd"] == 2.0 and row["auto_fwd"] == 2.0 and row["T"] == 8
    assert row["auto_engine"] == "sparse / dense"
    assert row["runs_ms"] == {"dense_fwd": [2.0, 2.0], "auto_fwd": [1.0, 3.0]}
    assert "| 8×" not in bench_ffn.fmt_worst([])  # header only


@pytest.mark.gpu
@requires_gpu
def test_isolated_run_times_dense_and_sparse_in_their_own_processes(tmp_path):
    import json

    out = tmp_path / "r.json"
    bench_ffn.main(["--shapes", "512x256x512", "--warmup", "1", "--iters", "3", "--no-graphs", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert sorted(r["inputs"] for r in rows) == sorted(bench_ffn.INPUTS)
    for r in rows:
        assert len(r["runs_ms"]["dense_fwdbwd"]) == 4 and len(r["runs_ms"]["auto_fwdbwd"]) == 4  # 2 processes x 2
        assert r["dense_fwdbwd"] > 0 and r["auto_fwdbwd"] > 0 and r["pack_fwd_GBps"] > 0
