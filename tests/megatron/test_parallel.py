"""Sparse24MLP inside a megatron-core GPT on CPU (gloo): TP, SP and PP equivalences.

With a TP-invariant init (every parameter drawn from its global name), TP=2, TP=2+SP, PP=2 and
TP=2+SP+PP=2 are the same model as TP=1. Where the math is identical (dense warmup; the sparse path
with dense_feature_fraction=1 and no permutation) losses and every gradient agree to 1e-5. With the
full recipe, each TP rank picks its own 5% dense features and permutes its own shard, so only the
feature-wise 2:4 of dW1/dW2 differs: losses and all other gradients still agree to 1e-5, and the two
FFN weight gradients stay within the bound below.
"""

import pytest
import torch

from tests.megatron.harness import gpt_runs, spawn

pytestmark = pytest.mark.slow

DENSE = {"dense_warmup_steps": 10}
EXACT = {"dense_warmup_steps": 0, "dense_feature_fraction": 1.0, "token_permutation": False}
RECIPE = {"dense_warmup_steps": 0}
#: The recipe on the dense-GEMM engine: the same selections, the permutation applied inside the kernels.
RECIPE_DENSE_GEMMS = {"dense_warmup_steps": 0, "backend": "dense"}
MVUE = {"dense_warmup_steps": 0, "method": "mvue"}  # sampled: both engines must draw the same samples
MVUE_DENSE_GEMMS = dict(MVUE, backend="dense")
FFN_WEIGHTS = ("mlp.linear_fc1.weight", "mlp.linear_fc2.weight")
#: Relative Frobenius distance allowed between TP=1 and TP=2 FFN weight gradients, full recipe.
RECIPE_DW_BOUND = 0.35


def _scenarios(**par):
    return [dict(par, sparse24=DENSE), dict(par, sparse24=EXACT), dict(par, sparse24=RECIPE)]


@pytest.fixture(scope="module")
def runs():
    one = spawn(gpt_runs, 1, _scenarios(tp=1) + [dict(tp=1, sparse24=EXACT, n_micro=4),
                                                 dict(tp=1, sparse24=RECIPE_DENSE_GEMMS),
                                                 dict(tp=1, sparse24=MVUE), dict(tp=1, sparse24=MVUE_DENSE_GEMMS)])
    two = spawn(gpt_runs, 2, _scenarios(tp=2) + _scenarios(tp=2, sp=True)
                + [dict(tp=1, pp=2, sparse24=DENSE, n_micro=4), dict(tp=1, pp=2, sparse24=EXACT, n_micro=4),
                   dict(tp=2, sp=True, sparse24=RECIPE_DENSE_GEMMS), dict(tp=2, sp=True, sparse24=MVUE),
                   dict(tp=2, sp=True, sparse24=MVUE_DENSE_GEMMS)])
    # tp=4 + SP: the layer permutes each rank's shard for the 2:4 engine (mlp.layer_permutes_shards)
    four = spawn(gpt_runs, 4, [dict(tp=2, pp=2, sp=True, sparse24=DENSE, n_micro=4),
                               dict(tp=2, pp=2, sp=True, sparse24=EXACT, n_micro=4),
                               dict(tp=4, sp=True, sparse24=RECIPE), dict(tp=4, sp=True, sparse24=RECIPE_DENSE_GEMMS),
                               dict(tp=4, sp=True, sparse24=MVUE), dict(tp=4, sp=True, sparse24=MVUE_DENSE_GEMMS)])
    return {
        ("tp1", "dense"): one[0], ("tp1", "exact"): one[1], ("tp1", "recipe"): one[2], ("tp1m4", "exact"): one[3],
        ("tp2", "dense"): two[0], ("tp2", "exact"): two[1], ("tp2", "recipe"): two[2],
        ("tp2sp", "dense"): two[3], ("tp2sp", "exact"): two[4], ("tp2sp", "recipe"): two[5],
        ("pp2", "dense"): two[6], ("pp2", "exact"): two[7],
        ("tp1", "recipe_dense_gemms"): one[4], ("tp2sp", "recipe_dense_gemms"): two[8],
        ("tp1", "mvue"): one[5], ("tp1", "mvue_dense_gemms"): one[6],
        ("tp2sp", "mvue"): two[9], ("tp2sp", "mvue_dense_gemms"): two[10],
        ("tp2sp_pp2", "dense"): four[0], ("tp2sp_pp2", "exact"): four[1],
        ("tp4sp", "recipe"): four[2], ("tp4sp", "recipe_dense_gemms"): four[3],
        ("tp4sp", "mvue"): four[4], ("tp4sp", "mvue_dense_gemms"): four[5],
    }


def _flat(losses):
    return [x for step in losses for x in step]


def _assert_same(a, b, skip=()):
    assert _flat(a["losses"]) == pytest.approx(_flat(b["losses"]), abs=1e-5)
    assert sorted(a["grads"]) == sorted(b["grads"])
    for name in a["grads"]:
        if name.endswith(skip):
            continue
        torch.testing.assert_close(a["grads"][name], b["grads"][name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("par", ["tp2", "tp2sp"])
@pytest.mark.parametrize("mode", ["dense", "exact"])
def test_tensor_and_sequence_parallel_equal_tp1(runs, par, mode):
    _assert_same(runs[("tp1", mode)], runs[(par, mode)])


@pytest.mark.parametrize("par", ["tp2", "tp2sp"])
def test_full_recipe_tp2_close_to_tp1(runs, par):
    ref, got = runs[("tp1", "recipe")], runs[(par, "recipe")]
    _assert_same(ref, got, skip=FFN_WEIGHTS)  # the forward, dX and all other grads are exact
    for name in ref["grads"]:
        if name.endswith(FFN_WEIGHTS):
            a, b = ref["grads"][name], got["grads"][name]
            rel = float((a - b).norm() / a.norm())
            assert 0 < rel < RECIPE_DW_BOUND, (name, rel)


@pytest.mark.parametrize("par", ["tp1", "tp2sp", "tp4sp"])
def test_dense_gemm_engine_equals_the_2to4_engine(runs, par):
    """Same model, same 2:4 selections (both engines get the gathered tokens' permutation, except the
    2:4 engine at tp=4 + SP, whose tokens the layer permutes shard by shard: the same permutation):
    every gradient, the FFN weights' included, agrees."""
    _assert_same(runs[(par, "recipe")], runs[(par, "recipe_dense_gemms")])
    _assert_same(runs[(par, "mvue")], runs[(par, "mvue_dense_gemms")])


def test_sparse_differs_from_dense(runs):
    assert _flat(runs[("tp1", "exact")]["losses"]) != pytest.approx(_flat(runs[("tp1", "dense")]["losses"]), abs=1e-4)


def test_pipeline_parallel_equal_pp1(runs):
    # PP runs used 4 micro-batches; compare with the 1-process 4-micro-batch run.
    _assert_same(runs[("tp1m4", "exact")], runs[("pp2", "exact")])


def test_tp2_sp_pp2_four_processes_equal_one(runs):
    _assert_same(runs[("tp1m4", "exact")], runs[("tp2sp_pp2", "exact")])
    assert _flat(runs[("tp2sp_pp2", "dense")]["losses"]) == pytest.approx(_flat(runs[("pp2", "dense")]["losses"]),
                                                                          abs=1e-5)
