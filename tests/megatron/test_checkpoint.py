"""Distributed checkpoints of Sparse24MLP models (megatron.core.dist_checkpointing, CPU/gloo):
TP=2 -> TP=1 -> TP=2 resharding, dense megatron GPT <-> sparse GPT interchange, and the layer's
state (warmup counter, seed, frozen soft-threshold scale) coming back on resume."""

import pytest
import torch

from tests.megatron.harness import batches, build, collect_full, forward_backward, spawn

pytestmark = pytest.mark.slow

SOFT = {"dense_warmup_steps": 1, "method": "soft_threshold", "seed": 77}


def _layer_states(ddp):
    from megatron_sparse24.mlp import Sparse24MLP

    return [m.get_extra_state() for m in ddp.modules() if isinstance(m, Sparse24MLP)]


def _save(ddp, path):
    from megatron.core import dist_checkpointing

    import os

    os.makedirs(path, exist_ok=True)
    dist_checkpointing.save(ddp.module.sharded_state_dict(prefix=""), path)


def _load(ddp, path, strict="assume_ok_unexpected"):
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(ddp.module.sharded_state_dict(prefix=""), path, strict=strict)
    ddp.module.load_state_dict(state)


def _loss(ddp, config, seed=5):
    return forward_backward([ddp], batches(2, seed=seed), config)


def checkpoint_scenarios(rank, world_size, tmp):
    import torch.distributed as dist

    from megatron.core import parallel_state

    import megatron_sparse24

    out = {}
    # 1. a TP=2 + SP sparse model two optimizer steps in (past warmup, scale frozen): save
    ddp, config = build(2, 1, True, SOFT)
    for step in range(2):
        ddp.zero_grad_buffer()
        forward_backward([ddp], batches(2, seed=step), config)
        megatron_sparse24.step(ddp)
    out["params_tp2"] = collect_full(ddp, "param")
    out["state_tp2"] = _layer_states(ddp)
    out["next_loss_tp2"] = _loss(ddp, config)
    _save(ddp, f"{tmp}/tp2")
    parallel_state.destroy_model_parallel()
    dist.barrier()

    # 2. load into a fresh TP=1 (DP=2) model built with another seed and other weights
    ddp, config = build(1, 1, False, {**SOFT, "seed": 5}, init=False)
    out["fresh_state"] = _layer_states(ddp)
    _load(ddp, f"{tmp}/tp2")
    out["params_tp1"] = collect_full(ddp, "param")
    out["state_tp1"] = _layer_states(ddp)
    out["next_loss_tp1"] = _loss(ddp, config)
    _save(ddp, f"{tmp}/tp1")
    parallel_state.destroy_model_parallel()
    dist.barrier()

    # 3. and back to TP=2
    ddp, config = build(2, 1, True, SOFT, init=False)
    _load(ddp, f"{tmp}/tp1")
    out["params_tp2_again"] = collect_full(ddp, "param")
    parallel_state.destroy_model_parallel()
    dist.barrier()

    # 4. megatron's own dense GPT (local spec, squared ReLU) loads our checkpoint ...
    ddp, config = build(1, 1, False, None, init=False, dense_megatron_spec=True)
    _load(ddp, f"{tmp}/tp2")
    out["params_dense"] = collect_full(ddp, "param")
    for p in ddp.module.parameters():  # make the dense model distinguishable, then save it
        with torch.no_grad():
            p.mul_(1.5)
    out["params_dense_scaled"] = collect_full(ddp, "param")
    _save(ddp, f"{tmp}/dense")
    parallel_state.destroy_model_parallel()
    dist.barrier()

    # 5. ... and we load its (no mlp._extra_state in it: layers keep their fresh state)
    ddp, config = build(2, 1, True, SOFT, init=False)
    _load(ddp, f"{tmp}/dense", strict="log_unexpected")
    out["params_from_dense"] = collect_full(ddp, "param")
    out["state_from_dense"] = _layer_states(ddp)
    parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return spawn(checkpoint_scenarios, 2, str(tmp_path_factory.mktemp("ckpt")))


def _same_params(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_reshard_tp2_tp1_tp2(ckpt):
    _same_params(ckpt["params_tp2"], ckpt["params_tp1"])
    _same_params(ckpt["params_tp2"], ckpt["params_tp2_again"])


def test_layer_state_comes_back(ckpt):
    assert all(s["optimizer_step"] == 2 and s["seed"] == 77 for s in ckpt["state_tp2"])
    assert all(s["soft_threshold_scale"] is not None and s["soft_threshold_scale"] > 0 for s in ckpt["state_tp2"])
    assert all(s["optimizer_step"] == 0 and s["seed"] == 5 and s["soft_threshold_scale"] is None
               for s in ckpt["fresh_state"])
    assert ckpt["state_tp1"] == ckpt["state_tp2"]


def test_resumed_model_continues_identically(ckpt):
    # same weights + restored step/seed/scale -> the next step's loss is the same (TP=2 -> TP=1)
    assert ckpt["next_loss_tp1"] == pytest.approx(ckpt["next_loss_tp2"], abs=1e-5)


def test_dense_megatron_gpt_loads_ours_and_we_load_its(ckpt):
    _same_params(ckpt["params_tp2"], ckpt["params_dense"])
    _same_params(ckpt["params_dense_scaled"], ckpt["params_from_dense"])
    assert all(s["optimizer_step"] == 0 for s in ckpt["state_from_dense"])
