"""Run a training script with every torchrun rank on GPU 0 (test-only): NCCL refuses two ranks on one
GPU, so the script runs with ``--distributed-backend gloo`` and this shim applies
``tests.megatron.harness.share_one_gpu`` first.

    torchrun --nproc_per_node 2 -m tests.megatron.shared_gpu_launch SCRIPT.py ARGS...
"""

import runpy
import sys

from tests.megatron.harness import share_one_gpu

if __name__ == "__main__":
    share_one_gpu()
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
