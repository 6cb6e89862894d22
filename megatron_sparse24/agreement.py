"""Tuning decisions agreed by the tensor-parallel ranks of a layer.

Each rank times GEMM algorithms and FFN engines on its own GPU, and two GPUs of one job can measure
different winners (a few percent apart, clock drift, another job's heat). The tensor-parallel ranks of
a layer share its tokens and split its weights; they must run the same engine, because the engine
decides how the layer permutes the tokens it gathers. So each decision is taken locally (timed, or read
from the on-disk tuning cache), then replaced by the decision of the group's first rank: one broadcast
per decision and process, on the first use of its key, which every rank of the group reaches at the
same point of the program (same tokens, same shapes). A rank's local cache never decides whether it
takes part: it always does.

Why not the data-parallel replicas too: every engine and GEMM choice computes the same model (the same
selections and values; only the order of floating-point sums differs), so replicas that chose
differently still train the same model, as replicas on GPUs of different clocks do. And replicas may
see different shapes at the same step (variable sequence lengths), so a first use of a shape is not a
point every replica reaches together: a collective there could hang the job.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ["agree", "group_size"]


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    """Ranks in ``group`` (1 without one or outside torch.distributed)."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def agree(values: Sequence[int], group: Optional[dist.ProcessGroup], device: torch.device) -> list[int]:
    """The group's first rank's ``values`` (integers encoding one decision), on every rank of ``group``.

    Every rank of ``group`` must call it with as many values, at the same point. ``device``: where the
    broadcast's tensor lives for NCCL groups (gloo groups use the CPU). One host sync: for one-time
    decisions only, never on a step's hot path. Without a group of more than one rank: ``values``."""
    values = [int(v) for v in values]
    if group_size(group) == 1:
        return values
    on = device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    buf = torch.tensor(values, dtype=torch.int64, device=on)
    dist.broadcast(buf, src=dist.get_global_rank(group, 0), group=group)
    return buf.tolist()
