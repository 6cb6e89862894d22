"""megatron-core's checkpoint writer (its results queue's manager process) ends when the trainer is
killed, instead of waiting forever."""

import os
import signal
import subprocess
import sys
import time

import pytest

CHILD = """
import sys
from megatron_sparse24.training.writer_processes import end_writer_processes_with_trainer
from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
assert end_writer_processes_with_trainer()
getter = getattr(fa, "get_write_results_queue", None) or fa._get_write_results_queue
queue = getter()
assert getter() is queue and fa._results_queue is queue  # one queue per process, megatron's global
queue.put(7)
assert queue.get() == 7  # it works as megatron uses it
print(queue._manager._process.pid, flush=True)
sys.stdin.read()  # wait to be killed
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for init to reap it is gone too
        return f.read().split(")")[-1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_writer_process_ends_when_the_trainer_is_killed():
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        manager_pid = int(child.stdout.readline())
        assert _alive(manager_pid)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        deadline = time.time() + 20
        while _alive(manager_pid) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(manager_pid), "the checkpoint writer outlived its killed trainer"
    finally:
        child.kill()
