"""CUDA-event timing for the tuners (and the benchmarks): medians after warm-up, candidates interleaved."""

from __future__ import annotations

import statistics

import torch

__all__ = ["median_cuda_ms", "interleaved_median_cuda_ms"]


#: GPU cycles (~1 ms on an H200) the GPU spins before a ``gpu_busy`` measurement, so the host has
#: enqueued the timed calls before the GPU reaches them.
BUSY_CYCLES = 2_000_000


def interleaved_median_cuda_ms(fns: list, rounds: int = 6, iters: int = 2, gpu_busy: bool = False) -> list[float]:
    """Median milliseconds of each of ``fns`` (``median_cuda_ms`` of ``iters`` calls, once per round),
    over an even number of ``rounds`` that call every function in turn, in alternating order, after
    one warm-up call each. Tuning compares candidates that differ by a few percent, while the GPU's
    clock drifts by more as it heats toward its power limit: timed one after the other, the first
    candidates ran at higher clocks and won (docs/performance.md: cuSPARSELt's algorithm 0
    chosen in 4 of 4 tunings, 6.5 % slower than the best). Alternating, each function's two middle
    rounds sit, on average, at the same place in the sequence, so a steady drift cancels.
    ``gpu_busy``: see ``median_cuda_ms``."""
    if rounds % 2:
        raise ValueError(f"rounds must be even (forward and reverse order in pairs), got {rounds}")
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for r in range(rounds):
        for i in (range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))):
            times[i].append(median_cuda_ms(fns[i], warmup=0, iters=iters, gpu_busy=gpu_busy))
    return [statistics.median(t) for t in times]


def median_cuda_ms(fn, warmup: int = 2, iters: int = 5, setup=None, gpu_busy: bool = False) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA stream: CUDA events around ``fn`` only
    (``setup()`` runs before each call, untimed), after ``warmup`` calls. Syncs: not for hot paths.
    By default the GPU is idle when ``fn`` starts, so its host time up to the first launch counts;
    ``gpu_busy`` keeps the GPU spinning (``BUSY_CYCLES``) while the host enqueues, which times the
    GPU's work alone, as in a training step where the host runs ahead of the GPU."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    times = []
    for _ in range(iters):
        if setup:
            setup()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if gpu_busy:
            torch.cuda._sleep(BUSY_CYCLES)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
