"""Run a training script with every torchrun rank on GPU 0 (test-only): NCCL refuses two ranks on one
GPU, so the script runs with ``--distributed-backend gloo`` and this shim stages the collectives
megatron uses through CPU copies and maps every ``torch.cuda.set_device`` to device 0.

    torchrun --nproc_per_node 2 -m tests.megatron.shared_gpu_launch SCRIPT.py ARGS...
"""

import contextlib
import runpy
import sys

import torch

from tests.megatron.harness import _stage_cuda_collectives_through_cpu

if __name__ == "__main__":
    _stage_cuda_collectives_through_cpu()
    _set_device = torch.cuda.set_device
    torch.cuda.set_device = lambda device: _set_device(0)
    import megatron.core.distributed.param_and_grad_buffer as grad_buffer

    # gloo has no coalesced CUDA all-reduce: DDP's bucket all-reduces go one by one
    grad_buffer._coalescing_manager = lambda *args, **kwargs: contextlib.nullcontext()
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
