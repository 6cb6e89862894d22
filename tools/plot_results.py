"""Plots for docs/results.md from the trainer's --log-jsonl files (needs matplotlib).

    python tools/plot_results.py --logs dense=docs/results/logs/parity_dense.jsonl \
        sparse=docs/results/logs/parity_sparse.jsonl --out docs/results/loss_parity.png \
        --sparsity sparse --sparsity-out docs/results/sparsity.png

The loss plot shows training loss (thin) and validation loss (markers) per run; the sparsity plot
shows, per layer, the fraction of zeros in relu(Y1) of one run over training.
"""

from __future__ import annotations

import argparse
import json


def load(path: str):
    train, valid = {}, {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            (train if r["kind"] == "train" else valid)[r["iteration"]] = r
    return train, valid


def main(argv=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--logs", nargs="+", required=True, help="name=path.jsonl")
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="")
    p.add_argument("--sparsity", help="name of the run whose per-layer sparsity to plot")
    p.add_argument("--sparsity-out")
    p.add_argument("--skip", type=int, default=0, help="leave out iterations before this (early loss is huge)")
    args = p.parse_args(argv)
    runs = {name: load(path) for name, path in (s.split("=", 1) for s in args.logs)}

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (name, (train, valid)) in enumerate(runs.items()):
        color = f"C{i}"
        its = [k for k in sorted(train) if k >= args.skip and train[k]["loss"] is not None]
        ax.plot(its, [train[k]["loss"] for k in its], color=color, lw=0.8, alpha=0.6, label=f"{name} train")
        vits = [k for k in sorted(valid) if k >= args.skip and valid[k]["loss"] is not None]
        if vits:
            ax.plot(vits, [valid[k]["loss"] for k in vits], "o-", color=color, ms=3, lw=1.2, label=f"{name} valid")
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title(args.title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)

    if args.sparsity:
        train, _ = runs[args.sparsity]
        its = [k for k in sorted(train) if train[k].get("sparsity")]
        n_layers = len(train[its[0]]["sparsity"])
        fig, ax = plt.subplots(figsize=(7, 4.2))
        cmap = plt.get_cmap("viridis")
        for layer in range(n_layers):
            ys = [train[k]["sparsity"][layer]["activation_sparsity"] for k in its]
            ax.plot(its, ys, color=cmap(layer / max(1, n_layers - 1)), lw=1,
                    label=f"layer {layer + 1}" if layer in (0, n_layers // 2, n_layers - 1) else None)
        ax.set_xlabel("iteration")
        ax.set_ylabel("fraction of zeros in relu(Y1)")
        ax.set_ylim(0.4, 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"activation sparsity per layer ({args.sparsity})")
        fig.tight_layout()
        fig.savefig(args.sparsity_out, dpi=120)


if __name__ == "__main__":
    main()
