"""Save and resume training with megatron.core.dist_checkpointing (Megatron-LM's directory layout).

    <save>/iter_0000100/                 one distributed checkpoint per save
    <save>/latest_checkpointed_iteration.txt

A checkpoint holds the model (incl. every Sparse24MLP's warmup counter, seed and frozen scale in
``_extra_state``), the optimizer, the LR scheduler, the iteration and consumed samples, and each
rank's RNG states, so that a resumed run continues exactly like an uninterrupted one. Checkpoints
reshard across tensor/pipeline sizes; a dense squared-ReLU GPT checkpoint loads into a sparse model.
"""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.validation import StrictHandling
from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
from megatron.core.utils import unwrap_model

__all__ = ["save_checkpoint", "load_checkpoint", "latest_iteration"]

TRACKER = "latest_checkpointed_iteration.txt"


def _iter_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str):
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return int(f.read().strip())


def _rng_state() -> ShardedObject:
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": get_cuda_rng_tracker().get_states(),
    }
    pp, tp = parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()
    shape = (parallel_state.get_pipeline_model_parallel_world_size(),
             parallel_state.get_tensor_model_parallel_world_size())
    return ShardedObject("rng_state", state, shape, (pp, tp),
                         replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True))


def _set_rng_state(state: dict):
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _state_dict(model, optimizer, scheduler, iteration, consumed, with_optim, is_loading):
    sd = {"model": unwrap_model(model).sharded_state_dict(prefix="")}  # keys without DDP/fp16 wrappers
    if with_optim:
        # distributed optimizer: the canonical per-parameter layout, reshardable across TP/PP/DP
        sd["optimizer"] = optimizer.sharded_state_dict(
            sd["model"], is_loading=is_loading, metadata={"distrib_optim_sharding_type": "fully_reshardable"})
        sd["opt_param_scheduler"] = scheduler.state_dict()
    sd["iteration"] = iteration
    sd["consumed_train_samples"] = consumed
    sd["rng_state"] = _rng_state()
    return sd


def save_checkpoint(root: str, iteration: int, model, optimizer, scheduler, consumed_samples: int,
                    save_optim: bool = True) -> str:
    path = _iter_dir(root, iteration)
    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_state_dict(model, optimizer, scheduler, iteration, consumed_samples, save_optim, False),
                            path)
    dist.barrier()
    if dist.get_rank() == 0:  # atomically: a crash mid-write must not leave a garbled tracker
        tmp = os.path.join(root, f".{TRACKER}.tmp")
        with open(tmp, "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(root, TRACKER))
    dist.barrier()
    return path


def _ensure_optimizer_state(optimizer):
    """A fresh DistributedOptimizer cannot describe its state for loading (without apex/TE it asserts
    on Adam's 'step'); megatron fills it with dummy values that the load then replaces."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "_init_optimizer_states_with_dummy_values") and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


@contextlib.contextmanager
def _keep_torch_adam_step(optimizer):
    """megatron-core 0.16.1's "fully_reshardable" load copies every key of each parameter's optimizer
    state from the checkpoint, including torch Adam's scalar 'step', which that format stores in the
    param groups instead (KeyError: 'step' without apex/TE). ``load_state_dict`` has already restored
    'step' by then, so hand the copy the tensor it already holds. Scoped to this load (instance
    attribute, removed afterwards)."""
    patched = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(opt, "_set_main_param_and_optimizer_states"):
            continue
        original = opt._set_main_param_and_optimizer_states

        def set_states(model_param, tensors, opt=opt, original=original):
            if "step" not in tensors:
                group_index, group_order = opt.model_param_group_index_map[model_param]
                main_param = opt.optimizer.param_groups[group_index]["params"][group_order]
                state = opt.optimizer.state.get(main_param, {})
                if "step" in state:
                    tensors = {**tensors, "step": state["step"]}
            return original(model_param, tensors)

        opt._set_main_param_and_optimizer_states = set_states
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states


def _unshare_adam_steps(optimizer) -> None:
    """megatron-core 0.16.1's distributed optimizer (without apex/TE) restores torch Adam's 'step' as
    ONE tensor shared by every parameter's state; torch then increments it in place once per
    parameter, so after the first resumed update the bias correction runs thousands of steps ahead
    and the resumed run drifts from an uninterrupted one. Give every parameter its own copy."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None or not hasattr(inner, "state"):
            continue
        for state in inner.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def load_checkpoint(root: str, model, optimizer, scheduler, load_optim: bool = True, load_rng: bool = True):
    """Restore the latest checkpoint under ``root``; returns (iteration, consumed_samples), or (0, 0)
    if there is none. Keys the checkpoint lacks (a dense model's checkpoint has no Sparse24MLP state)
    keep their fresh values."""
    iteration = latest_iteration(root)
    if iteration is None:
        return 0, 0
    path = _iter_dir(root, iteration)
    if load_optim:
        _ensure_optimizer_state(optimizer)
    template = _state_dict(model, optimizer, scheduler, 0, 0, load_optim, True)
    if not load_rng:
        del template["rng_state"]
    state = dist_checkpointing.load(template, path, strict=StrictHandling.LOG_UNEXPECTED)
    unwrap_model(model).load_state_dict(state["model"])
    if load_optim and "optimizer" in state:
        with _keep_torch_adam_step(optimizer):
            optimizer.load_state_dict(state["optimizer"])
        _unshare_adam_steps(optimizer)
        scheduler.load_state_dict(state["opt_param_scheduler"])
    if load_rng and "rng_state" in state:
        _set_rng_state(state["rng_state"])
    return int(state["iteration"]), int(state["consumed_train_samples"])
