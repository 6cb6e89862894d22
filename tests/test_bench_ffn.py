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


def _capture_file(path, tc=4096, dc=64, fc=96):
    """A capture as tools/capture_ffn_inputs.py writes it: AR(1) tokens, features of densities 2-30 %."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tc, dc, generator=g)
    for i in range(1, tc):
        x[i] = 0.8 * x[i - 1] + 0.6 * x[i]
    w1 = torch.randn(fc, dc, generator=g) / dc**0.5
    density = torch.linspace(0.02, 0.30, fc)
    b1 = -torch.quantile(x @ w1.t(), 1 - density, dim=0).diagonal()
    w2 = torch.randn(dc, fc, generator=g) / fc**0.5
    layer = {k: v.bfloat16() for k, v in dict(x=x, w1=w1, b1=b1, w2=w2).items()}
    torch.save({"iteration": 10, "layers": {2: layer}}, path)
    return layer


def _persistence(pos):
    """P(positive in token t+1 | positive in token t)."""
    return float((pos[1:] & pos[:-1]).sum() / pos[:-1].sum())


def test_captured_inputs_keep_each_features_density_and_the_tokens_correlation(tmp_path):
    cap = _capture_file(tmp_path / "cap.pt")
    xc, w1c, b1c = (cap[k].float() for k in ("x", "w1", "b1"))
    pos_c = (xc @ w1c.t() + b1c) > 0
    t, d, f = 6000, 128, 256  # more tokens than captured (wraps), wider hidden, more features
    x, w1, b1, w2, gy = bench_ffn.make_inputs(f"captured:{tmp_path / 'cap.pt'}@2", t, d, f, torch.float32,
                                              device="cpu")
    assert x.shape == (t, d) and w1.shape == (f, d) and b1.shape == (f,) and w2.shape == (d, f) and gy.shape == (t, d)
    assert torch.equal(x[:4096, :64], xc) and torch.equal(x[4096:, :64], xc[: t - 4096])  # captured tokens, in order
    pos = (x @ w1.t() + b1) > 0
    # every benchmark feature is a replica of a captured one: match each to its source by its W1 row
    src = torch.cdist(w1[:, :64], w1c).argmin(1)
    assert torch.equal(w1[:, :64], w1c[src]) and len(set(src.tolist())) == 96
    density, density_c = pos.float().mean(0), pos_c.float().mean(0)[src]
    assert (density - density_c).abs().mean() < 0.01 and torch.corrcoef(torch.stack([density, density_c]))[0, 1] > 0.98
    assert abs(_persistence(pos) - _persistence(pos_c)) < 0.05  # neighbouring tokens stay correlated
    twins = [j for j in range(1, f) if src[j] == src[0]]
    assert twins and not torch.equal(pos[:, 0], pos[:, twins[0]])  # replicas of one feature differ
    assert _persistence(pos) > 2 * float(pos.float().mean())  # far from independent tokens
    with pytest.raises(ValueError, match="wider than the benchmark's D"):
        bench_ffn.make_inputs(f"captured:{tmp_path / 'cap.pt'}", 64, 32, 64, torch.float32, device="cpu")
    with pytest.raises(ValueError, match=r"holds layers \[2\], not 5"):
        bench_ffn.make_inputs(f"captured:{tmp_path / 'cap.pt'}@5", 64, 64, 64, torch.float32, device="cpu")
    assert bench_ffn.inputs_name(f"captured:{tmp_path / 'cap.pt'}@2").endswith("@2")
    with pytest.raises(Exception, match="no such file"):
        bench_ffn.inputs_name(f"captured:{tmp_path / 'missing.pt'}")
