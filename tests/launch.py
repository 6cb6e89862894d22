"""Run a training entry point as a user would (a fresh python, or torchrun for several ranks) on CPU or GPU."""

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script_args, cwd, nproc=1, **env):
    """``python SCRIPT_ARGS`` (``torchrun --nproc_per_node N`` for nproc > 1) in ``cwd`` with the repository
    on the path, no inherited rendezvous variables, and ``env`` on top; returns the CompletedProcess."""
    if nproc == 1:
        cmd = [sys.executable, *script_args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_port()), *script_args]
    full_env = dict(os.environ, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1", CUDA_DEVICE_MAX_CONNECTIONS="1",
                    PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **env)
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        full_env.pop(var, None)
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600)
