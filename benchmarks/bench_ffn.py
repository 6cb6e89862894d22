"""Dense squared-ReLU FFN vs the 2:4 sparse FFN on one GPU.

    python benchmarks/bench_ffn.py                      # all shapes, every input generator
    python benchmarks/bench_ffn.py --shapes 16384x4096x16384 --iters 30 --json out.json
    python benchmarks/bench_ffn.py --backends cutlass cusparselt   # both sparse engines

The dense FFN and the 2:4 FFNs run in separate processes, in the order dense 2:4 2:4 dense, and each
figure is the mean of its two processes' medians: once a 2:4 GEMM has run, the H200 keeps the rest of
that process at a lower power-capped clock, so a dense FFN timed after it is slower than in a dense
job. (``--in-process`` times them in one process, A B B A, as a quick check.)

Times (CUDA events, medians after warm-up) forward / backward / fwd+bwd of the whole FFN (also
replayed from a CUDA graph: GPU time without launch overhead), each of the four sparse-capable GEMMs
against its dense counterpart on the same operand (both in the 2:4 process; the table's per-GEMM ratios
are of graph-replayed kernels; the event-timed ones, host launch time included, are in the JSON), and
the pack kernels' bandwidth against a device-to-device copy. Inputs come from several generators
(``INPUTS``: token-correlated inputs, per-feature densities spread over 1-20 %), never uniform noise;
the last table gives, per shape, the worst 2:4/dense ratio over the generators.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import copy_bandwidth, graphed_ms, median_cuda_ms, pack_bytes  # noqa: E402
from megatron_sparse24 import Sparse24Config, ops, sparse24_ffn  # noqa: E402
from megatron_sparse24.backends import resolve_backend  # noqa: E402
from megatron_sparse24.functional import dense_relu2_ffn, permutation_seed  # noqa: E402
from megatron_sparse24.kernels import layout, reference  # noqa: E402

BASE_SHAPES = [(16384, 2048, 8192), (16384, 4096, 16384), (32768, 4096, 16384), (8192, 8192, 32768)]


def all_shapes():
    """The base (T, D, F) shapes and their per-rank shapes at TP=2 and TP=8 (F / tp)."""
    out = []
    for t, d, f in BASE_SHAPES:
        for tp in (1, 2, 8):
            out.append((t, d, f // tp, tp))
    return out


def _fc1_bias_for_density(x, w1, density):
    """b1 such that about ``density`` (a float, or a [F] tensor: one per feature) of each feature's
    fc1 outputs are positive, measured on a sample of 2048 tokens."""
    t = x.shape[0]
    sample = (x[:: max(1, t // 2048)] @ w1.t()).float()
    if isinstance(density, float):
        return -torch.quantile(sample, 1.0 - density, dim=0)
    ranked = sample.sort(dim=0).values  # per feature, ascending
    rows = ((1.0 - density) * (ranked.shape[0] - 1)).round().long().clamp(0, ranked.shape[0] - 1)
    return -ranked.gather(0, rows[None]).squeeze(0)


def blocks_inputs(t, d, f, dtype, density=0.10, seed=0, device="cuda"):
    """x [T, D] with neighbouring-token correlation (components shared by blocks of 16 and of 4
    tokens), fc1 (W1, b1) biased so that ~density of Y1 is positive in every feature, W2, and an
    upstream gradient."""
    g = torch.Generator(device=device).manual_seed(seed)
    dev = device
    z16 = torch.randn(t // 16 + 1, d, device=dev, generator=g).repeat_interleave(16, 0)[:t]
    z4 = torch.randn(t // 4 + 1, d, device=dev, generator=g).repeat_interleave(4, 0)[:t]
    x = 0.6 * z16 + 0.5 * z4 + 0.62 * torch.randn(t, d, device=dev, generator=g)
    w1 = torch.randn(f, d, device=dev, generator=g) / d**0.5
    b1 = _fc1_bias_for_density(x, w1, density)
    w2 = torch.randn(d, f, device=dev, generator=g) / f**0.5
    gy = torch.randn(t, d, device=dev, generator=g)
    return [v.to(dtype) for v in (x, w1, b1, w2, gy)]


def ar1_spread_inputs(t, d, f, dtype, rho=0.9, densities=(0.01, 0.20), seed=0, device="cuda"):
    """Tokens AR(1)-correlated along T (x_t = rho x_{t-1} + noise, unit variance) and per-feature
    densities spread log-uniformly over ``densities`` (some features fire on 1 % of the tokens,
    others on 20 %, as trained squared-ReLU layers do), W2, and an upstream gradient."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(t, d, device=device, generator=g)
    k = 1
    while k < t:  # doubling: after the step for k, x_t = sum_{j < 2k} rho^j eps_{t-j}
        x[k:] += rho**k * x[:-k].clone()
        k *= 2
    x *= (1 - rho**2) ** 0.5
    w1 = torch.randn(f, d, device=device, generator=g) / d**0.5
    lo, hi = torch.tensor(densities).log().tolist()
    density = (lo + (hi - lo) * torch.rand(f, device=device, generator=g)).exp()
    b1 = _fc1_bias_for_density(x, w1, density)
    w2 = torch.randn(d, f, device=device, generator=g) / f**0.5
    gy = torch.randn(t, d, device=device, generator=g)
    return [v.to(dtype) for v in (x, w1, b1, w2, gy)]


def captured_inputs(t, d, f, dtype, path, layer=None, noise=0.2, seed=0, device="cuda"):
    """FFN inputs of any shape from one layer of a trained model (``tools/capture_ffn_inputs.py``: its
    tokens X_c [T_c, D_c], W1_c [F_c, D_c], b1_c, W2_c). Tokens repeat X_c's rows in order (T > T_c
    wraps around); hidden dimensions beyond D_c (D >= D_c is required) hold noise of X_c's scale.
    Feature j of the benchmark is a replica of captured feature src(j) (each used about F / F_c times,
    replicas scattered over F by a random permutation): its W1 row is W1_c[src(j)] on the first D_c
    dimensions plus a small random row on the others, so Y1[:, j] = Y1_c[:, src(j)] + a perturbation
    of ``noise`` times its spread, which keeps each feature's density and the tokens' correlation while
    replicas differ. W2 holds W2_c's columns likewise; the upstream gradient is noise."""
    cap = torch.load(path, weights_only=True)
    layers = cap["layers"]
    key = layer if layer is not None else min(layers)
    if key not in layers:
        raise ValueError(f"{path} holds layers {sorted(layers)}, not {key}")
    xc, w1c, b1c, w2c = (layers[key][k].to(device, torch.float32) for k in ("x", "w1", "b1", "w2"))
    tc, dc = xc.shape
    fc = w1c.shape[0]
    if d < dc:
        raise ValueError(f"captured hidden size {dc} is wider than the benchmark's D = {d}: capture from a "
                         "narrower model")
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(t, d, device=device, generator=g) * xc.std()
    x[:, :dc] = xc[torch.arange(t, device=device) % tc]
    src = (torch.arange(f, device=device) % fc)[torch.randperm(f, device=device, generator=g)]
    w1 = torch.zeros(f, d, device=device)
    w1[:, :dc] = w1c[src]
    if d > dc:  # the replicas' own part: each replica's Y1 moves by ~noise x the spread of its source's Y1
        spread = (xc[:2048] @ w1c.t()).std(0)[src]
        scale = noise * spread / (xc.std() * (d - dc) ** 0.5)
        w1[:, dc:] = torch.randn(f, d - dc, device=device, generator=g) * scale[:, None]
    b1 = b1c[src]
    w2 = torch.randn(d, f, device=device, generator=g) / f**0.5
    w2[:dc] = w2c[:, src] * (fc / f) ** 0.5
    gy = torch.randn(t, d, device=device, generator=g)
    return [v.to(dtype) for v in (x, w1, b1, w2, gy)]


#: input generators by name: each (t, d, f, dtype, device=...) -> [x, w1, b1, w2, grad_y]; besides
#: these, ``captured:FILE[@LAYER]`` names a capture of a trained model's FFN (``captured_inputs``)
INPUTS = {"blocks": blocks_inputs, "ar1_spread": ar1_spread_inputs}


def _captured(name: str):
    """(FILE, LAYER or None) of ``captured:FILE[@LAYER]``."""
    spec = name[len("captured:"):]
    path, sep, layer = spec.rpartition("@")
    return (path, int(layer)) if sep and layer.isdigit() else (spec, None)


def make_inputs(name: str, t, d, f, dtype, device="cuda"):
    """[x, w1, b1, w2, grad_y] of the generator ``name`` (a key of INPUTS, or ``captured:FILE[@LAYER]``)."""
    if name.startswith("captured:"):
        path, layer = _captured(name)
        return captured_inputs(t, d, f, dtype, path, layer, device=device)
    return INPUTS[name](t, d, f, dtype, device=device)


def inputs_name(name: str) -> str:
    """argparse type of --inputs: a generator's name, or captured:FILE[@LAYER] naming an existing file."""
    if name in INPUTS:
        return name
    if name.startswith("captured:"):
        if not Path(_captured(name)[0]).is_file():
            raise argparse.ArgumentTypeError(f"{_captured(name)[0]}: no such file (tools/capture_ffn_inputs.py "
                                             "makes it)")
        return name
    raise argparse.ArgumentTypeError(f"unknown input generator {name!r}: one of {sorted(INPUTS)} or captured:FILE")


class FFNProblem:
    """One T x D x F FFN on the realistic inputs, ready to time: its leaves (x, W1, b1, W2 with
    gradients), the dense and the sparse forward (the permutation computed once, as the Megatron layer
    keeps it in the module) and ``step_of(fwd)``, a fwd+bwd step. Used by profile_ffn.py."""

    def __init__(self, t, d, f, backend="auto", dtype=torch.bfloat16, device="cuda", inputs="blocks", fused_f1=True):
        self.shape = (t, d, f)
        self.x, self.w1, self.b1, self.w2, self.gy = make_inputs(inputs, t, d, f, dtype, device=device)
        self.leaves = [v.detach().requires_grad_() for v in (self.x, self.w1, self.b1, self.w2)]
        self.config = Sparse24Config(dense_warmup_steps=0, backend=backend, fused_f1=fused_f1)
        self.permutation = ops.token_permutation(t, permutation_seed(self.config, 1), self.x.device)

    def dense_fwd(self):
        x, w1, b1, w2 = self.leaves
        return dense_relu2_ffn(x, w1, w2, b1)

    def sparse_fwd(self):
        x, w1, b1, w2 = self.leaves
        return sparse24_ffn(x, w1, w2, b1, config=self.config, step=0, seed=1, permutation=self.permutation)

    def step_of(self, fwd):
        def step():
            for p in self.leaves:
                p.grad = None
            fwd().backward(self.gy)
        return step


def bench_shape(t, d, f, dtype, warmup, iters, method="naive", backends=("cusparselt",), graphs=True, tp=1,
                inputs="blocks", only=None, fused_f1=True, fc1_bias=True):
    """Measurements of one shape. Keys: dense_* and, per sparse backend B, B_* (FFN fwd/bwd/fwd+bwd,
    fwd+bwd replayed from a CUDA graph, saved MB), gemm_<G>_dense and gemm_<G>_B (per GEMM),
    B_choice_<G> (the dispatcher's pick). Backend "dense", the dense-GEMM engine, is reported as
    B = dense_gemms (no per-GEMM figures; its two fused passes as dense_engine_*).

    tp > 1: a per-rank shape under tensor + sequence parallelism. Where the layer permutes each
    rank's shard of T/tp tokens outside the 2:4 engine (``mlp.layer_permutes_shards``: tp > 2), the
    sparse FFN runs without its own permutation here and the four [T/tp, D] gathers of the shard (two
    forward, two backward), timed separately as perm_shard_gather_ms, are added to the sparse
    figures; elsewhere it gets the permutation, as in the layer."""
    from megatron_sparse24.mlp import layer_permutes_shards

    shards = layer_permutes_shards(tp, sequence_parallel=tp > 1)  # the per-rank shapes are SP ones
    x, w1, b1, w2, gy = make_inputs(inputs, t, d, f, dtype)
    if not fc1_bias:  # (the generators' densities come from b1: without it about half of Y1 is positive)
        b1 = None
    # the dense-GEMM engine's figures are keyed "dense_gemms_*" ("dense_*" is the dense FFN)
    labels = {b: "dense_gemms" if b == "dense" else b for b in backends}
    res = {"T": t, "D": d, "F": f, "backends": [labels[b] for b in backends]}
    sparse_backends = [b for b in backends if b != "dense"]
    # "dense" (the dense-GEMM engine) permutes inside its kernels at any tp, as the layer runs it
    cfgs = {b: Sparse24Config(method=method, dense_warmup_steps=0, backend=b, fused_f1=fused_f1,
                              token_permutation=not shards or b == "dense")
            for b in backends}
    leaves = [v.detach().requires_grad_() for v in (x, w1, b1, w2) if v is not None]
    xs, w1s, w2s = leaves[0], leaves[1], leaves[-1]
    b1s = leaves[2] if b1 is not None else None

    def dense_fwd():
        return dense_relu2_ffn(xs, w1s, w2s, b1s)

    def sparse_fwd_of(cfg):
        # The permutation is computed once, as the Megatron layer keeps it in the module.
        perm = ops.token_permutation(t, permutation_seed(cfg, 1), xs.device) if cfg.token_permutation else None
        return lambda: sparse24_ffn(xs, w1s, w2s, b1s, config=cfg, step=0, seed=1, permutation=perm)

    variants = [("dense", dense_fwd)] + [(labels[b], sparse_fwd_of(cfgs[b])) for b in backends]
    variants = [(n, v) for n, v in variants if only is None or (n == "dense") == (only == "dense")]
    # Each variant twice, in the order A B B A, and the mean of its two medians: a GPU that heats
    # up and clocks down during the run would otherwise favour whichever variant ran first.
    timings = {}
    for name, fwd in variants + variants[::-1]:
        holder = {}

        def make_graph(fwd=fwd, holder=holder):
            for p in leaves:
                p.grad = None
            holder["y"] = fwd()

        def step(fwd=fwd):
            for p in leaves:
                p.grad = None
            fwd().backward(gy)

        timings.setdefault(f"{name}_fwd", []).append(median_cuda_ms(lambda fwd=fwd: fwd(), warmup, iters))
        timings.setdefault(f"{name}_bwd", []).append(
            median_cuda_ms(lambda holder=holder: holder["y"].backward(gy), warmup, iters, setup=make_graph))
        timings.setdefault(f"{name}_fwdbwd", []).append(median_cuda_ms(step, warmup, iters))
        if graphs:
            holder.clear()  # no autograd graph of an eager step may outlive it into the capture
            timings.setdefault(f"{name}_fwdbwd_graph", []).append(graphed_ms(step, warmup, iters))
        if f"{name}_saved_MB" not in res:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            y = fwd()
            res[f"{name}_saved_MB"] = (torch.cuda.memory_allocated() - base - y.numel() * y.element_size()) / 2**20
            del y
    res.update({k: sum(v) / len(v) for k, v in timings.items()})
    res["runs_ms"] = timings
    if only == "dense":
        return res
    if shards:
        shard = x[: t // tp]
        perm_s, _ = ops.token_permutation(shard.shape[0], 1, x.device)
        res["perm_shard_gather_ms"] = one = median_cuda_ms(lambda: shard.index_select(0, perm_s), warmup, iters)
        for b in sparse_backends:
            for key, n in (("fwd", 2), ("bwd", 2), ("fwdbwd", 4), ("fwdbwd_graph", 4)):
                if f"{b}_{key}" in res:
                    res[f"{b}_{key}"] += n * one

    # --- per GEMM and pack kernels, on the operands of one real step ---------------------------
    with torch.no_grad():
        y1 = F.linear(x, w1, b1)
        res["activation_density"] = float((y1 > 0).float().mean())
        n_dense = reference.num_dense_features(f, cfgs[backends[0]].dense_feature_fraction)
        g2 = gy @ w2
        w2t = w2.t()
        for i, b in enumerate(sparse_backends):
            gemm = resolve_backend(b, y1.device, dtype, (t, f, d))
            s2, d_vals, counts = ops.pack_relu2_sparse24(y1, method, None, 0, layout=gemm.layout)
            dense_idx, dense_pos = ops.dense_feature_split(counts[:-1], n_dense)
            g1, g1t, g1_dense, s2t, s2_dense, db1 = ops.pack_backward(g2, s2, d_vals, dense_pos, n_dense, True)
            gemms = {
                "F2": (s2, lambda s2=s2: gemm.spmm(s2, w2t), w2t),
                "B2": (g1, lambda g1=g1: gemm.spmm(g1, w1), w1),
                "B3": (s2t, lambda s2t=s2t: gemm.spmm(s2t, gy, transpose_result=True), gy),
                "B4": (g1t, lambda g1t=g1t: gemm.spmm(g1t, x), x),
            }
            for name, (packed, sparse_fn, rhs) in gemms.items():
                # event-timed (with the host's launch time, as eager code pays it) and replayed from
                # a CUDA graph (the kernel alone: torch's _cslt_sparse_mm spends ~0.75 ms of host time
                # per call building its plan, which the event-timed figure counts as GPU idle)
                if i == 0:  # the dense GEMM on the same (decompressed) operand
                    full = layout.decompress24(packed)
                    res[f"gemm_{name}_dense"] = median_cuda_ms(lambda: full @ rhs, warmup, iters)
                    if graphs:
                        res[f"gemm_{name}_dense_gpu"] = graphed_ms(lambda: full @ rhs, warmup, iters)
                    del full
                res[f"gemm_{name}_{b}"] = median_cuda_ms(sparse_fn, warmup, iters)
                if graphs:
                    res[f"gemm_{name}_{b}_gpu"] = graphed_ms(sparse_fn, warmup, iters)
            if hasattr(gemm, "describe"):
                res[f"{b}_choices"] = {str(k): v for k, v in gemm.describe().items()}
            if b == "auto":  # which engine engine.choose_engine picked for this shape
                res["auto_engine"] = next((e for k, e in gemm.ffn_engines.items() if k[0] == (t, f, d)), "sparse")
        from megatron_sparse24.backends import device_index
        from megatron_sparse24.backends.f1_pack import shared_f1_packer

        packer = shared_f1_packer(device_index(x.device)) if fused_f1 else None
        if packer is not None:  # how F1 + the forward packer ran (fused kernel or two passes)
            res["f1_choices"] = {str(k): v for k, v in packer.describe().items()}
        res["gemm_F1_dense"] = median_cuda_ms(lambda: x @ w1.t(), warmup, iters)
        res["gemm_B1_dense"] = median_cuda_ms(lambda: gy @ w2, warmup, iters)
        s2, d_vals, counts = ops.pack_relu2_sparse24(y1, method, None, 0)
        dense_idx, dense_pos = ops.dense_feature_split(counts[:-1], n_dense)
        # pack kernels vs copy bandwidth
        _, res["copy_GBps"] = copy_bandwidth(y1)
        nbytes = pack_bytes(t, f, y1.element_size(), not reference.recomputes_derivative(method, dtype), n_dense)
        res["pack_fwd_ms"] = median_cuda_ms(lambda: ops.pack_relu2_sparse24(y1, method, None, 0), warmup, iters)
        res["pack_fwd_GBps"] = nbytes["fwd"] / res["pack_fwd_ms"] / 1e6
        res["pack_bwd_ms"] = median_cuda_ms(lambda: ops.pack_backward(g2, s2, d_vals, dense_pos, n_dense, True),
                                            warmup, iters)
        res["pack_bwd_GBps"] = nbytes["bwd"] / res["pack_bwd_ms"] / 1e6
        if "dense" in backends:  # the dense-GEMM engine's two passes: read Y1, write S2; read G2 and
            # S2, write G1 and the feature-wise G1 and S2 (bf16 naive: no derivative; + the permutation)
            perm, inv = ops.token_permutation(t, 1, x.device)
            s2d, dd, _ = ops.sparsify_forward_dense(y1, method, None, 0, row_ids=inv)
            res["dense_engine_fwd_pass_ms"] = ms = median_cuda_ms(
                lambda: ops.sparsify_forward_dense(y1, method, None, 0, row_ids=inv), warmup, iters)
            res["dense_engine_fwd_pass_GBps"] = nbytes["dfwd"] / ms / 1e6
            res["dense_engine_bwd_pass_ms"] = ms = median_cuda_ms(
                lambda: ops.sparsify_backward_dense(g2, s2d, dd, dense_pos, perm, True), warmup, iters)
            res["dense_engine_bwd_pass_GBps"] = nbytes["dbwd"] / ms / 1e6
    return res


def fmt_table(rows):
    nan = float("nan")
    lines = ["| T×D×F | tp | inputs | backend | fwd dense/sparse ms | ×  | bwd dense/sparse ms | × | fwd+bwd dense/sparse ms | × |"
             " graphed fwd+bwd ms | × | F2 × | B2 × | B3 × | B4 × | pack fwd GB/s | pack bwd GB/s | copy GB/s |"
             " saved MB dense/sparse |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for b in r["backends"]:
            def sp(k, r=r, b=b):  # per GEMM: the kernels' time (graph-replayed) when measured
                gpu = f"gemm_{k}_{b}_gpu" in r and f"gemm_{k}_dense_gpu" in r
                sfx = "_gpu" if gpu else ""
                return r.get(f"gemm_{k}_dense{sfx}", nan) / r.get(f"gemm_{k}_{b}{sfx}", nan)

            lines.append(
                f"| {r['T']}×{r['D']}×{r['F']} | {r.get('tp', 1)} | {r.get('inputs', 'blocks')} | {b}{' → ' + r['auto_engine'] if b == 'auto' else ''} "
                f"| {r['dense_fwd']:.3f} / {r[b + '_fwd']:.3f} | {r['dense_fwd'] / r[b + '_fwd']:.2f} "
                f"| {r['dense_bwd']:.3f} / {r[b + '_bwd']:.3f} | {r['dense_bwd'] / r[b + '_bwd']:.2f} "
                f"| {r['dense_fwdbwd']:.3f} / {r[b + '_fwdbwd']:.3f} | {r['dense_fwdbwd'] / r[b + '_fwdbwd']:.2f} "
                f"| {r.get('dense_fwdbwd_graph', nan):.3f} / {r.get(b + '_fwdbwd_graph', nan):.3f} "
                f"| {r.get('dense_fwdbwd_graph', nan) / r.get(b + '_fwdbwd_graph', nan):.2f} "
                f"| {sp('F2'):.2f} | {sp('B2'):.2f} | {sp('B3'):.2f} | {sp('B4'):.2f} "
                f"| {r['pack_fwd_GBps']:.0f} | {r['pack_bwd_GBps']:.0f} | {r['copy_GBps']:.0f} "
                f"| {r['dense_saved_MB']:.0f} / {r[b + '_saved_MB']:.0f} |"
            )
    return "\n".join(lines)


def fmt_worst(rows):
    """Per shape and backend, the lowest fwd+bwd speed-up over the input generators."""
    worst = {}
    for r in rows:
        for b in r["backends"]:
            key = (r["T"], r["D"], r["F"], r.get("tp", 1), b)
            ratio = r["dense_fwdbwd"] / r[f"{b}_fwdbwd"]
            if key not in worst or ratio < worst[key][0]:
                worst[key] = (ratio, r.get("inputs", "blocks"))
    lines = ["| T×D×F | tp | backend | worst fwd+bwd × | on inputs |", "|---|---|---|---|---|"]
    for (t, d, f, tp, b), (ratio, inputs) in worst.items():
        lines.append(f"| {t}×{d}×{f} | {tp} | {b} | {ratio:.2f} | {inputs} |")
    return "\n".join(lines)


def _mean_rows(runs: list[dict]) -> dict:
    """One row from the rows of one shape and generator measured in several processes: numbers are
    averaged over the processes that measured them, per-run lists concatenated, differing strings (e.g.
    the engine each 2:4 process's tuner chose) joined by " / ", anything else kept from the first."""
    out, numbers = {}, {}
    for r in runs:
        for k, v in r.items():
            if k == "runs_ms":
                for name, ms in v.items():
                    out.setdefault(k, {}).setdefault(name, []).extend(ms)
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("T", "D", "F", "tp"):
                numbers.setdefault(k, []).append(v)
            elif isinstance(v, str) and k in out and v not in out[k].split(" / "):
                out[k] += f" / {v}"
            else:
                out.setdefault(k, v)
    return {**out, **{k: sum(v) / len(v) for k, v in numbers.items()}}


def isolated_rows(shape: str, child_args: list[str]) -> list[dict]:
    """The rows of one shape with the dense FFN and the 2:4 FFNs each in their own process (dense,
    2:4, 2:4, dense), averaged per input generator."""
    by_inputs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, only in enumerate(("dense", "sparse", "sparse", "dense")):
            out = Path(tmp) / f"{i}.json"
            subprocess.run([sys.executable, __file__, "--shapes", shape, "--only", only, "--json", str(out),
                            *child_args], check=True, stdout=subprocess.DEVNULL)
            for r in json.loads(out.read_text()):
                by_inputs.setdefault(r["inputs"], []).append(r)
    return [_mean_rows(runs) for runs in by_inputs.values()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", nargs="*", help="TxDxF[/tp] (default: all); e.g. 16384x4096x16384")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--method", default="naive", choices=["naive", "mvue", "soft_threshold"])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--backends", nargs="+", default=["auto"], choices=["auto", "cutlass", "cusparselt", "dense"],
                   help="sparse FFN backends to compare against the dense FFN (default: auto; 'dense' is the "
                        "2:4 FFN on dense GEMMs)")
    p.add_argument("--inputs", nargs="+", default=sorted(INPUTS), type=inputs_name,
                   help="input generators (default: all of INPUTS; the table has a row per generator); "
                        "captured:FILE[@LAYER] adds a trained model's FFN inputs (tools/capture_ffn_inputs.py)")
    p.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph-replayed timings (fwd+bwd, per GEMM)")
    p.add_argument("--in-process", action="store_true",
                   help="time dense and 2:4 in one process (faster; the dense figures then run at the clock "
                        "the 2:4 kernels leave behind)")
    p.add_argument("--no-fused-f1", action="store_true",
                   help="F1 and the forward packer as two kernels (default: fused where the CUTLASS library "
                        "is built and the one-time timing finds it faster)")
    p.add_argument("--no-fc1-bias", action="store_true", help="FFNs without the fc1 bias (--disable-bias-linear)")
    p.add_argument("--only", choices=["dense", "sparse"], help=argparse.SUPPRESS)  # one isolated process
    p.add_argument("--json", help="write all measurements here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench_ffn.py needs a CUDA GPU")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    shape_args = args.shapes or [f"{t}x{d}x{f * tp}/{tp}" for t, d, f, tp in all_shapes()]
    child_args = ["--dtype", args.dtype, "--method", args.method, "--warmup", str(args.warmup), "--iters",
                  str(args.iters), "--backends", *args.backends, "--inputs", *args.inputs]
    if args.no_graphs:
        child_args.append("--no-graphs")
    if args.no_fused_f1:
        child_args.append("--no-fused-f1")
    if args.no_fc1_bias:
        child_args.append("--no-fc1-bias")
    rows = []
    if args.only is None:
        print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  dtype {args.dtype}  "
              f"method {args.method}  {'one process' if args.in_process else 'dense and 2:4 in separate processes'}",
              flush=True)
    for shape in shape_args:
        dims, _, tp = shape.partition("/")
        t, d, f = (int(v) for v in dims.split("x"))
        tp = int(tp or 1)
        if args.only is None and not args.in_process:
            new = [dict(r, tp=tp) for r in isolated_rows(shape, child_args)]
        else:
            new = []
            for inputs in args.inputs:
                r = bench_shape(t, d, f // tp, dtype, args.warmup, args.iters, args.method, tuple(args.backends),
                                graphs=not args.no_graphs, tp=tp, inputs=inputs, only=args.only,
                                fused_f1=not args.no_fused_f1, fc1_bias=not args.no_fc1_bias)
                new.append(dict(r, tp=tp, inputs=inputs))
                torch.cuda.empty_cache()
        for r in new:
            print(json.dumps(r), flush=True)
        rows += new
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.only is None:
        print(fmt_table(rows))
        print(fmt_worst(rows))


if __name__ == "__main__":
    main()
