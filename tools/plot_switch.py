"""The layer-wise 2:4 switch figure of docs/results.md from pretrain_gpt_sparse.py's text logs (needs matplotlib).

    python tools/plot_switch.py --runs dense=LOG fixed=LOG measured=LOG [--runs ... (a second seed)] \
        --measured measured=LOG --out docs/results/switch.png

Left: validation loss relative to the dense run of the same seed (one line per run and seed, from the
"validation loss at iteration N" lines). Right: per layer of the ``--measured`` run, the share of the
activation's non-zeros 2:4 drops (the "2:4 drops (nonzeros)" field of the 2:4 log line) over training,
solid where the layer ran 2:4 ("2:4 from step N" lines), dotted while it was dense.
"""

from __future__ import annotations

import argparse
import re

VALID = re.compile(r"validation loss at iteration\s+(\d+) \| lm loss value: ([0-9.Ee+-]+)")
DROPS = re.compile(r"2:4 at iteration\s+(\d+) \|.*?2:4 drops \(nonzeros\): ([0-9.,]+)")
SWITCHED = re.compile(r"layer (\d+): 2:4 from step (\d+)")


def validation_losses(path: str) -> dict[int, float]:
    with open(path) as f:
        return {int(m[1]): float(m[2]) for m in VALID.finditer(f.read())}


def dropped_shares(path: str) -> tuple[dict[int, list[float]], dict[int, int]]:
    """({iteration: [share per layer]}, {layer (1-based): first 2:4 step})"""
    text = open(path).read()
    drops = {int(m[1]): [float(v) for v in m[2].split(",")] for m in DROPS.finditer(text)}
    switched = {int(m[1]): int(m[2]) for m in SWITCHED.finditer(text)}
    return drops, switched


def main(argv=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", action="append", required=True,
                   help="one seed's runs as name=log; the first is the dense baseline (repeat per seed)")
    p.add_argument("--measured", required=True, help="name=log of the run whose per-layer shares to plot")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2))
    styles = ["-", "--", ":", "-."]
    for s, seed_runs in enumerate(args.runs):
        named = [r.split("=", 1) for r in seed_runs]
        base = validation_losses(named[0][1])
        for i, (name, path) in enumerate(named[1:], start=1):
            loss = validation_losses(path)
            its = sorted(k for k in loss if k in base)
            ax.plot(its, [100 * (loss[k] / base[k] - 1) for k in its], styles[s % 4], color=f"C{i}", marker="o",
                    ms=3, label=name)
    ax.axhline(0, color="k", lw=0.8)
    ax.axhline(1, color="gray", lw=0.6, ls=":")
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation loss vs dense, %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)

    name, path = args.measured.split("=", 1)
    drops, switched = dropped_shares(path)
    its = sorted(drops)
    for layer in range(len(drops[its[0]])):
        first = switched.get(layer + 1, its[-1] + 1)
        shares = [100 * drops[k][layer] for k in its]
        dense = [(k, v) for k, v in zip(its, shares) if k <= first]
        sparse = [(k, v) for k, v in zip(its, shares) if k >= first]
        color = f"C{layer % 10}"
        if dense:
            bx.plot(*zip(*dense), ":", color=color)
        if sparse:
            bx.plot(*zip(*sparse), "-", color=color, label=f"layer {layer + 1} (2:4 from {first})")
    bx.set_xlabel("iteration")
    bx.set_ylabel("non-zeros 2:4 drops, %")
    bx.set_title(f"{name}: dotted dense, solid 2:4", fontsize=9)
    bx.grid(alpha=0.3)
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
