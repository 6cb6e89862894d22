"""Checkpoint writer processes that end with the trainer.

megatron-core's ``torch_dist`` save collects its write results through a ``multiprocessing`` manager
queue (``dist_checkpointing.strategies.filesystem_async``): a server process started at the first
save. When the trainer is killed (``kill -9``, the OOM killer, a scheduler's SIGKILL) nothing shuts
it down, and it waits forever, with the resource tracker it holds open. ``end_writer_processes_with_trainer``
makes megatron get that queue from a manager whose server process asks Linux to end it when its
parent dies (``PR_SET_PDEATHSIG``); megatron's code is otherwise unchanged. Elsewhere, or with a
megatron-core that has no such queue, it does nothing.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from multiprocessing.managers import SyncManager

__all__ = ["end_writer_processes_with_trainer"]

#: Runs in the manager's server process before it serves (through ``exec``: a builtin, so the
#: server imports nothing of this package or of torch to run it).
_END_WITH_PARENT = """
import ctypes, os, signal
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != {parent}:  # the parent died before the line above
    os._exit(0)
"""


def _manager_ending_with_parent(mp_mode: str) -> SyncManager:
    manager = SyncManager(ctx=multiprocessing.get_context(mp_mode))
    manager.start(initializer=exec, initargs=(_END_WITH_PARENT.format(parent=os.getpid()),))
    return manager


def end_writer_processes_with_trainer() -> bool:
    """Route megatron-core's checkpoint write-results queue through a manager that ends with this
    process (once per process; call before the first save, from the main thread: the signal follows
    the thread that started the manager). Returns whether it is in place."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:
        return False
    names = [n for n in ("get_write_results_queue", "_get_write_results_queue") if hasattr(fa, n)]
    if not names or not hasattr(fa, "_results_queue"):
        return False
    if all(getattr(getattr(fa, n), "_ends_with_trainer", False) for n in names):
        return True

    def write_results_queue(mp_mode: str = "spawn"):
        if fa._results_queue is None:
            fa._results_queue = _manager_ending_with_parent(mp_mode).Queue()
        return fa._results_queue

    write_results_queue._ends_with_trainer = True
    for name in names:
        setattr(fa, name, write_results_queue)
    return True
