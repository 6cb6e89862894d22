"""Megatron-style training logs: stdout lines, TensorBoard scalars, and an optional JSON-lines file.

Per-layer sparsity (share of zeros in relu(Y1)^2, share of its non-zeros dropped by 2:4, share of
kept non-zeros in the dense-gradient features) comes from the layers' device counters, summed over
all tensor- and data-parallel ranks with one all-reduce at the log interval: no host sync on the
training hot path.
"""

from __future__ import annotations

import json
import time

import torch
import torch.distributed as dist

from ..mlp import Sparse24MLP, summarize_counters

__all__ = ["model_flops_per_iteration", "MetricsWriter", "global_sparsity_stats"]


def model_flops_per_iteration(args) -> float:
    """Dense-equivalent training FLOPs of one iteration (fwd + bwd = 3 x forward matmuls, causal
    attention counted in full as Megatron-LM does). The 2:4 GEMMs count as dense, so their speed-up
    shows up as higher TFLOP/s."""
    h, f, s, L = args.hidden_size, args.ffn_hidden_size, args.seq_length, args.num_layers
    kv = h * args.num_query_groups // args.num_attention_heads
    ffn_mats = 3 if args.swiglu else 2
    per_token_layer = 2 * (h * h + 2 * h * kv + h * h) + 2 * ffn_mats * h * f + 2 * 2 * s * h
    per_token = L * per_token_layer + 2 * h * _vocab(args)
    return 3.0 * per_token * s * args.global_batch_size


def _vocab(args) -> int:
    return getattr(args, "padded_vocab_size", None) or args.vocab_size or 0


def global_sparsity_stats(model_chunks, num_layers: int, device) -> list[dict]:
    """Layer-by-layer sparsity summed over every rank since the last call (then reset). Call it on
    all ranks at the log interval: one all-reduce and one host sync."""
    counters = torch.zeros(num_layers, 4, dtype=torch.int64, device=device)
    for chunk in model_chunks:
        for m in chunk.modules():
            if isinstance(m, Sparse24MLP):
                counters[m.layer_number - 1] += m.sparsity_counters
                m.sparsity_counters.zero_()
    dist.all_reduce(counters)
    return [summarize_counters(layer, c) for layer, c in enumerate(counters.tolist(), start=1) if c[2]]


class MetricsWriter:
    """Where the logging rank sends its records; inert on other ranks."""

    def __init__(self, args, active: bool):
        self.active = active
        self.tb = None
        self.jsonl = None
        if not active:
            return
        if args.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ValueError("--tensorboard-dir needs the tensorboard package: pip install tensorboard") from exc
            self.tb = SummaryWriter(log_dir=args.tensorboard_dir, max_queue=1000)
        if args.log_jsonl:
            self.jsonl = open(args.log_jsonl, "a", encoding="utf-8")

    def write(self, record: dict, step: int, prefix: str = "train"):
        if not self.active:
            return
        record = dict(record, kind=prefix, time=time.time())
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.tb:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("iteration", "time"):
                    self.tb.add_scalar(f"{prefix}/{key}", value, step)
            for layer in record.get("sparsity", []):
                for key, value in layer.items():
                    if key != "layer":
                        self.tb.add_scalar(f"sparsity/{key}/layer{layer['layer']:02d}", value, step)

    def close(self):
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
