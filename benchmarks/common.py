"""What the benchmark scripts share: timing (CUDA events, CUDA-graph replay, host time), a copy's
bandwidth, shapes on the command line, JSON output, and loading another version of the kernels.

Scripts run as ``python benchmarks/<script>.py`` from the repository root; each puts the root on
``sys.path`` once (``ROOT``) and imports ``benchmarks.common`` and the package from there.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from megatron_sparse24.backends.timing import interleaved_median_cuda_ms, median_cuda_ms  # noqa: E402

__all__ = ["ROOT", "median_cuda_ms", "interleaved_median_cuda_ms", "graphed_ms", "host_ms", "copy_bandwidth",
           "ClockSampler", "pack_bytes", "parse_shape", "write_json", "load_kernels"]


def graphed_ms(step, warmup, iters) -> float:
    """Median ms of ``step`` replayed from a CUDA graph: the GPU time without the host's launch
    overhead (what a step costs when the host runs ahead, or under CUDA graphs). NaN if ``step``
    cannot be captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graph asks
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            step()
    except RuntimeError as e:
        print(f"CUDA graph capture failed: {e}", flush=True)
        return float("nan")
    ms = median_cuda_ms(graph.replay, warmup, iters)
    del graph
    return ms


def host_ms(fn, iters: int, warmup: int = 3) -> float:
    """Median host milliseconds to run ``fn`` (enqueue only), starting each time from an idle GPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def copy_bandwidth(like: torch.Tensor) -> tuple[float, float]:
    """(ms, GB/s) of a device-to-device copy of a tensor like ``like`` (read + write)."""
    src, dst = torch.empty_like(like), torch.empty_like(like)
    ms = median_cuda_ms(lambda: dst.copy_(src), 3, 20)
    return ms, 2 * like.numel() * like.element_size() / ms / 1e6


def pack_bytes(t: int, f: int, itemsize: int = 2, derivative: bool = False, n_dense: int = 0) -> dict:
    """Bytes each pack kernel must move at T x F (what its bandwidth is computed from): the forward
    packer ("fwd") reads Y1 and writes the kept values, the kept derivatives (``derivative``: the
    method stores them; bf16 "naive" recomputes them) and the metadata; the backward packer ("bwd")
    reads G2, S2's values, derivatives and metadata and writes G1's values and metadata, the
    feature-wise packs of G1^T and S2^T, the ``n_dense`` dense features' rows of both and the db1
    partial sums; the dense-GEMM engine's passes ("dfwd", "dbwd") read and write whole [T, F] tensors
    (+ the derivative, + the permutation)."""
    full, half, meta = t * f * itemsize, t * f // 2 * itemsize, t * f // 8
    dv = half if derivative else 0
    return {
        "fwd": full + half + dv + meta,
        "bwd": (full + half + dv + meta  # reads: G2, S2, d(S2)/d(Y1), metadata
                + half + meta + 2 * (half + meta)  # writes: G1, G1^T, S2^T
                + 2 * n_dense * t * itemsize + 4 * f * (t // 64)),  # dense rows, db1 partials
        "dfwd": 2 * full + (full if derivative else 0),
        "dbwd": 5 * full + (full if derivative else 0) + 8 * t,
    }


class ClockSampler:
    """Samples SM clock (MHz) and power (W) with nvidia-smi while a workload runs."""

    def __init__(self, index: int):
        self.index, self.samples, self._stop = index, [], threading.Event()

    def __enter__(self):
        def loop():
            while not self._stop.is_set():
                try:
                    out = subprocess.run(["nvidia-smi", "-i", str(self.index), "--query-gpu=clocks.sm,power.draw",
                                          "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                         timeout=5).stdout
                    clock, power = (float(v) for v in out.strip().split(","))
                    self.samples.append((clock, power))
                except Exception:
                    return
                time.sleep(0.1)
        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self):
        if not self.samples:
            return None, None
        s = sorted(self.samples)
        return s[len(s) // 2][0], sorted(p for _, p in s)[len(s) // 2]


def parse_shape(text: str) -> tuple[int, ...]:
    """"16384x4096x16384" -> (16384, 4096, 16384)."""
    try:
        return tuple(int(v) for v in text.split("x"))
    except ValueError:
        raise SystemExit(f"bad shape {text!r}: expected sizes joined by 'x', e.g. 16384x4096x16384") from None


def write_json(path, payload) -> None:
    """``payload`` with the device's name, to ``path`` (nothing when ``path`` is None)."""
    if path:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        Path(path).write_text(json.dumps({"device": device, **payload}, indent=1))


def load_kernels(path: str, name: str = "other_kernels"):
    """The Triton kernels of another version of this package, loaded next to this checkout's, for
    A/B timing in one process. ``path``: that version's ``megatron_sparse24/kernels`` directory
    (e.g. ``git archive REV megatron_sparse24/kernels | tar -x -C /tmp/old``, then
    ``/tmp/old/megatron_sparse24/kernels``). Returns its ``triton_kernels`` module (a single file or
    a package: whichever that version has)."""
    init = Path(path) / "__init__.py"
    if not init.exists():
        raise SystemExit(f"{path} is not a kernels package directory (no __init__.py)")
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(path)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package  # its relative imports resolve inside it
    spec.loader.exec_module(package)
    if package.triton_kernels is None:
        raise SystemExit(f"the kernels at {path} could not import Triton: {package.TRITON_IMPORT_ERROR}")
    return package.triton_kernels
