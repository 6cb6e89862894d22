"""Choosing the dense features: torch's sort vs the ranking kernel, per FFN width.

    python benchmarks/bench_dense_split.py [--features 1024 8192 16384 32768 65536] [--sweep] [--json out.json]

For each per-rank FFN width F: the GPU time (replayed from a CUDA graph, and CUDA events around an
eager call, which include launch gaps) and the host time to enqueue, of (a) the reference path,
``reference.select_dense_features`` (stable descending sort) + the positions scatter, and (b)
``triton_kernels.dense_feature_split`` (all-pairs ranking, one kernel). Counts as the forward
packer produces them: non-zeros per feature over T = 16384 tokens, squared-ReLU activations a few
hundred steps into training (most features 3-15 % non-zero, a dense tail). ``--sweep`` times each
(BI, BJ, num_warps) of CONFIGS.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_ffn import graphed_ms  # noqa: E402
from host_overhead import host_ms  # noqa: E402

from megatron_sparse24 import ops  # noqa: E402
from megatron_sparse24.backends import median_cuda_ms  # noqa: E402
from megatron_sparse24.kernels import reference  # noqa: E402
from megatron_sparse24.kernels import triton_kernels as tk  # noqa: E402

CONFIGS = [(64, 256, 4), (32, 256, 4), (128, 128, 4), (64, 128, 4), (128, 256, 8), (32, 128, 2)]


def realistic_counts(n_feats: int, tokens: int = 16384) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(0)
    density = torch.rand(n_feats, generator=gen, device="cuda") * 0.12 + 0.03
    density[torch.randperm(n_feats, generator=gen, device="cuda")[: n_feats // 50]] = 0.5  # the dense tail
    return torch.binomial(torch.full_like(density, tokens), density, generator=gen).to(torch.int32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", type=int, nargs="*", default=[1024, 8192, 16384, 32768, 65536])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    print("| F | n_dense | path | GPU ms (graphed) | eager ms (events) | host ms |\n|---|---|---|---|---|---|")
    for f in args.features:
        counts = realistic_counts(f)
        n_dense = reference.num_dense_features(f, 0.05)

        def sort_path():
            idx = reference.select_dense_features(counts, n_dense, sort_indices=False)
            return idx, ops._dense_positions(idx, f)

        want = sort_path()
        paths = {"sort (reference)": sort_path}
        for cfg in CONFIGS if args.sweep else [tk.DENSE_SPLIT_CONFIG]:
            got = tk.dense_feature_split(counts, n_dense, cfg)
            assert all(torch.equal(a, b) for a, b in zip(got, want)), f"kernel {cfg} disagrees with the sort at F={f}"
            paths[f"kernel {cfg}"] = lambda cfg=cfg: tk.dense_feature_split(counts, n_dense, cfg)
        for name, fn in paths.items():
            r = {"F": f, "n_dense": n_dense, "path": name, "gpu_ms": graphed_ms(fn, 3, 20),
                 "eager_ms": median_cuda_ms(fn, 3, 20), "host_ms": host_ms(fn, 50)}
            rows.append(r)
            print(f"| {f} | {n_dense} | {name} | {r['gpu_ms']:.4f} | {r['eager_ms']:.4f} | {r['host_ms']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
