"""The layer-wise switch from dense warmup to 2:4 (Sparse24Config.switch), on CPU: the measured share,
the decision and its bounds, the guard warning, checkpointed state, and ranks that measure different
shares taking the same decision at the same step."""

import pytest
import torch

from megatron_sparse24 import ops
from tests.megatron.harness import SEQ, spawn, transformer_config

pytestmark = pytest.mark.slow


def test_dropped_by_24_sums_counts_the_two_smallest_of_each_group():
    y1 = torch.tensor([[3.0, -1.0, 2.0, 1.0, 0.0, 0.0, 5.0, -2.0]])  # relu^2: [9,0,4,1], [0,0,25,0]
    sums = ops.dropped_by_24_sums(y1)
    assert sums.dtype == torch.float64 and sums.shape == (3, 2)
    assert sums[0].tolist() == [1, 4]  # non-zeros: 1 dropped of 4
    assert sums[1].tolist() == [1, 39]  # L1: 1 of 9 + 4 + 1 + 25
    assert sums[2].tolist() == [1, 81 + 16 + 1 + 625]  # L2
    y = torch.randn(64, 32)
    torch.testing.assert_close(ops.dropped_by_24_sums(y[:20]) + ops.dropped_by_24_sums(y[20:]),
                               ops.dropped_by_24_sums(y))  # shards add up


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dropped_by_24_sums_matches_a_topk_of_each_group(dtype):
    # ties and zeros on purpose: small integers, half of them negative (relu -> 0)
    y1 = (torch.randint(-6, 7, (96, 64)).to(dtype) * 0.5).to(dtype)
    y1[:8] = torch.randn(8, 64).to(dtype)
    x = (torch.relu(y1.double()) ** 2).reshape(-1, 4)
    smallest = x.topk(2, dim=-1, largest=False).values
    want = torch.tensor([[(smallest > 0).sum().item(), (x > 0).sum().item()],
                         [smallest.sum().item(), x.sum().item()],
                         [(smallest ** 2).sum().item(), (x ** 2).sum().item()]], dtype=torch.float64)
    torch.testing.assert_close(ops.dropped_by_24_sums(y1), want, rtol=1e-12, atol=0)


def _mlp(cfg, sparse24):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules

    from megatron_sparse24.mlp import Sparse24MLP

    return Sparse24MLP(cfg, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
                       sparse24_config=sparse24)


def _train(mlp, steps, make_input):
    """One training forward + backward per optimizer step; returns the step each layer state changed."""
    import megatron_sparse24

    for _ in range(steps):
        x = make_input().requires_grad_()
        mlp(x)[0].sum().backward()
        megatron_sparse24.step(mlp)


def switch_scenarios(rank, world_size):
    import logging

    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_sparse24 import Sparse24Config

    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(7)
    cfg = transformer_config()
    out = {}
    x = lambda: torch.randn(SEQ, 2, cfg.hidden_size)  # noqa: E731
    # lenient threshold: switches at the first decision at or after the warmup and the window
    easy = _mlp(cfg, Sparse24Config(switch="measured", switch_threshold=0.9, switch_window=20, dense_warmup_steps=15))
    _train(easy, 41, x)
    out["easy"] = (easy.switched_at, easy.below_since, easy.sparse_active, dict(easy.dropped_shares))
    # strict threshold: stays dense; switch_max_steps forces it
    strict = _mlp(cfg, Sparse24Config(switch="measured", switch_threshold=1e-6, switch_window=0, dense_warmup_steps=0))
    forced = _mlp(cfg, Sparse24Config(switch="measured", switch_threshold=1e-6, switch_window=0, dense_warmup_steps=0,
                                      switch_max_steps=25))
    _train(strict, 41, x)
    _train(forced, 41, x)
    out["strict"] = (strict.switched_at, strict.sparse_active)
    out["forced"] = (forced.switched_at, forced.sparse_active)
    # the guard: a layer running 2:4 that drops more than twice the threshold warns (once per episode)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("megatron_sparse24.mlp").addHandler(handler)
    guarded = _mlp(cfg, Sparse24Config(switch="steps", dense_warmup_steps=0, switch_threshold=0.01))
    _train(guarded, 41, x)
    out["guard"] = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    # checkpointed: a fresh layer loading the state decides alike
    state = easy.state_dict()
    fresh = _mlp(cfg, Sparse24Config(switch="measured", switch_threshold=0.9, switch_window=20, dense_warmup_steps=15))
    fresh.load_state_dict(state)
    out["restored"] = (fresh.optimizer_step, fresh.switched_at, fresh.below_since, fresh.sparse_active)
    parallel_state.destroy_model_parallel()
    return out


def agreement_scenario(rank, world_size):
    """Two data-parallel ranks measure different shares (rank 0 alone would switch, rank 1 alone would
    not): both must take the decision of the summed measurement, at the same step."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_sparse24 import Sparse24Config
    from megatron_sparse24 import mlp as mlp_module

    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(7)
    local_share = (0.01, 0.5)[rank]
    measured = []

    def rank_measure(y1):  # this rank's own view: non-zeros, L1 and L2 all at local_share of 1000
        measured.append(local_share)
        return torch.tensor([[1000 * local_share, 1000.0]] * 3, dtype=torch.float64)

    mlp_module.ops.dropped_by_24_sums = rank_measure  # this worker process only
    cfg = transformer_config()
    mlp = _mlp(cfg, Sparse24Config(switch="measured", switch_threshold=0.2, switch_window=0, dense_warmup_steps=0))
    lenient = _mlp(cfg, Sparse24Config(switch="measured", switch_threshold=0.3, switch_window=0, dense_warmup_steps=0))
    _train(mlp, 31, lambda: torch.randn(SEQ, 2, cfg.hidden_size))
    _train(lenient, 31, lambda: torch.randn(SEQ, 2, cfg.hidden_size))
    parallel_state.destroy_model_parallel()
    gathered = [None, None]
    torch.distributed.all_gather_object(gathered, (measured[0], mlp.switched_at, mlp.dropped_shares["nonzeros"],
                                                   lenient.switched_at))
    return gathered


@pytest.fixture(scope="module")
def res():
    return spawn(switch_scenarios, 1)


def test_measured_switch_waits_for_warmup_and_window(res):
    switched_at, below_since, active, shares = res["easy"]
    # measurements at 0, 10, 20, ...; each read one measurement later; below since 0 -> 20 steps at step 20
    assert switched_at == 20 and below_since == 0 and active
    assert 0 < shares["l2"] < shares["l1"] < shares["nonzeros"] < 0.9


def test_strict_threshold_stays_dense_unless_forced(res):
    assert res["strict"] == (None, False)
    assert res["forced"] == (30, True)  # the first decision at or after switch_max_steps=25


def test_guard_warns_when_2_4_drops_too_much(res):
    assert res["guard"] and "more than twice the 1.00% threshold" in res["guard"][0]
    assert len(res["guard"]) == 1  # once while it stays above


def test_switch_state_is_checkpointed(res):
    assert res["restored"] == (41, 20, 0, True)


def test_ranks_that_measure_differently_agree():
    (local0, at0, share0, lenient0), (local1, at1, share1, lenient1) = spawn(agreement_scenario, 2)
    assert (local0, local1) == (0.01, 0.5)  # rank 0 alone would switch at 0.2, rank 1 alone would not
    assert share0 == share1 == pytest.approx(0.255)  # both decide on the summed measurement...
    assert at0 is None and at1 is None  # ...and stay dense together at 0.2,
    assert lenient0 == lenient1 == 10  # and switch together, at the same step, at 0.3
