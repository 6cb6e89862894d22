"""training/checkpointing.py pieces that run without GPUs (the full save/resume runs are in
tests/test_pretrain_gpt_sparse.py)."""

from types import SimpleNamespace

import torch

from megatron_sparse24.training.checkpointing import _unshare_adam_steps


def _adam_loaded_like_megatron_dist_opt(params, step: float):
    """An AdamW whose state was loaded the way megatron-core 0.16.1's distributed optimizer does it
    without apex/TE: one 'step' tensor object shared by every parameter's state."""
    opt = torch.optim.AdamW(params, lr=1e-2)
    shared = torch.tensor(step)
    group = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    opt.load_state_dict({"state": {i: {"exp_avg": torch.full_like(p, 0.1), "exp_avg_sq": torch.full_like(p, 0.2),
                                       "step": shared} for i, p in enumerate(params)},
                         "param_groups": [{**group, "params": list(range(len(params)))}]})
    return opt


def test_unshared_steps_make_the_resumed_update_exact():
    torch.manual_seed(0)
    init = [torch.randn(5) for _ in range(3)]
    grads = [torch.randn(5) for _ in range(3)]
    runs = {}
    for fix in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = _adam_loaded_like_megatron_dist_opt(params, 3.0)
        assert len({id(opt.state[p]["step"]) for p in params}) == 1  # the bug's precondition
        if fix:
            _unshare_adam_steps(SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=opt)]))
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        runs[fix] = ([float(opt.state[p]["step"]) for p in params], [p.detach().clone() for p in params])
    assert runs[False][0] != [4.0, 4.0, 4.0]  # shared: incremented once per parameter
    assert runs[True][0] == [4.0, 4.0, 4.0]
    # the fixed update equals a fresh optimizer holding the same (unshared) state
    params = [torch.nn.Parameter(t.clone()) for t in init]
    ref = torch.optim.AdamW(params, lr=1e-2)
    for p, g in zip(params, grads):
        ref.state[p] = {"exp_avg": torch.full_like(p, 0.1), "exp_avg_sq": torch.full_like(p, 0.2),
                        "step": torch.tensor(3.0)}
        p.grad = g.clone()
    ref.step()
    for got, want in zip(runs[True][1], params):
        assert torch.equal(got, want.detach())
    assert not all(torch.equal(a, b.detach()) for a, b in zip(runs[False][1], params))
