"""Per-step kernel arguments must not make Triton compile new kernel variants during training.

Triton specializes an int argument on being 1 or a multiple of 16. The forward packer takes the MVUE
seed keys, which change every step (for every method): specialized, each key landing in a class not
seen yet would compile a new variant mid-training (200-300 ms stalls at random steps on the H200).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import requires_gpu

ROOT = Path(__file__).resolve().parents[2]

# Imports the kernels compiled (no interpreter: its functions do not keep Triton's parameter flags) and
# lists, per launched @triton.jit kernel of the package (named *_kernel; device functions called from
# kernels are specialized with the kernel that calls them), its parameters Triton would specialize.
_LIST_SPECIALIZED = """
import sys, triton
from megatron_sparse24.kernels import triton_kernels
from megatron_sparse24.kernels.triton_kernels import forward
mods = [m for name, m in sys.modules.items() if name.startswith("megatron_sparse24.kernels.triton_kernels.")]
for mod in mods:
    for name, fn in vars(mod).items():
        if isinstance(fn, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
            for p in fn.params:
                if not p.do_not_specialize and not p.is_constexpr:
                    print(mod.__name__, name, p.name)
print("PER_STEP", *forward.PER_STEP_ARGS)
"""


def test_per_step_seed_keys_are_not_specialized():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _LIST_SPECIALIZED], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    per_step = lines[-1].split()[1:]
    assert set(per_step) == {"k1", "k2"}
    specialized = [line.split() for line in lines[:-1]]
    seen = {(mod, kernel) for mod, kernel, _ in specialized}
    assert ("megatron_sparse24.kernels.triton_kernels.forward", "_relu2_sparsify24_kernel") in seen  # it was listed
    offenders = [(kernel, param) for _, kernel, param in specialized if param in per_step]
    assert not offenders, f"kernels specialize on per-step seed keys: {offenders}"


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("method", ["naive", "mvue"])
def test_new_seed_keys_reuse_the_compiled_forward_packer(method):
    from megatron_sparse24.kernels import triton_kernels as tk
    from megatron_sparse24.kernels.triton_kernels.forward import _relu2_sparsify24_kernel

    y1 = torch.randn(128, 256, device="cuda").bfloat16()
    cache = _relu2_sparsify24_kernel.device_caches[torch.cuda.current_device()][0]
    # keys in every class Triton would tell apart: other, a multiple of 16, 1
    keys = [(3, 5), (16, 5), (3, 32), (48, 64), (1, 1), (1, 17)]
    outs = {}
    for fn in ("pack_forward", "sparsify_forward_dense"):
        getattr(tk, fn)(y1, method, None, *keys[0])
        torch.cuda.synchronize()
        compiled = len(cache)
        for k1, k2 in keys:
            outs[fn, k1, k2] = getattr(tk, fn)(y1, method, None, k1, k2)
        torch.cuda.synchronize()
        assert len(cache) == compiled, f"{fn}: new seed keys compiled {len(cache) - compiled} more variants"
    # the keys still reach the kernel: MVUE draws differ with them, naive ignores them
    first, second = outs["pack_forward", 3, 5][0].values, outs["pack_forward", 16, 5][0].values
    assert torch.equal(first, second) == (method == "naive")
