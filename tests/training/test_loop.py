"""The package's own loop (``megatron_sparse24.training.loop``: pretrain_gpt_sparse.py on megatron-core
0.16, and bench_train's trainer) end to end on CPU (gloo, mock data): one process, TP=2+SP on two
processes, the dense baseline, exact resumption from checkpoints during and after warmup, and the
checks that stop a bad run early."""

import json

import pytest

from tests.launch import launch

pytestmark = pytest.mark.slow
MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
         "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "2e-3", "--lr-warmup-iters", "2",
         "--squared-relu", "--mock-data", "--vocab-size", "250", "--distributed-backend", "gloo",
         "--num-workers", "0", "--log-interval", "1", "--eval-interval", "4", "--eval-iters", "1"]


def train(tmp_path, name, *extra, nproc=1, model_args=MODEL):
    """Run the trainer; returns {"train": {iteration: record}, "valid": [...]} from its JSON log."""
    log = tmp_path / f"{name}.jsonl"
    proc = launch(["-m", "megatron_sparse24.training.loop", *model_args, *map(str, extra), "--log-jsonl", str(log)],
                  tmp_path, nproc, TRITON_INTERPRET="0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    return {"train": {r["iteration"]: r for r in records if r["kind"] == "train"},
            "valid": [r for r in records if r["kind"] == "valid"], "stdout": proc.stdout}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pretrain")
    out = {}
    # uninterrupted baselines (dropout on: the resume must restore RNG states too)
    out["U_after"] = train(tmp, "U_after", "--train-iters", 8, "--activation-dense-warmup-steps", 2)
    out["U_during"] = train(tmp, "U_during", "--train-iters", 8, "--activation-dense-warmup-steps", 6)
    # interrupted at 4 (after warmup) / 3 (during warmup), then resumed
    out["A1"] = train(tmp, "A1", "--train-iters", 8, "--activation-dense-warmup-steps", 2, "--exit-interval", 4,
          "--save", tmp / "ckA")
    out["A2"] = train(tmp, "A2", "--train-iters", 8, "--activation-dense-warmup-steps", 2, "--load", tmp / "ckA")
    train(tmp, "B1", "--train-iters", 8, "--activation-dense-warmup-steps", 6, "--exit-interval", 3,
          "--save", tmp / "ckB")
    out["B2"] = train(tmp, "B2", "--train-iters", 8, "--activation-dense-warmup-steps", 6, "--load", tmp / "ckB")
    # TP=1 vs TP=2 + SP (no dropout, TP-invariant CPU init)
    same = ["--train-iters", 4, "--activation-dense-warmup-steps", 1, "--hidden-dropout", 0, "--attention-dropout", 0,
            "--use-cpu-initialization"]
    out["tp1"] = train(tmp, "tp1", *same)
    out["tp2sp"] = train(tmp, "tp2sp", *same, "--tensor-model-parallel-size", 2, "--sequence-parallel", nproc=2)
    out["dense"] = train(tmp, "dense", "--train-iters", 3, "--no-sparse24")
    return out


def test_trains_and_logs(runs):
    u = runs["U_after"]
    assert sorted(u["train"]) == list(range(1, 9))
    for it, r in u["train"].items():
        assert r["loss"] > 0 and r["tokens_per_s"] > 0 and r["ms_per_iter"] > 0 and r["grad_norm"] > 0
        assert r["consumed_samples"] == 4 * it
        # activation sparsity is logged from the first (dense warmup) iteration; the forward of
        # iteration i ran after i-1 optimizer steps, so 2:4 drops non-zeros from iteration 3 on
        assert len(r["sparsity"]) == 2, it
        for layer in r["sparsity"]:
            assert 0.3 < layer["activation_sparsity"] < 0.8
            assert (0 < layer["dropped_by_24"] < 1) if it >= 3 else layer["dropped_by_24"] == 0
    assert [v["iteration"] for v in u["valid"]] == [4, 8]
    assert u["train"][8]["loss"] < u["train"][1]["loss"]
    assert " iteration        8/       8 |" in u["stdout"] and "lm loss:" in u["stdout"]
    assert "> 2:4 FFN backend: auto -> emulated" in u["stdout"]  # says what "auto" resolved to


@pytest.mark.parametrize("full,resumed,first", [("U_after", "A2", 5), ("U_during", "B2", 4)])
def test_resume_continues_exactly(runs, full, resumed, first):
    u, r = runs[full]["train"], runs[resumed]["train"]
    assert sorted(r) == list(range(first, 9))
    for it in r:
        assert r[it]["loss"] == pytest.approx(u[it]["loss"], abs=1e-6), it
        assert r[it]["lr"] == pytest.approx(u[it]["lr"]) and r[it]["consumed_samples"] == u[it]["consumed_samples"]
        assert bool(r[it]["sparsity"]) == bool(u[it]["sparsity"])
    assert runs[resumed]["valid"][-1]["loss"] == pytest.approx(runs[full]["valid"][-1]["loss"], abs=1e-6)


def test_one_line_per_save_and_load(runs):
    """As Megatron-LM's loop: a line with the path and iteration for every save and every load."""
    saves = [line for line in runs["A1"]["stdout"].splitlines() if "successfully saved checkpoint" in line]
    assert len(saves) == 1 and "from iteration       4 to " in saves[0] and saves[0].endswith("ckA")
    loads = [line for line in runs["A2"]["stdout"].splitlines() if "successfully loaded checkpoint" in line]
    assert len(loads) == 1 and loads[0].endswith("ckA at iteration 4")
    assert "successfully" not in runs["U_after"]["stdout"]  # neither --save nor --load


def test_tp2_sequence_parallel_matches_one_process(runs):
    a, b = runs["tp1"]["train"], runs["tp2sp"]["train"]
    assert a[1]["loss"] == pytest.approx(b[1]["loss"], abs=1e-5)  # dense warmup step: same math
    assert a[2]["loss"] == pytest.approx(b[2]["loss"], abs=1e-5)  # first sparse forward: same math
    for it in (3, 4):  # after a sparse update the 5% dense features differ per rank: close, not equal
        assert a[it]["loss"] == pytest.approx(b[it]["loss"], rel=2e-2)
    assert b[4]["sparsity"] and len(b[4]["sparsity"]) == 2


def test_dense_baseline_runs(runs):
    d = runs["dense"]["train"]
    assert sorted(d) == [1, 2, 3] and all(not r["sparsity"] for r in d.values())


@pytest.mark.gpu
def test_distributed_optimizer_resume_on_gpus(tmp_path, monkeypatch):
    """bf16 + --use-distributed-optimizer on the GPUs here (DP=2 when there are two): interrupted at
    iteration 3 and resumed, the next losses equal an uninterrupted run's (needs the two megatron-core
    0.16.1 workarounds of training/checkpointing.py: Adam's 'step' on load, and un-sharing it)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA GPUs")
    # the same GEMM kernels in every process (the tuned choice can differ between processes)
    monkeypatch.setenv("MEGATRON_SPARSE24_AUTOTUNE", "0")
    n = min(2, torch.cuda.device_count())
    gpu = ["--bf16", "--use-distributed-optimizer", "--distributed-backend", "nccl", "--hidden-dropout", 0,
           "--attention-dropout", 0, "--train-iters", 6, "--activation-dense-warmup-steps", 2]
    full = train(tmp_path, "full", *gpu, nproc=n)
    train(tmp_path, "first", *gpu, "--exit-interval", 3, "--save", tmp_path / "ck", nproc=n)
    resumed = train(tmp_path, "resumed", *gpu, "--load", tmp_path / "ck", nproc=n)
    assert sorted(resumed["train"]) == [4, 5, 6]
    for it in (4, 5, 6):
        assert resumed["train"][it]["loss"] == pytest.approx(full["train"][it]["loss"], rel=2e-4)


def test_checks_before_the_model_is_built(tmp_path):
    base = ["-m", "megatron_sparse24.training.loop", *MODEL, "--train-iters", "3"]
    missing = launch([*base, "--load", str(tmp_path / "nope")], tmp_path, TRITON_INTERPRET="0")
    assert missing.returncode != 0 and f"--load {tmp_path / 'nope'}: the directory does not exist" in missing.stderr
    assert "--load-optional" in missing.stderr
    fresh = launch([*base, "--load", str(tmp_path / "nope"), "--load-optional"], tmp_path, TRITON_INTERPRET="0")
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    heads = launch([*base, "--num-attention-heads", "3"], tmp_path)  # 64 / 3
    assert heads.returncode != 0 and "not divisible by --num-attention-heads 3" in heads.stderr
