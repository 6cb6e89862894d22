"""Run megatron-core on CPU (gloo): the few patches it needs, applied only where there is no GPU.

megatron-core assumes CUDA in a handful of places: ``torch.cuda.current_device()`` as an allocation
device, the CUDA RNG for its RNG tracker, ``torch.cuda.synchronize()``, the optimizer's gradient
clipping (asserts CUDA grads), and a few ``device="cuda"`` literals in the pipeline schedules and
the grad-norm code. ``enable_cpu_megatron()`` redirects the first four to CPU equivalents for the
whole process (no-op when CUDA is available: nothing is ever patched on a
GPU machine); ``cuda_literals_to_cpu()`` is a context manager that rewrites ``device="cuda"``
arguments inside a block (wrap the forward/backward schedule call with it).

Used by the tests and by ``pretrain_gpt_sparse.py`` on CPU, so the quickstart runs on a laptop.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["enable_cpu_megatron", "cuda_literals_to_cpu", "cpu_patched"]


def cpu_patched() -> bool:
    """True once ``enable_cpu_megatron`` has patched this process."""
    return getattr(torch.cuda, "_megatron_sparse24_cpu", False)


def enable_cpu_megatron() -> bool:
    """Patch this CPU-only process so megatron-core runs on CPU. Returns True if patched.

    Does nothing (returns False) when CUDA is available. Idempotent.
    """
    if torch.cuda.is_available():
        return False
    if cpu_patched():
        return True
    from megatron.core.tensor_parallel import random as mcore_random

    def get_rng_state(device="cuda"):
        return torch.get_rng_state()

    def set_rng_state(new_state, device="cuda"):
        torch.set_rng_state(new_state)

    def manual_seed(seed):
        # torch.manual_seed would call back into torch.cuda.manual_seed_all: seed the CPU generator.
        torch.default_generator.manual_seed(int(seed))

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.get_rng_state = get_rng_state
    torch.cuda.random.get_rng_state = get_rng_state
    torch.cuda.set_rng_state = set_rng_state
    torch.cuda.manual_seed = manual_seed
    torch.cuda.manual_seed_all = manual_seed
    mcore_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    from megatron.core.optimizer import optimizer as mcore_optimizer

    mcore_optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu
    # The RNG tracker warns when the CPU RNG moves inside its "GPU" fork: on CPU that is the fork.
    logging.getLogger(mcore_random.__name__).addFilter(
        lambda record: "CPU RNG state changed within GPU RNG context" not in record.getMessage())
    torch.cuda._megatron_sparse24_cpu = True
    return True


def _clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's clip_grad_by_total_norm_fp32 asserts CUDA grads; the same scaling on CPU."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0 and grads:
        torch._foreach_mul_(grads, coeff)


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        if dev is not None and torch.device(dev).type == "cuda":
            kwargs = dict(kwargs, device="cpu")
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_literals_to_cpu():
    """Inside the block, torch calls asked for ``device="cuda"`` allocate on CPU (no-op on GPU)."""
    if torch.cuda.is_available():
        yield
        return
    with _CudaToCpu():
        yield
