"""Test set-up: Triton's CPU interpreter without a GPU, and a `device` fixture.

TRITON_INTERPRET must be set before megatron_sparse24 (and its @triton.jit kernels) is imported;
conftest.py is imported first, so CPU runs exercise the real Triton kernels on small tensors.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
requires_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, requires_gpu])])
def device(request):
    """Every test using it runs on CPU (interpreter) and, on a GPU machine, with CUDA tensors."""
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def cuda_ffn_leaves(t: int, d: int, f: int):
    """bf16 CUDA leaves of one FFN (x [t, d], w1 [f, d], w2 [d, f] requiring grad) and an output gradient
    gy [t, d], drawn from torch's global generator in that order."""
    x = torch.randn(t, d, device="cuda").bfloat16().requires_grad_()
    w1 = (torch.randn(f, d, device="cuda") / d**0.5).bfloat16().requires_grad_()
    w2 = (torch.randn(d, f, device="cuda") / f**0.5).bfloat16().requires_grad_()
    gy = torch.randn(t, d, device="cuda").bfloat16()
    return x, w1, w2, gy
