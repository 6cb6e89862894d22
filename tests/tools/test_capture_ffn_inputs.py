"""tools/capture_ffn_inputs.py on CPU: a model trained and saved by the package's own loop, its FFN
inputs captured from the checkpoint, and the FFN benchmark's inputs built from the capture."""

import pytest
import torch

from benchmarks import bench_ffn
from tests.launch import ROOT, launch
from tests.training.test_loop import MODEL, train

pytestmark = pytest.mark.slow


def test_capture_from_a_trained_checkpoint_feeds_the_ffn_benchmark(tmp_path):
    train(tmp_path, "run", "--train-iters", 3, "--activation-dense-warmup-steps", 1, "--save", tmp_path / "ck")
    out = tmp_path / "ffn_inputs.pt"
    proc = launch([str(ROOT / "tools" / "capture_ffn_inputs.py"), *MODEL, "--train-iters", "3", "--load",
                   str(tmp_path / "ck"), "--capture-out", str(out), "--capture-layers", "1", "2",
                   "--capture-tokens", "300"], tmp_path, TRITON_INTERPRET="0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "layer 2: X (300, 64), W1 (256, 64)" in proc.stdout
    cap = torch.load(out, weights_only=True)  # plain tensors and containers: no pickled objects
    assert cap["iteration"] == 3 and sorted(cap["layers"]) == [1, 2]
    for layer in cap["layers"].values():
        x, w1, b1, w2 = layer["x"], layer["w1"], layer["b1"], layer["w2"]
        assert x.shape == (300, 64) and w1.shape == (256, 64) and b1.shape == (256,) and w2.shape == (64, 256)
        assert x.dtype == torch.bfloat16 and x.float().std() > 0.1  # real hidden states, not zeros
        density = float(((x.float() @ w1.float().t() + b1.float()) > 0).float().mean())
        assert 0.01 < density < 0.99
    assert not torch.equal(cap["layers"][1]["w1"], cap["layers"][2]["w1"])  # each layer's own weights
    # seq-length 64: tokens of one sequence, in order, then the next sequence
    ffn = bench_ffn.FFNProblem(128, 64, 512, dtype=torch.float32, device="cpu", inputs=f"captured:{out}@2")
    ffn.step_of(ffn.sparse_fwd)()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ffn.leaves)

    bad = launch([str(ROOT / "tools" / "capture_ffn_inputs.py"), *MODEL, "--train-iters", "3", "--load",
                  str(tmp_path / "ck"), "--capture-out", str(out), "--capture-layers", "3"], tmp_path,
                 TRITON_INTERPRET="0")
    assert bad.returncode != 0 and "--capture-layers [3]: the model has layers 1..2" in bad.stderr
