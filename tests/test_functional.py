"""The autograd FFN (functional.py) against the paper's equations, written out independently."""

import dataclasses

import pytest
import torch

from megatron_sparse24 import Sparse24Config, backends, engine, functional, kernels, ops, sparse24_ffn
from megatron_sparse24.kernels import reference

T, D, F = 64, 32, 128


def _weights(device, dtype=torch.float32, bias=True, t=T, d=D, f=F):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(t, d, generator=g)
    w1 = torch.randn(f, d, generator=g) / d**0.5
    w2 = torch.randn(d, f, generator=g) / f**0.5
    b1 = torch.randn(f, generator=g) * 0.1 if bias else None
    gy = torch.randn(t, d, generator=g)
    cast = lambda v: None if v is None else v.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return cast(x), cast(w1), cast(w2), cast(b1), gy.to(device=device, dtype=dtype)


def _paper_ffn(x, w1, w2, b1, gy, cfg, step, seed, scale=None):
    """Equations of algorithm.md with the public ops; returns y and (dx, dw1, db1, dw2)."""
    x, w1, w2 = x.detach().double(), w1.detach().double(), w2.detach().double()
    b1 = None if b1 is None else b1.detach().double()
    t = x.shape[0]
    perm = torch.arange(t, device=x.device)
    if cfg.token_permutation:
        perm, _ = ops.token_permutation(t, functional.permutation_seed(cfg, seed), x.device)
    xp = x[perm]
    # Y1 exactly as the FFN computes it (fp32 linear), so the 2:4 choices are the same.
    y1 = torch.nn.functional.linear(xp.float(), w1.float(), None if b1 is None else b1.float())
    mvue_seed = functional.make_plan(cfg, (t, w1.shape[0], x.shape[1]), x.device, x.dtype,
                                     step=step, seed=seed).mvue_seed
    s2, mask, dmult = reference.relu2_sparsify24_full(y1, cfg.method, scale, *kernels.rng.seed_keys(mvue_seed))
    s2 = s2.double()
    y3 = s2 @ w2.t()
    y = torch.empty_like(y3)
    y[perm] = y3
    g3 = gy.double()[perm]
    g2 = g3 @ w2
    g1 = g2 * dmult.double()  # forward mask kept (dmult is zero off the mask)
    dx = torch.empty_like(x)
    dx[perm] = g1 @ w1
    n_dense = reference.num_dense_features(w1.shape[0], cfg.dense_feature_fraction)
    dense_idx = reference.select_dense_features((s2 != 0).sum(0), n_dense)
    s2_fw = reference.sparsify24_featurewise(s2, dense_idx)
    g1_fw = reference.sparsify24_featurewise(g1, dense_idx)
    dw2 = (s2_fw.t() @ g3).t()
    dw1 = g1_fw.t() @ xp
    db1 = g1.sum(0)
    return y, (dx, dw1, db1, dw2), mask


def _run(x, w1, w2, b1, gy, cfg, step=10, seed=3, **kw):
    for p in (x, w1, w2, b1):
        if p is not None:
            p.grad = None
    y = sparse24_ffn(x, w1, w2, b1, config=cfg, step=step, seed=seed, **kw)
    y.backward(gy)
    return y.detach(), (x.grad, w1.grad, None if b1 is None else b1.grad, w2.grad)


@pytest.mark.parametrize("backend", ["auto", "dense"])  # the 2:4 engine (emulated on CPU) and the dense-GEMM one
@pytest.mark.parametrize("method", ["naive", "mvue", "soft_threshold"])
@pytest.mark.parametrize("perm", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_ffn_matches_paper_equations_fp32(method, perm, bias, backend, device):
    cfg = Sparse24Config(method=method, dense_warmup_steps=5, token_permutation=perm,
                         dense_feature_fraction=0.1, backend=backend)
    x, w1, w2, b1, gy = _weights(device, bias=bias)
    scale = 0.8 if method == "soft_threshold" else None
    y, grads = _run(x, w1, w2, b1, gy, cfg, soft_threshold_scale=scale)
    y_ref, grads_ref, _ = _paper_ffn(x, w1, w2, b1, gy, cfg, 10, 3, scale)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-5)
    for name, g, r in zip(("dx", "dw1", "db1", "dw2"), grads, grads_ref):
        if g is None:
            assert name == "db1" and not bias
            continue
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4, msg=name)


def test_dx_is_autograd_gradient_of_sparsified_forward(device):
    """dX equals torch autograd through y = (M * relu(x W1^T + b1)^2) W2^T with the mask M fixed."""
    cfg = Sparse24Config(dense_warmup_steps=0, token_permutation=False)
    x, w1, w2, b1, gy = _weights(device)
    _, (dx, _, db1, _) = _run(x, w1, w2, b1, gy, cfg)
    xa = x.detach().clone().requires_grad_()
    b1a = b1.detach().clone().requires_grad_()
    y1 = torch.nn.functional.linear(xa, w1.detach(), b1a)
    _, mask = ops.relu2_sparsify24(y1.detach())
    y = (mask * torch.relu(y1) ** 2) @ w2.detach().t()
    y.backward(gy)
    torch.testing.assert_close(dx, xa.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(db1, b1a.grad, rtol=1e-4, atol=1e-5)


def test_forward_mask_dropped_ablation(device):
    """forward_mask_in_backward=False: dX = sp_tok(2 G2 relu(Y1)) W1 with the top-2 |G1| along F,
    dW2 unchanged (B3 does not involve G1), dW1 from G1 without the mask; the recipe's dX differs."""
    kw = dict(dense_warmup_steps=0, token_permutation=False, dense_feature_fraction=0.0)
    x, w1, w2, b1, gy = _weights(device)
    y_keep, (dx_keep, _, _, dw2_keep) = _run(x, w1, w2, b1, gy, Sparse24Config(**kw))
    y, (dx, dw1, db1, dw2) = _run(x, w1, w2, b1, gy, Sparse24Config(**kw, forward_mask_in_backward=False))
    assert torch.equal(y, y_keep)  # same forward
    y1 = torch.nn.functional.linear(x.detach(), w1.detach(), b1.detach())
    g1 = 2.0 * (gy @ w2.detach()) * torch.relu(y1)  # no forward mask
    keep = reference.top2_keep(g1.abs().reshape(T, F // 4, 4)).reshape(T, F)
    torch.testing.assert_close(dx, torch.where(keep, g1, 0.0) @ w1.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dw1, reference.sparsify24_featurewise(g1, torch.empty(0, dtype=torch.long)).t() @ x.detach(),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(db1, g1.sum(0), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dw2, dw2_keep, rtol=0, atol=0)
    assert not torch.allclose(dx, dx_keep, rtol=1e-2, atol=1e-3)


def test_weight_grads_use_95_5_split(device):
    """With dense_feature_fraction=1 the weight gradients are exact too; with 0.05 they are not."""
    x, w1, w2, b1, gy = _weights(device)
    exact_cfg = Sparse24Config(dense_warmup_steps=0, token_permutation=False, dense_feature_fraction=1.0)
    _, (_, dw1, _, dw2) = _run(x, w1, w2, b1, gy, exact_cfg)
    xa, w1a, w2a = (p.detach().clone().requires_grad_() for p in (x, w1, w2))
    y1 = torch.nn.functional.linear(xa, w1a, b1.detach())
    _, mask = ops.relu2_sparsify24(y1.detach())
    ((mask * torch.relu(y1) ** 2) @ w2a.t()).backward(gy)
    torch.testing.assert_close(dw1, w1a.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dw2, w2a.grad, rtol=1e-4, atol=1e-4)
    cfg = Sparse24Config(dense_warmup_steps=0, token_permutation=False, dense_feature_fraction=0.05)
    _, (_, dw1_s, _, dw2_s) = _run(x, w1, w2, b1, gy, cfg)
    assert not torch.allclose(dw1_s, w1a.grad, atol=1e-3)
    # a sparse estimate keeps most of the gradient's direction
    cos = torch.nn.functional.cosine_similarity(dw1_s.flatten(), w1a.grad.flatten(), dim=0)
    assert cos > 0.8


def test_warmup_switch(device):
    x, w1, w2, b1, gy = _weights(device)
    cfg = Sparse24Config(dense_warmup_steps=100)
    y_dense, g_dense = _run(x, w1, w2, b1, gy, cfg, step=99)
    ref = functional.dense_relu2_ffn(x.detach(), w1.detach(), w2.detach(), b1.detach())
    torch.testing.assert_close(y_dense, ref)
    y_sparse, _ = _run(x, w1, w2, b1, gy, cfg, step=100)
    assert not torch.allclose(y_dense, y_sparse)  # groups with > 2 non-zeros get pruned
    # the sparse output drops a small part of the activation
    assert (y_dense - y_sparse).norm() < 0.5 * y_dense.norm()


def test_permutation_changes_nothing_without_drops(device):
    """If no group loses a non-zero, the FFN is token-wise and all-dense-features: permuting tokens
    must not change the output or any gradient."""
    x, w1, w2, b1, gy = _weights(device)
    with torch.no_grad():  # features 2 and 3 of every group are always off: <= 2 non-zeros
        w1[2::4] = 0.0
        w1[3::4] = 0.0
        b1[2::4] = -10.0
        b1[3::4] = -10.0
    base = dict(dense_warmup_steps=0, dense_feature_fraction=1.0)
    y_a, g_a = _run(x, w1, w2, b1, gy, Sparse24Config(token_permutation=True, **base))
    y_b, g_b = _run(x, w1, w2, b1, gy, Sparse24Config(token_permutation=False, **base))
    torch.testing.assert_close(y_a, y_b, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_a, g_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_triton_and_reference_paths_agree(device, monkeypatch):
    x, w1, w2, b1, gy = _weights(device, dtype=torch.bfloat16)
    cfg = Sparse24Config(dense_warmup_steps=0, method="naive")
    y_k, g_k = _run(x, w1, w2, b1, gy, cfg)
    monkeypatch.setattr(kernels, "use_triton", lambda t: False)
    y_r, g_r = _run(x, w1, w2, b1, gy, cfg)
    torch.testing.assert_close(y_k.float(), y_r.float(), rtol=2e-2, atol=2e-2)
    for a, b in zip(g_k, g_r):
        cos = torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0)
        assert cos > 0.99


def test_triton_and_reference_paths_agree_fp32_exactly(device, monkeypatch):
    x, w1, w2, b1, gy = _weights(device)
    cfg = Sparse24Config(dense_warmup_steps=0, method="mvue")
    y_k, g_k = _run(x, w1, w2, b1, gy, cfg)
    monkeypatch.setattr(kernels, "use_triton", lambda t: False)
    y_r, g_r = _run(x, w1, w2, b1, gy, cfg)
    torch.testing.assert_close(y_k, y_r, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_k, g_r):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_grads_finite_and_close_to_fp32(device):
    cfg = Sparse24Config(dense_warmup_steps=0)
    x, w1, w2, b1, gy = _weights(device)
    y32, g32 = _run(x, w1, w2, b1, gy, cfg)
    xb, w1b, w2b, b1b, gyb = _weights(device, dtype=torch.bfloat16)
    yb, gb = _run(xb, w1b, w2b, b1b, gyb, cfg)
    assert yb.dtype == torch.bfloat16 and all(g.dtype == torch.bfloat16 for g in gb)
    torch.testing.assert_close(yb.float(), y32, rtol=5e-2, atol=5e-2)
    for a, b in zip(gb, g32):
        assert torch.isfinite(a).all()
        cos = torch.nn.functional.cosine_similarity(a.float().flatten(), b.flatten(), dim=0)
        assert cos > 0.98


def test_saved_memory_is_compressed(device):
    """What autograd keeps is x, the weights and the compressed activations (no [T, F] dense)."""
    x, w1, w2, b1, _ = _weights(device)
    cfg = Sparse24Config(dense_warmup_steps=0)
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        sparse24_ffn(x, w1, w2, b1, config=cfg, step=0)
    big = [t for t in packed if t.numel() >= T * F]
    assert sum(t.numel() * t.element_size() for t in big) <= (T * F * 9 // 16) * 4 + T * F // 2 * 4
    assert all(t.dim() <= 2 and tuple(t.shape) != (T, F) for t in packed)


def test_nan_propagates(device):
    x, w1, w2, b1, gy = _weights(device)
    with torch.no_grad():
        x[5, 0] = float("nan")
    y, grads = _run(x, w1, w2, b1, gy, Sparse24Config(dense_warmup_steps=0, token_permutation=False))
    assert torch.isnan(y[5]).all() and torch.isfinite(y[:5]).all()


def test_bad_input_errors():
    cfg = Sparse24Config(dense_warmup_steps=0)
    x, w1, w2, b1, _ = _weights("cpu")
    with pytest.raises(ValueError, match="multiple of 4"):
        sparse24_ffn(x[:62], w1, w2, b1, config=cfg, step=0)
    with pytest.raises(ValueError, match="multiple of 4"):
        sparse24_ffn(x, w1[:126], w2[:, :126], b1[:126], config=cfg, step=0)
    with pytest.raises(ValueError, match="share one dtype"):
        sparse24_ffn(x, w1.half(), w2, b1, config=cfg, step=0)
    with pytest.raises(ValueError, match="not supported"):
        sparse24_ffn(x.double(), w1.double(), w2.double(), None, config=cfg, step=0)
    with pytest.raises(ValueError, match="shape mismatch"):
        sparse24_ffn(x, w1, w2.t(), b1, config=cfg, step=0)
    with pytest.raises(ValueError, match="2-D"):
        sparse24_ffn(x[None], w1, w2, b1, config=cfg, step=0)
    with pytest.raises(TypeError, match="Sparse24Config"):
        sparse24_ffn(x, w1, w2, b1, config={"method": "naive"}, step=0)
    with pytest.raises(ValueError, match="cusparselt"):
        sparse24_ffn(x, w1, w2, b1, config=Sparse24Config(dense_warmup_steps=0, backend="cusparselt"), step=0)


class _CutlassLayoutEmulated(backends.EmulatedGemm):
    """Stands in for the CUTLASS backend on CPU: refuses operands not packed in its layout."""

    layout = "cutlass"

    def spmm(self, a, b, transpose_result=False, group=None):
        assert a.layout == "cutlass", "every operand must be packed in the backend's layout"
        return super().spmm(a, b, transpose_result)


@pytest.mark.parametrize("use_triton", [True, False])
def test_operands_follow_the_backend_layout(device, monkeypatch, use_triton):
    """With a backend that reads CUTLASS's metadata layout, forward and backward pack in it and the
    results equal the cuSPARSELt-layout run exactly (same selection, same values)."""
    if not use_triton:
        monkeypatch.setattr(kernels, "use_triton", lambda t: False)
    x, w1, w2, b1, gy = _weights(device)
    cfg = Sparse24Config(dense_warmup_steps=0, method="naive")
    y_a, g_a = _run(x, w1, w2, b1, gy, cfg)
    monkeypatch.setattr(functional, "resolve_backend", lambda *args: _CutlassLayoutEmulated())
    y_b, g_b = _run(x, w1, w2, b1, gy, cfg)
    assert torch.equal(y_a, y_b)
    for a, b in zip(g_a, g_b):
        assert torch.equal(a, b)


def test_precomputed_permutation_gives_the_same_result(device):
    """permutation= is what the call computes itself: identical output and gradients."""
    x, w1, w2, b1, gy = _weights(device)
    cfg = Sparse24Config(dense_warmup_steps=0, dense_feature_fraction=0.1)
    y_a, g_a = _run(x, w1, w2, b1, gy, cfg, seed=7)
    perm = ops.token_permutation(T, functional.permutation_seed(cfg, 7), x.device)
    y_b, g_b = _run(x, w1, w2, b1, gy, cfg, seed=7, permutation=perm)
    assert torch.equal(y_a, y_b)
    for a, b in zip(g_a, g_b):
        assert torch.equal(a, b)
    # a different permutation changes the weight gradients (feature-wise 2:4 groups other tokens;
    # the forward is token-wise, so y does not change): the argument is used
    other = ops.token_permutation(T, functional.permutation_seed(cfg, 8), x.device)
    _, g_c = _run(x, w1, w2, b1, gy, cfg, seed=7, permutation=other)
    assert not torch.equal(g_a[1], g_c[1])


def test_precomputed_permutation_of_the_wrong_shape_is_rejected(device):
    x, w1, w2, b1, gy = _weights(device)
    cfg = Sparse24Config(dense_warmup_steps=0)
    perm, inv = ops.token_permutation(T // 2, 1, x.device)
    with pytest.raises(ValueError, match="perm must be int64"):
        sparse24_ffn(x, w1, w2, b1, config=cfg, step=0, permutation=(perm, inv))
    perm, inv = ops.token_permutation(T, 1, x.device)
    with pytest.raises(ValueError, match="inv must be int64"):
        sparse24_ffn(x, w1, w2, b1, config=cfg, step=0, permutation=(perm, inv.int()))
    with pytest.raises(ValueError, match="token_permutation is False"):
        sparse24_ffn(x, w1, w2, b1, config=Sparse24Config(dense_warmup_steps=0, token_permutation=False), step=0,
                     permutation=(perm, inv))


# --- the dense-GEMM engine: the same FFN, dense GEMMs --------------------------------------------


@pytest.mark.parametrize("method", ["naive", "mvue"])
def test_dense_gemm_engine_equals_the_2to4_engine_bf16(method, device):
    """Same selections and values in bf16 (MVUE draws the same samples): only GEMM summation differs."""
    x, w1, w2, b1, gy = _weights(device, dtype=torch.bfloat16)
    sparse = Sparse24Config(method=method, dense_warmup_steps=0, dense_feature_fraction=0.1, backend="emulated")
    y_s, g_s = _run(x, w1, w2, b1, gy, sparse)
    y_d, g_d = _run(x, w1, w2, b1, gy, Sparse24Config(**{**sparse.__dict__, "backend": "dense"}))
    torch.testing.assert_close(y_d.float(), y_s.float(), rtol=2e-2, atol=2e-2)
    for a, b in zip(g_d, g_s):
        cos = torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0)
        assert cos > 0.999


def test_dense_gemm_engine_saves_s2_only(device):
    """bf16 naive: x, the weights and S2 [T, F] (no Y1, no derivative: recomputed exactly)."""
    x, w1, w2, b1, _ = _weights(device, dtype=torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        sparse24_ffn(x, w1, w2, b1, config=Sparse24Config(dense_warmup_steps=0, backend="dense"), step=0)
    assert [tuple(t.shape) for t in saved if t.numel() >= T * F] == [(T, F)]


def test_engine_resolution(device):
    plan = functional.make_plan(Sparse24Config(backend="dense"), (T, F, D), device, torch.bfloat16, step=0, seed=0)
    assert plan.engine == "dense" and plan.gemm is None
    assert engine.choose_engine(plan, (T, F, D), torch.bfloat16, device, True, True, True) is plan
    plan = functional.make_plan(Sparse24Config(backend="emulated"), (T, F, D), device, torch.bfloat16, step=0, seed=0)
    assert plan.engine == "sparse"
    if device.type == "cpu":  # "auto" on CPU is the emulated 2:4 path: nothing to time
        plan = functional.make_plan(Sparse24Config(), (T, F, D), device, torch.float32, step=0, seed=0)
        assert plan.engine == "sparse" and plan.gemm.name == "emulated"
    ablation = Sparse24Config(forward_mask_in_backward=False)
    assert functional.make_plan(ablation, (T, F, D), device, torch.float32, step=0, seed=0).engine == "sparse"
    with pytest.raises(ValueError, match="packed path only"):
        Sparse24Config(backend="dense", forward_mask_in_backward=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_times_both_engines_once_per_shape(caplog):
    import logging

    t, d, f = 1024, 256, 512
    cfg = Sparse24Config(dense_warmup_steps=0)
    plan = functional.make_plan(cfg, (t, f, d), torch.device("cuda"), torch.bfloat16, step=0, seed=0)
    if plan.engine != "auto":
        pytest.skip(f"no 2:4 GEMM backend here ({plan.gemm.name})")
    plan.gemm.ffn_engines.clear()
    with caplog.at_level(logging.INFO, logger="megatron_sparse24.engine"):
        first = engine.choose_engine(plan, (t, f, d), torch.bfloat16, torch.device("cuda"), True, True, True)
        again = engine.choose_engine(plan, (t, f, d), torch.bfloat16, torch.device("cuda"), True, True, True)
    assert (first.engine, first.gemm) == (again.engine, again.gemm) and first.engine in ("sparse", "dense")
    assert first.engine == "dense" or first.gemm.name in ("cutlass", "cusparselt")
    assert len([r for r in caplog.records if "dense GEMMs" in r.getMessage()]) == 1  # timed once
    assert "ms without 2:4)" in caplog.text  # the dense squared-ReLU FFN timed alongside
    x, w1, w2, b1, gy = _weights(torch.device("cuda"), dtype=torch.bfloat16, t=t, d=d, f=f)
    y, grads = _run(x, w1, w2, b1, gy, cfg)  # runs with the chosen engine
    y_e, grads_e = _run(x, w1, w2, b1, gy, Sparse24Config(dense_warmup_steps=0, backend="emulated"))
    torch.testing.assert_close(y.float(), y_e.float(), rtol=2e-2, atol=2e-2)
    for a, b in zip(grads, grads_e):
        assert torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0) > 0.999


class _NamedGemm(backends.EmulatedGemm, backends.dispatch._Dispatcher):
    """An emulated 2:4 backend under another name (to stand in for a second 2:4 backend on CPU)."""

    def __init__(self, name):
        self.name = name


@pytest.mark.parametrize("times,want", [
    ({"sparse": 10.0, "cusparselt": 8.0, "dense": 9.0}, "cusparselt"),
    ({"sparse": 10.0, "cusparselt": 9.95, "dense": 11.0}, "sparse"),  # within 1 %: the first keeps its place
    ({"sparse": 10.0, "cusparselt": 8.0, "dense": 7.0}, "dense"),
    ({"sparse": 10.0, "cusparselt": 8.0, "dense": 7.95}, "cusparselt"),  # dense must beat the best 2:4 by 1 %
])
def test_auto_picks_among_2to4_backends_and_dense(monkeypatch, caplog, times, want):
    """Backend "auto" times each 2:4 backend that can run (backends.auto_alternatives) and the dense-GEMM
    engine once per shape, and runs the FFN on the winner from then on."""
    import logging

    first, other = _NamedGemm("cutlass"), _NamedGemm("cusparselt")
    first._init_tables(0, None)
    plan = functional.make_plan(Sparse24Config(), (T, F, D), torch.device("cpu"), torch.float32, step=0, seed=0)
    plan = dataclasses.replace(plan, engine="auto", gemm=first)
    calls = []
    monkeypatch.setattr(engine, "auto_alternatives", lambda *a: (other,))
    monkeypatch.setattr(engine, "_time_engines", lambda *a: calls.append(a) or dict(times))
    with caplog.at_level(logging.INFO, logger="megatron_sparse24.engine"):
        chosen = [engine.choose_engine(plan, (T, F, D), torch.float32, "cpu", True, True, True) for _ in range(2)]
    assert len(calls) == 1 and first.ffn_engines == {((T, F, D), torch.float32, "naive", True, True, True, 0): want}
    for p in chosen:
        assert p.engine == ("dense" if want == "dense" else "sparse")
        if want != "dense":
            assert p.gemm is (other if want == "cusparselt" else first)
    assert "10.000 ms with 2:4 GEMMs (cutlass)" in caplog.text
    assert f"{times['cusparselt']:.3f} ms with 2:4 GEMMs (cusparselt)" in caplog.text
    # the steady state looks nothing up per call, whichever backend it runs on
    monkeypatch.setattr(engine, "auto_alternatives", lambda *a: pytest.fail("backends looked up per call"))
    again = engine.choose_engine(plan, (T, F, D), torch.float32, "cpu", True, True, True)
    assert again.engine == ("dense" if want == "dense" else "sparse")
    assert want == "dense" or again.gemm is (other if want == "cusparselt" else first)
    # an entry naming a backend that cannot run here (an on-disk cache from elsewhere, read by a new
    # process that has decided nothing yet): its own 2:4
    first.ffn_settled.clear()
    monkeypatch.setattr(engine, "auto_alternatives", lambda *a: ())
    got = engine.choose_engine(plan, (T, F, D), torch.float32, "cpu", True, True, True)
    assert got.engine == ("dense" if want == "dense" else "sparse") and (want == "dense" or got.gemm is first)


@pytest.mark.parametrize("dense_ffn_ms,warns", [(9.0, True), (11.0, False)])
def test_auto_warns_where_the_2to4_ffn_is_slower_than_the_dense_one(monkeypatch, caplog, dense_ffn_ms, warns):
    """auto also times the dense squared-ReLU FFN (never chosen: it is another model) and warns, with both
    times, when the engine it chose is slower than that."""
    import logging
    import warnings

    gemm = _NamedGemm("cusparselt")
    gemm._init_tables(0, None)
    plan = functional.make_plan(Sparse24Config(), (T, F, D), torch.device("cpu"), torch.float32, step=0, seed=0)
    plan = dataclasses.replace(plan, engine="auto", gemm=gemm)
    times = {"sparse": 10.0, "dense": 12.0, engine.DENSE_FFN: dense_ffn_ms}
    monkeypatch.setattr(engine, "auto_alternatives", lambda *a: ())
    monkeypatch.setattr(engine, "_time_engines", lambda *a: dict(times))
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.INFO, logger="megatron_sparse24.engine"):
        warnings.simplefilter("always")
        for _ in range(2):  # timed once: one warning at most
            assert engine.choose_engine(plan, (T, F, D), torch.float32, "cpu", True, True, True).engine == "sparse"
    slow = [w for w in seen if issubclass(w.category, engine.Sparse24PerformanceWarning)]
    assert len(slow) == int(warns)
    if warns:
        msg = str(slow[0].message)
        assert "10.000 ms" in msg and "9.000 ms" in msg and "0.90x" in msg and "2:4 GEMMs (cusparselt)" in msg
    assert f"({dense_ffn_ms:.3f} ms without 2:4)" in caplog.text
    assert gemm.ffn_engines == {((T, F, D), torch.float32, "naive", True, True, True, 0): "sparse"}


def test_engine_timing_out_of_memory_falls_back_to_the_2to4_engine(monkeypatch, caplog):
    """auto's one-time timing needs a second FFN's memory; running out must not fail training."""
    import logging

    plan = functional.make_plan(Sparse24Config(), (T, F, D), torch.device("cpu"), torch.float32, step=0, seed=0)
    gemm = backends.CusparseltGemm()
    plan = dataclasses.replace(plan, engine="auto", gemm=gemm)

    def oom(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(engine, "_time_engines", oom)
    with caplog.at_level(logging.WARNING, logger="megatron_sparse24.engine"):
        assert engine.choose_engine(plan, (T, F, D), torch.float32, "cpu", True, True, True).engine == "sparse"
    assert "out of memory" in caplog.text
    assert list(gemm.ffn_engines.values()) == ["sparse"]  # not timed again in this process
