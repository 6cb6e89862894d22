"""Sparse24MLP as a module, the spec entry points and the attention core (one CPU process)."""

import pytest
import torch

from tests.megatron.harness import SEQ, VOCAB, spawn, transformer_config

pytestmark = pytest.mark.slow


def _mlp(config, sparse24_config=None):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules

    from megatron_sparse24.mlp import Sparse24MLP

    return Sparse24MLP(config, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                       sparse24_config=sparse24_config)


def _error(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the message is the result
        return f"{type(exc).__name__}: {exc}"
    return None


def mlp_scenarios(rank, world_size):
    import warnings
    from argparse import Namespace
    from types import SimpleNamespace

    import torch.nn.functional as F
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.mlp import MLP, MLPSubmodules

    import megatron_sparse24
    from megatron_sparse24 import Sparse24Config, specs
    from megatron_sparse24 import mlp as mlp_module
    from megatron_sparse24.mlp import Sparse24MLP, Sparse24StepWarning, sparsity_stats

    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(7)
    out = {}
    cfg = transformer_config()
    # --- validation ------------------------------------------------------------------------------
    out["err_glu"] = _error(lambda: _mlp(transformer_config(gated_linear_unit=True)))
    out["err_act"] = _error(lambda: _mlp(transformer_config(activation_func=F.gelu)))
    out["err_width"] = _error(lambda: _mlp(transformer_config(ffn_hidden_size=258)))
    out["err_align"] = _error(lambda: _mlp(transformer_config(ffn_hidden_size=260), Sparse24Config(backend="cusparselt")))
    out["err_align_cutlass"] = _error(lambda: _mlp(transformer_config(ffn_hidden_size=260),
                                                   Sparse24Config(backend="cutlass")))
    # training CUDA graphs that would capture the MLP (whole layers, 'mlp', the whole iteration, and
    # megatron's local graphs of 'attn', which graph the whole layer) are refused; Transformer Engine's
    # graphs of attention only leave the MLP eager
    out["err_graphs"] = {
        name: _error(lambda kw=kw: _mlp(transformer_config(**kw)))
        for name, kw in {"layer": dict(cuda_graph_impl="local"),
                         "mlp": dict(cuda_graph_impl="local", cuda_graph_scope="mlp"),
                         "te": dict(cuda_graph_impl="transformer_engine", cuda_graph_scope="attn,mlp"),
                         "iteration": dict(cuda_graph_impl="local", cuda_graph_scope="full_iteration"),
                         "attn": dict(cuda_graph_impl="local", cuda_graph_scope="attn"),
                         "te_attn": dict(cuda_graph_impl="transformer_engine", cuda_graph_scope="attn")}.items()
    }
    # --- warmup switch ---------------------------------------------------------------------------
    mlp = _mlp(cfg, Sparse24Config(dense_warmup_steps=1, dense_feature_fraction=1.0))
    dense = MLP(cfg, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                ffn_hidden_size=cfg.ffn_hidden_size)
    dense.load_state_dict(mlp.state_dict(), strict=False)
    x = torch.randn(SEQ, 2, cfg.hidden_size)
    out["warm_out"], _ = mlp(x)
    out["dense_out"], _ = dense(x)
    out["n_stepped"] = megatron_sparse24.step([mlp])
    out["stats_before"] = sparsity_stats(mlp)
    xs = x.detach().requires_grad_()
    out["sparse_out"], out["sparse_bias"] = mlp(xs)
    out["sparse_out"].sum().backward()
    out["stats_after"] = sparsity_stats(mlp)
    out["stats_reset"] = sparsity_stats(mlp)
    with torch.no_grad():
        y1 = torch.nn.functional.linear(x.reshape(-1, cfg.hidden_size), mlp.linear_fc1.weight, mlp.linear_fc1.bias)
    out["true_sparsity"] = float((y1 <= 0).float().mean())
    out["sparse_out"] = out["sparse_out"].detach()
    out["fc2_bias"] = mlp.linear_fc2.bias.detach().clone()
    out["sparse_active"] = mlp.sparse_active
    # --- gradient_accumulation_fusion: dW into main_grad --------------------------------------------
    ref_mlp = _mlp(cfg, Sparse24Config(dense_warmup_steps=0))
    gaf_mlp = _mlp(transformer_config(gradient_accumulation_fusion=True), Sparse24Config(dense_warmup_steps=0))
    gaf_mlp.load_state_dict(ref_mlp.state_dict())
    for p in (gaf_mlp.linear_fc1.weight, gaf_mlp.linear_fc2.weight):
        p.main_grad = torch.full_like(p, 0.5)  # accumulates onto what is there
        p.grad_added_to_main_grad = False
    xg = torch.randn(SEQ, 2, cfg.hidden_size)
    ref_mlp(xg)[0].square().sum().backward()
    gaf_mlp(xg)[0].square().sum().backward()
    out["gaf"] = [(p.main_grad - 0.5, r.grad, p.grad_added_to_main_grad) for p, r in
                  ((gaf_mlp.linear_fc1.weight, ref_mlp.linear_fc1.weight),
                   (gaf_mlp.linear_fc2.weight, ref_mlp.linear_fc2.weight))]
    # --- soft threshold: frozen at the first sparse step, used by every later one -----------------
    soft = _mlp(cfg, Sparse24Config(dense_warmup_steps=0, method="soft_threshold"))
    xt = torch.randn(SEQ, 2, cfg.hidden_size)
    with torch.no_grad():
        first = soft(xt)[0]
        frozen = soft.soft_threshold_scale.clone()
        again = soft(xt)[0]
        soft.soft_threshold_scale = frozen * 2  # the output is linear in the scale
        doubled = soft(xt)[0]
    out["soft_scale"] = (float(frozen), first, again, doubled)
    # --- biases off ------------------------------------------------------------------------------
    nobias = _mlp(transformer_config(add_bias_linear=False), Sparse24Config(dense_warmup_steps=0))
    xb = torch.randn(SEQ, 2, cfg.hidden_size, requires_grad=True)
    yb, bias = nobias(xb)
    yb.square().sum().backward()
    out["nobias"] = (bias is None, nobias.linear_fc1.bias is None, bool(torch.isfinite(xb.grad).all()),
                     nobias.linear_fc1.weight.grad is not None)
    # --- config resolution order -----------------------------------------------------------------
    explicit = Sparse24Config(method="mvue")
    cfg_attr = transformer_config()
    cfg_attr.sparse24 = Sparse24Config(method="soft_threshold")
    out["resolve_explicit"] = _mlp(cfg_attr, explicit).sparse24.method
    out["resolve_config"] = _mlp(cfg_attr).sparse24.method
    loop_args = Namespace(activation_sparse_method="mvue", activation_dense_warmup_steps=3,
                          activation_dense_feature_fraction=0.1, token_permutation=False,
                          sparse24_backend="emulated", sparse24_seed=None, seed=11, curr_iteration=None)
    real_args = mlp_module.megatron_lm_args
    mlp_module.megatron_lm_args = lambda: loop_args  # as under Megatron-LM's pretrain()
    try:
        s = _mlp(transformer_config()).sparse24
        out["resolve_args"] = (s.method, s.dense_warmup_steps, s.dense_feature_fraction, s.token_permutation,
                               s.backend, s.seed)
        loop_args.activation_dense_feature_fraction = 1.5
        out["resolve_bad_args"] = _error(lambda: _mlp(transformer_config()))
        loop_args.activation_dense_feature_fraction = 0.1
        # the warmup counter follows the loop's iteration, without any call from the user
        follower = _mlp(transformer_config())
        loop_args.curr_iteration = 2
        follower(torch.randn(SEQ, 2, cfg.hidden_size))
        first = (follower.optimizer_step, follower.sparse_active)
        loop_args.curr_iteration = 3
        follower(torch.randn(SEQ, 2, cfg.hidden_size))
        out["follows_loop"] = (first, (follower.optimizer_step, follower.sparse_active))
    finally:
        mlp_module.megatron_lm_args = real_args
    out["resolve_default"] = _mlp(transformer_config()).sparse24 == Sparse24Config()
    # --- the three spec entry points build working GPTs -----------------------------------------
    tokens = torch.randint(0, VOCAB, (2, SEQ))
    pos = torch.arange(SEQ)[None].expand(2, SEQ)
    mask = torch.tril(torch.ones(SEQ, SEQ, dtype=torch.bool))[None, None].logical_not()
    losses = {}
    cfg_specs = transformer_config()
    cfg_specs.sparse24 = Sparse24Config(dense_warmup_steps=0)
    for name, spec in (("function", specs.get_gpt_layer_sparse24_spec(Sparse24Config(dense_warmup_steps=0))),
                       ("module_object", specs.SPARSE24_LAYER_SPEC),
                       ("callable", specs.sparse24_layer_spec(cfg_specs))):
        model = GPTModel(config=cfg_specs, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=SEQ)
        loss = model(tokens, pos, mask, labels=tokens).mean()
        loss.backward()
        mlps = [m for m in model.modules() if isinstance(m, Sparse24MLP)]
        losses[name] = (float(loss), len(mlps), all(m.sparse_active for m in mlps),
                        all(m.linear_fc1.weight.grad is not None for m in mlps))
    out["specs"] = losses
    import functools
    import inspect

    partial_spec = functools.partial(specs.sparse24_layer_spec, sparse24_config=Sparse24Config(method="mvue"))
    out["partial_spec_has_vp_stage"] = "vp_stage" in inspect.signature(partial_spec).parameters
    out["partial_spec_method"] = partial_spec(transformer_config(), vp_stage=None).submodules.mlp.params[
        "sparse24_config"].method
    model = GPTModel(config=cfg_specs, transformer_layer_spec=specs.SPARSE24_LAYER_SPEC, vocab_size=VOCAB,
                     max_sequence_length=SEQ)
    out["set_step"] = (megatron_sparse24.set_step(model, 7),
                       [m.optimizer_step for m in model.modules() if isinstance(m, Sparse24MLP)])
    megatron_sparse24.bridge_step_callback(SimpleNamespace(model=[model], state=SimpleNamespace(
        train_state=SimpleNamespace(step=9))))
    out["bridge_step"] = [m.optimizer_step for m in model.modules() if isinstance(m, Sparse24MLP)]
    # --- the process groups megatron-core >= 0.18 passes to its MLP slot ---------------------------
    group = parallel_state.get_tensor_model_parallel_group()
    out["pg_collection"] = Sparse24MLP(
        cfg, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
        pg_collection=SimpleNamespace(tp=group), is_mtp_layer=False, name="decoder.layers.0.mlp").tp_group is group
    # --- the 2:4 path runs fc1/fc2's forward pre-hooks (DDP's parameter all-gather waits there) ----
    hooked = _mlp(cfg, Sparse24Config(dense_warmup_steps=0))
    calls = []
    hooked.linear_fc1.register_forward_pre_hook(lambda module, args: calls.append("fc1"))
    hooked.linear_fc2.register_forward_pre_hook(lambda module, args, kwargs: calls.append("fc2"), with_kwargs=True)
    hooked(torch.randn(SEQ, 2, cfg.hidden_size))
    out["pre_hooks"] = calls
    # --- a counter nothing advances is reported, once -------------------------------------------
    stuck = _mlp(cfg, Sparse24Config(dense_warmup_steps=2))
    moved = _mlp(cfg, Sparse24Config(dense_warmup_steps=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(6):
            stuck(torch.randn(SEQ, 2, cfg.hidden_size))
            moved(torch.randn(SEQ, 2, cfg.hidden_size))
            if i < 2:
                megatron_sparse24.step(moved)
        with torch.no_grad():  # evaluation does not count
            for _ in range(6):
                moved.eval()
                moved(torch.randn(SEQ, 2, cfg.hidden_size))
    out["step_warnings"] = [(str(w.message), stuck.optimizer_step, moved.sparse_active) for w in caught
                            if issubclass(w.category, Sparse24StepWarning)]
    # --- SDPA attention core == megatron's DotProductAttention ------------------------------------
    torch.manual_seed(3)
    outs = []
    for attention in ("sdpa", "local"):
        torch.manual_seed(3)
        model = GPTModel(config=transformer_config(), transformer_layer_spec=specs.get_gpt_layer_sparse24_spec(
            Sparse24Config(dense_warmup_steps=100), attention=attention), vocab_size=VOCAB, max_sequence_length=SEQ)
        outs.append(model(tokens, pos, mask))
    out["sdpa_vs_local"] = float((outs[0] - outs[1]).abs().max())
    parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def res():
    return spawn(mlp_scenarios, 1)


def test_build_time_validation(res):
    assert "gated_linear_unit=False" in res["err_glu"]
    assert "squared_relu" in res["err_act"]
    assert "multiple of 4" in res["err_width"]
    assert "multiple of 64" in res["err_align"]
    assert "backend='cutlass'" in res["err_align_cutlass"] and "multiple of 64" in res["err_align_cutlass"]


def test_cuda_graphs_that_capture_the_mlp_are_refused(res):
    errors = res["err_graphs"]
    assert errors["te_attn"] is None  # Transformer Engine's graphs of attention only: the MLP eager, builds
    for name in ("layer", "mlp", "te", "iteration", "attn"):
        msg = errors[name]
        assert msg and msg.startswith("ValueError") and "CUDA graphs" in msg, (name, msg)
        assert "--cuda-graph-impl none" in msg and "--cuda-graph-impl transformer_engine --cuda-graph-modules attn" in msg
    assert "whole layers" in errors["layer"] and "'mlp'" in errors["mlp"]
    assert "whole forward and backward" in errors["iteration"] and "whole forward" in errors["attn"]


def test_cuda_graph_scope_across_megatron_core_releases():
    from types import SimpleNamespace as NS

    from megatron_sparse24.mcore_compat import mlp_in_training_cuda_graph as captured

    attn, mlp, full = (NS(name=n) for n in ("attn", "mlp", "full_iteration"))  # enum members, by name
    assert captured(NS(cuda_graph_impl="none", cuda_graph_modules=[])) is None
    assert captured(NS()) is None  # a config without the fields
    # 0.19: cuda_graph_modules (scope None after __post_init__), full_iteration an implementation; the
    # local implementation graphs a dense layer's whole forward for 'attn' too, Transformer Engine's does not
    assert "'attn'" in captured(NS(cuda_graph_impl="local", cuda_graph_modules=[attn], cuda_graph_scope=None))
    assert captured(NS(cuda_graph_impl="transformer_engine", cuda_graph_modules=[attn], cuda_graph_scope=None)) is None
    assert "whole layers" in captured(NS(cuda_graph_impl="local", cuda_graph_modules=[], cuda_graph_scope=None))
    assert "'mlp'" in captured(NS(cuda_graph_impl="transformer_engine", cuda_graph_modules=[attn, mlp]))
    assert "full_iteration" in captured(NS(cuda_graph_impl="full_iteration", cuda_graph_modules=[]))
    # up to 0.18: cuda_graph_scope, full_iteration a scope
    assert captured(NS(cuda_graph_impl="transformer_engine", cuda_graph_scope=[attn])) is None
    assert captured(NS(cuda_graph_impl="local", cuda_graph_scope=[attn])) is not None
    assert "whole forward and backward" in captured(NS(cuda_graph_impl="local", cuda_graph_scope=[full]))
    assert "whole layers" in captured(NS(cuda_graph_impl="local", cuda_graph_scope="full"))


def test_warmup_switch(res):
    torch.testing.assert_close(res["warm_out"], res["dense_out"])  # dense warmup == megatron's MLP
    assert res["n_stepped"] == 1 and res["sparse_active"]
    assert not torch.allclose(res["sparse_out"], res["warm_out"], atol=1e-4)
    assert (res["sparse_out"] - res["warm_out"]).norm() < 0.5 * res["warm_out"].norm()
    torch.testing.assert_close(res["sparse_bias"], res["fc2_bias"])  # fc2 bias returned, not added


def test_gradient_accumulation_fusion_writes_main_grad(res):
    for main_grad_delta, ref_grad, flagged in res["gaf"]:
        torch.testing.assert_close(main_grad_delta, ref_grad, rtol=1e-5, atol=1e-6)
        assert flagged


def test_config_resolution_order(res):
    assert res["resolve_explicit"] == "mvue"
    assert res["resolve_config"] == "soft_threshold"
    assert res["resolve_args"] == ("mvue", 3, 0.1, False, "emulated", 11)
    assert "dense_feature_fraction=1.5" in res["resolve_bad_args"]  # invalid flags raise, never defaults
    assert res["resolve_default"]


def test_warmup_counter_follows_megatron_lm_iteration(res):
    assert res["follows_loop"] == ((2, False), (3, True))


def test_bridge_step_callback_sets_the_counter(res):
    assert res["bridge_step"] == [9, 9]


def test_process_groups_from_pg_collection(res):
    assert res["pg_collection"]


def test_sparse_path_runs_linear_pre_hooks(res):
    assert res["pre_hooks"] == ["fc1", "fc2"]


def test_counter_that_never_moves_warns_once(res):
    (message, stuck_step, moved_active), = res["step_warnings"]
    assert "stay dense" in message and "megatron_sparse24.step(model)" in message and "bridge_step_callback" in message
    assert stuck_step == 0 and moved_active


def test_three_spec_entry_points_build_working_models(res):
    for name, (loss, n_mlps, active, has_grads) in res["specs"].items():
        assert torch.isfinite(torch.tensor(loss)) and n_mlps == 2 and active and has_grads, name


def test_sdpa_attention_matches_megatron_local(res):
    assert res["sdpa_vs_local"] < 1e-4


def test_sparsity_telemetry(res):
    # dense warmup counts activation sparsity too (same input), with nothing dropped
    (warm,) = res["stats_before"]
    assert warm["activation_sparsity"] == pytest.approx(res["true_sparsity"], abs=1e-6)
    assert warm["dropped_by_24"] == 0
    (st,) = res["stats_after"]
    assert st["activation_sparsity"] == pytest.approx(res["true_sparsity"], abs=1e-6)
    assert 0 < st["dropped_by_24"] < 1
    assert st["dense_feature_share"] == pytest.approx(1.0)  # dense_feature_fraction=1 in this layer
    assert res["stats_reset"][0]["activation_sparsity"] is None


def test_nemo_style_partial_spec_and_set_step(res):
    assert res["partial_spec_has_vp_stage"] and res["partial_spec_method"] == "mvue"
    assert res["set_step"] == (2, [7, 7])


def test_soft_threshold_scale_is_frozen_and_used(res):
    scale, first, again, doubled = res["soft_scale"]
    assert scale > 0 and torch.equal(first, again)
    torch.testing.assert_close(doubled, 2 * first, rtol=1e-5, atol=1e-6)


def test_biases_off(res):
    assert res["nobias"] == (True, True, True, True)


def test_narrow_per_rank_width_is_flagged_as_slow():
    from megatron_sparse24.mlp import NARROW_FC1_PER_RANK, narrow_width_warning

    # measured slower sparse than dense (H200): hidden 2048 x 1536 / 2048 per rank, hidden 4096 / 6144 x 1024
    for f, d in ((1536, 2048), (2048, 2048), (1024, 4096), (1024, 6144)):
        msg = narrow_width_warning(f, d)
        assert msg and f"{f} x hidden {d}" in msg and "tensor-parallel" in msg and "--sparse24-backend auto" in msg
    # measured faster: hidden 2048 x 4096, hidden 4096 x 2048, hidden 6144 x 3072, 7B-class per rank
    for f, d in ((4096, 2048), (2048, 4096), (3072, 6144), (16384, 4096)):
        assert narrow_width_warning(f, d) is None
    assert NARROW_FC1_PER_RANK == 4096 * 2048
