"""benchmarks/bench_ffn.py measures what it says on a small shape (GPU: it times CUDA kernels); its
FFN helper shared with profile_ffn.py and host_overhead.py also runs on CPU."""

import math
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import requires_gpu

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_ffn_problem_steps_run_and_produce_gradients():
    import bench_ffn

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
    import bench_ffn

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
