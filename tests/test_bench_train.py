"""benchmarks/bench_train.py runs end to end (on CPU: a smoke test of the script, not a benchmark)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64", "--micro-batch-size", "2",
         "--squared-relu", "--mock-data", "--vocab-size", "256", "--distributed-backend", "gloo", "--lr", "1e-3"]


def run_bench(tmp_path, *flags, layers=1, warmup=2, iters=2):
    """Run bench_train.py on CPU with a tiny GPT; returns (process, results from --json)."""
    out = tmp_path / "r.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--num-layers", str(layers), *MODEL,
           "--global-batch-size", "2", "--train-iters", "100", "--num-workers", "0", "--bench-warmup", str(warmup),
           "--bench-iters", str(iters), "--bench-sparse-warmup", "1", *flags, "--json", str(out)]
    env = dict(os.environ, TRITON_INTERPRET="0", TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    env.pop("MASTER_ADDR", None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, json.loads(out.read_text())


def test_bench_train_runs_both_variants(tmp_path):
    proc, runs = run_bench(tmp_path, "--variants", "dense", "sparse", "sparse", "dense",
                           layers=2, warmup=3, iters=3)
    assert [(r["variant"], r["order"]) for r in runs] == [("dense", 0), ("sparse", 1), ("sparse", 2), ("dense", 3)]
    assert "sparse / dense tokens/s" in proc.stdout and "means over 4 runs" in proc.stdout
    assert "dense / sparse mean step time" in proc.stdout
    for r in runs:
        assert r["ms_per_iter"] > 0 and r["tokens_per_s"] > 0 and r["attention_ms"] > 0 and r["ffn_ms"] > 0
        assert len(r["timed_steps_ms"]) == 3 and r["ms_per_iter_mean"] == pytest.approx(sum(r["timed_steps_ms"]) / 3)
        assert r["ms_per_iter_max"] == max(r["timed_steps_ms"])  # a stall shows even where the median hides it
        assert r["last_loss"] < r["first_loss"]
        assert r["stale_models_at_start"] == 0  # the dense model is freed before the sparse variant
        assert r["gpu_state_mid_run"] == {}  # no GPU to read


def test_bench_train_isolated_runs_each_variant_in_its_own_process(tmp_path):
    proc, runs = run_bench(tmp_path, "--variants", "sparse", "dense", "--bench-isolate", "1")
    assert [(r["variant"], r["order"]) for r in runs] == [("sparse", 0), ("dense", 1)]
    assert "each variant in its own process" in proc.stdout and "sparse / dense tokens/s" in proc.stdout
    assert all(r["ms_per_iter"] > 0 for r in runs)


def test_bench_train_isolated_launches_two_ranks_per_variant(tmp_path):
    proc, runs = run_bench(tmp_path, "--tensor-model-parallel-size", "2", "--sequence-parallel",
                           "--variants", "dense", "sparse", "--bench-isolate", "2")
    assert [(r["variant"], r["order"]) for r in runs] == [("dense", 0), ("sparse", 1)]
    assert "x 2" in proc.stdout and "tp 2 sp True" in proc.stdout


def test_sparse_warmup_must_end_before_timing(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--num-layers", "2", *MODEL,
                           "--train-iters", "10", "--bench-warmup", "2", "--bench-sparse-warmup", "5"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--bench-sparse-warmup must be smaller" in proc.stderr


def test_profile_parts_of_a_training_step():
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_train import step_part_of

    # kernel names from an H200 profile of the 7B-class step (docs/results.md)
    names = {
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128": "attention (SDPA kernels)",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<TensorListMetadata<4>>": "optimizer, grad norm",
        "_pack_backward_kernel": "pack backward",
        "nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_TNN": "dense GEMM",
        "void cutlass::device_kernel<PackForwardEpilogue<...>>": "F1 + pack forward (one CUTLASS kernel)",
        "sm90_xmma_sparse_gemm_bf16bf16_bf16f32_f32_tt_t_tilesize128x256x64_cgasize2x1x1_warpgroupsize2x1x1_"
        "execute_segment_k_off_kernel_5x_cusparselt": "2:4 GEMM (cuSPARSELt)",
        "void at::native::(anonymous namespace)::layer_norm_grad_input_kernel_vectorized<c10::BFloat16>": "norms",
        "ncclDevKernel_AllReduce_Sum_f32_RING_LL": "communication",
        # the gradient norm's reduction, not a norm layer
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::NormTwoOps<float, float, "
        "float, true>, unsigned int, float, 4, 4> >": "optimizer, grad norm",
    }
    for name, part in names.items():
        assert step_part_of(name) == part, name


def test_profile_needs_a_gpu(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--num-layers", "1", *MODEL,
           "--global-batch-size", "2", "--train-iters", "100", "--bench-warmup", "2", "--bench-iters", "2",
           "--bench-sparse-warmup", "1", "--bench-profile", "2"]
    # no GPU visible to the script, on GPU machines too
    env = dict(os.environ, TRITON_INTERPRET="0", TORCHDYNAMO_DISABLE="1", CUDA_VISIBLE_DEVICES="")
    env.pop("MASTER_ADDR", None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "--bench-profile times GPU kernels: it needs a CUDA GPU" in proc.stderr
