"""Kernels: Triton implementations and their plain-PyTorch reference twins.

``reference`` and ``layout`` need only torch. ``triton_kernels`` needs Triton and either a CUDA
device or Triton's CPU interpreter (``TRITON_INTERPRET=1`` set before this package is imported).
``use_triton(tensor)`` says whether the Triton twin runs on a tensor's device: on CUDA it must (the
reference twins are for CPU and tests, several times slower), so a Triton that cannot be imported
there is an error naming why, never a quiet fall-back to the slow path.
"""

import os

import torch

from . import layout, reference, rng  # noqa: F401

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:  # Triton is optional off CUDA (no Linux, no GPU users still get the reference path).
    from . import triton_kernels

    TRITON_IMPORT_ERROR = None
except Exception as e:  # pragma: no cover - depends on the environment
    triton_kernels = None
    TRITON_IMPORT_ERROR = f"{type(e).__name__}: {e}"
HAVE_TRITON = TRITON_IMPORT_ERROR is None


def use_triton(t: torch.Tensor) -> bool:
    """True when the Triton kernels run on ``t``'s device: CUDA (required there), or CPU under the
    interpreter. Raises on a CUDA tensor when Triton cannot be imported."""
    if t.is_cuda:
        if not HAVE_TRITON:
            raise RuntimeError(
                f"megatron_sparse24: the Triton kernels cannot be imported ({TRITON_IMPORT_ERROR}); CUDA tensors "
                f"need them: install the Triton that matches torch {torch.__version__} (pip install "
                f"'torch=={torch.__version__.split('+')[0]}' brings it) and check that it imports")
        return True
    return HAVE_TRITON and INTERPRET and t.device.type == "cpu"
