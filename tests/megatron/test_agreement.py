"""Tuning decisions are the same on every tensor-parallel rank of a layer, whatever each rank measured
(two gloo ranks on CPU, fed different timings; one of them with its choice already in its cache)."""

import torch

from tests.megatron.harness import spawn


def _engines(rank, world_size):
    import torch.distributed as dist

    from megatron_sparse24 import engine, functional
    from megatron_sparse24.backends import CusparseltGemm

    gemm = CusparseltGemm(device_index=0)
    # rank 0 measures the 2:4 GEMMs faster at the first shape, the dense-GEMM engine at the second;
    # rank 1 the opposite, and it has the third shape's engine from its on-disk cache (it times nothing)
    fast = {(0, 64): "sparse", (0, 128): "dense", (1, 64): "dense", (1, 128): "sparse", (0, 256): "dense"}
    timed = []

    def fake_time(plan, alternatives, shape, *args):
        timed.append(shape[0])
        winner = fast[(rank, shape[0])]
        return {"sparse": 1.0 if winner == "sparse" else 2.0, "dense": 1.0 if winner == "dense" else 2.0}

    engine._time_engines = fake_time
    engine.auto_alternatives = lambda *a: ()
    if rank == 1:
        gemm.ffn_engines[((256, 32, 16), torch.bfloat16, "naive", False, True, True, 0)] = "sparse"
    plan = functional.FFNPlan(method="naive", n_dense=0, mvue_seed=0, gemm=gemm, engine="auto",
                              tuning_group=dist.group.WORLD)
    out = []
    for t in (64, 128, 256):
        for _ in range(2):  # the second call is the steady state: no collective, same answer
            out.append(engine.choose_engine(plan, (t, 32, 16), torch.bfloat16, torch.device("cpu"), False,
                                                True, True).engine)
    return {"rank": rank, "engines": out, "timed": timed, "cached": dict(gemm.ffn_engines)}


def _gemm_choices(rank, world_size):
    import torch.distributed as dist

    from megatron_sparse24.backends import CusparseltGemm, GemmChoice
    from megatron_sparse24.kernels.layout import compress24

    gemm = CusparseltGemm(device_index=0)
    gemm._tune = lambda a, b, tr: GemmChoice("sparse", 3) if rank == 0 else GemmChoice("dense")
    ran = []
    gemm._run = lambda choice, a, b, tr: ran.append(choice) or torch.zeros(a.rows, b.shape[1])
    dense = torch.randn(8, 16)
    keep = torch.zeros(8, 16, dtype=torch.bool)
    keep[:, 0::4] = keep[:, 1::4] = True
    a = compress24(dense.to(torch.bfloat16), keep)
    b = torch.randn(16, 4, dtype=torch.bfloat16)
    for _ in range(2):
        gemm.spmm(a, b, group=dist.group.WORLD)
    return [(c.kind, c.alg_id) for c in ran] + [dist.get_rank()]


def _layer_tuning_groups(rank, world_size):
    """The group each Sparse24MLP hands its plan, at TP=2 + SP (the two ranks share the tokens) and at
    TP=1 with two data-parallel replicas (each decides alone)."""
    from megatron.core import parallel_state

    from megatron_sparse24 import mlp
    from tests.megatron.harness import batches, build, forward_backward

    seen = []
    make_plan = mlp.make_plan

    def recording(*args, **kwargs):
        seen.append(kwargs["tuning_group"])
        return make_plan(*args, **kwargs)

    mlp.make_plan = recording
    out = []
    for tp, sp in ((2, True), (1, False)):
        model, config = build(tp, 1, sp, {"dense_warmup_steps": 0})
        seen.clear()
        forward_backward([model], batches(1), config)
        tp_group = parallel_state.get_tensor_model_parallel_group()
        out.append((len(seen) > 0, all(g is tp_group for g in seen), tp_group.size()))
        parallel_state.destroy_model_parallel()
    return out


def _gathered(fn):
    def run(rank, world_size):
        import torch.distributed as dist

        mine = fn(rank, world_size)
        every = [None] * world_size
        dist.all_gather_object(every, mine)
        return every
    return run


def _all_engines(rank, world_size):
    return _gathered(_engines)(rank, world_size)


def _all_gemm_choices(rank, world_size):
    return _gathered(_gemm_choices)(rank, world_size)


def test_the_layer_agrees_within_its_tensor_parallel_group_only():
    # data-parallel replicas may see other sequence lengths at the same step: a collective at a shape's
    # first use would not be reached by all of them together, so only the TP ranks (same tokens) agree
    assert spawn(_layer_tuning_groups, 2) == [(True, True, 2), (True, True, 1)]


def test_ranks_agree_on_the_ffn_engine_whatever_each_measured():
    first, second = spawn(_all_engines, 2)
    # the first rank's measurements decide: sparse at T=64, dense at T=128, dense at T=256 (rank 1's
    # cache said sparse, and it still took part in the agreement)
    assert first["engines"] == second["engines"] == ["sparse", "sparse", "dense", "dense", "dense", "dense"]
    assert first["timed"] == [64, 128, 256] and second["timed"] == [64, 128]
    assert sorted(second["cached"].values()) == ["dense", "dense", "sparse"]  # rank 1 remembers the agreed ones


def test_ranks_agree_on_each_gemm_choice():
    first, second = spawn(_all_gemm_choices, 2)
    assert first[:2] == second[:2] == [("sparse", 3), ("sparse", 3)]
