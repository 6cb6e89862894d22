"""Run megatron-core on CPU (gloo): the few patches it needs, applied only where there is no GPU.

megatron-core assumes CUDA in a handful of places: ``torch.cuda.current_device()`` as an allocation
device, the CUDA RNG for its RNG tracker, ``torch.cuda.synchronize()``, CUDA streams and events
around its gradient buffers, the optimizer's gradient clipping (asserts CUDA grads), and a few
``device="cuda"`` literals in the pipeline schedules and the grad-norm code.
``enable_cpu_megatron()`` redirects the first five to CPU equivalents for the whole process (no-op
when CUDA is available: nothing is ever patched on a GPU machine); ``cuda_literals_to_cpu()`` is a
context manager that rewrites ``device="cuda"`` arguments and ``.cuda()`` calls inside a block (wrap
the forward/backward schedule call, or Megatron-LM's whole ``pretrain()``, with it).
``enable_cpu_megatron_training()`` adds what Megatron-LM's own training loop needs.

Used by the tests and by ``pretrain_gpt_sparse.py`` on CPU, so the quickstart runs on a laptop.
"""

from __future__ import annotations

import contextlib
import logging
import os
from types import SimpleNamespace

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["enable_cpu_megatron", "enable_cpu_megatron_training", "cuda_literals_to_cpu", "cpu_patched"]


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
    torch.cuda.current_stream = lambda *args, **kwargs: _HOST_STREAM
    torch.cuda.Stream = _HostStream
    torch.cuda.stream = lambda stream=None: contextlib.nullcontext()
    torch.cuda.Event = _HostEvent
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


def enable_cpu_megatron_training() -> bool:
    """``enable_cpu_megatron`` plus what Megatron-LM's training loop (``megatron.training``, megatron-core
    >= 0.17) needs on CPU: it asserts CUDA in its initialisation, and sets up its model-parallel groups,
    its RNG tracker and the device only when ``torch.cuda.device_count() > 0``, so the host counts as one
    device whose selection is a no-op. Run its ``pretrain()`` inside ``cuda_literals_to_cpu()``.
    Returns True if patched (no-op with CUDA)."""
    if not enable_cpu_megatron():
        return False
    from megatron.training import initialize, training

    if not getattr(training.initialize_megatron, "_megatron_sparse24_cpu", False):
        def initialize_megatron(*args, **kwargs):
            return initialize.initialize_megatron(*args, **dict(kwargs, allow_no_cuda=True))

        initialize_megatron._megatron_sparse24_cpu = True
        training.initialize_megatron = initialize_megatron
    torch.cuda.device_count = lambda: 1
    torch.cuda.set_device = lambda *args, **kwargs: None
    # its argument checks read the device architecture (the host has none: 0.0), and with tensor
    # parallelism on pre-Blackwell devices require this variable (meaningless on CPU)
    torch.cuda.get_device_properties = lambda *args, **kwargs: _HOST_PROPERTIES
    torch.cuda.get_device_capability = lambda *args, **kwargs: (0, 0)
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    return True


class _HostStream:
    """``torch.cuda.Stream`` / ``current_stream()`` on CPU: work on the host is already ordered, so
    waiting on events or streams is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        return event if event is not None else _HostEvent()

    def query(self):
        return True

    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass

    def synchronize(self):
        pass


_HOST_STREAM = _HostStream()
_HOST_PROPERTIES = SimpleNamespace(name="cpu", major=0, minor=0, total_memory=0, multi_processor_count=0)


class _HostEvent:
    """``torch.cuda.Event`` on CPU: recorded work is already done."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def synchronize(self):
        pass


def _clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """megatron's clip_grad_by_total_norm_fp32 asserts CUDA grads; the same scaling on CPU."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff < 1.0 and grads:
        torch._foreach_mul_(grads, coeff)


def _is_cuda(device) -> bool:
    return isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda"


class _CudaToCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:  # model.cuda(), batch.cuda(): already where they belong
            return args[0]
        if _is_cuda(kwargs.get("device")):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_literals_to_cpu():
    """Inside the block, torch calls asked for ``device="cuda"`` allocate on CPU, and ``.cuda()`` /
    ``.to("cuda")`` keep tensors where they are (no-op on GPU)."""
    if torch.cuda.is_available():
        yield
        return
    with _CudaToCpu():
        yield
