"""Kernels: Triton implementations and their plain-PyTorch reference twins.

``reference`` and ``layout`` need only torch. ``triton_kernels`` needs Triton and either a CUDA
device or Triton's CPU interpreter (``TRITON_INTERPRET=1`` set before this package is imported).
``use_triton(tensor)`` says whether the Triton twin can run on a tensor's device.
"""

import os

import torch

from . import layout, reference, rng  # noqa: F401

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:  # Triton is optional (no Linux, no GPU users still get the reference path).
    from . import triton_kernels

    HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    triton_kernels = None
    HAVE_TRITON = False


def use_triton(t: torch.Tensor) -> bool:
    """True when the Triton kernels can run on ``t``'s device (CUDA, or CPU under the interpreter)."""
    if not HAVE_TRITON:
        return False
    if t.is_cuda:
        return True
    return INTERPRET and t.device.type == "cpu"
