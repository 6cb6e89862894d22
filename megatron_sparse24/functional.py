"""The 2:4 activation-sparse squared-ReLU FFN as one autograd function.

Read top to bottom: ``sparse24_ffn`` validates and picks dense warmup or the sparse path;
``Sparse24FFNFunction`` is the paper's algorithm (``../shared/notes/algorithm.md`` of the project):

    forward   X = X_in[perm]                                   (token permutation, optional)
              Y1 = X W1^T + b1                                 F1  dense
              S2 = sp_tok(relu(Y1)^2), one fused pass           packed 2:4 along F (+ counts)
              Y3 = S2 W2^T                                      F2  sparse
              Y  = Y3[inv]
    backward  G3 = dY[perm]
              G2 = G3 W2                                        B1  dense
              G1 = G2 * dS2/dY1 on the forward mask             (fused pass, also packs B3/B4)
              dX = (G1 W1)[inv]                                 B2  sparse, exact for the sparse forward
              dW1 = sp_feat(G1)^T X  on the sparse features     B4  sparse  (+ dense GEMM on the 5%)
              dW2 = (sp_feat(S2)^T G3)^T likewise               B3  sparse  (+ dense GEMM on the 5%)

The dense features are the ones with the most non-zeros in S2, re-chosen every step from the
forward's per-feature counts. Saved for backward: X, W1, W2 (no copies), the packed S2 (values +
metadata) and the counts, plus the kept values of dS2/dY1 (except for "naive" in bf16, whose
backward recomputes them exactly, 2 relu(Y1) = 2 bf16(sqrt(S2))): about a quarter of the activation
memory of a dense squared-ReLU FFN, which keeps Y1 and relu(Y1)^2 (a half with the derivatives).
(``Sparse24Config.forward_mask_in_backward=False`` is the paper's ablation instead: Y1 saved,
G1 = 2 G2 * relu(Y1) without the mask.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import ops
from .backends import resolve_backend
from .config import Sparse24Config
from .kernels import reference, rng
from .kernels.layout import SUPPORTED_DTYPES, Packed24

__all__ = ["sparse24_ffn", "dense_relu2_ffn", "Sparse24FFNFunction", "FFNPlan", "make_plan"]

#: Slots of FFNPlan.stats (summed over calls): non-zeros of relu(Y1)^2 before 2:4, non-zeros kept
#: by 2:4, elements of Y1, and kept non-zeros in the features whose weight gradients were dense.
STAT_NNZ, STAT_KEPT, STAT_ELEMENTS, STAT_DENSE_KEPT = range(4)

_PERM_STREAM = 0x7065726D  # distinct seed streams: token permutation vs MVUE sampling
_MVUE_STREAM = 0x6D767565


def dense_relu2_ffn(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, b1=None) -> torch.Tensor:
    """The dense squared-ReLU FFN (warmup and A/B baseline): relu(x W1^T + b1)^2 W2^T."""
    return F.linear(torch.relu(F.linear(x, w1, b1)).square(), w2)


@dataclass(frozen=True)
class FFNPlan:
    """Everything the autograd function needs besides tensors (resolved once per call)."""

    method: str
    n_dense: int
    mvue_seed: int
    gemm: object  # a backend from backends.py
    scale: object = None  # soft threshold: frozen fp32 tensor or float
    accumulate_main_grad: bool = False  # Megatron's gradient_accumulation_fusion: dW -> weight.main_grad
    stats: object = None  # optional int64 [4] device tensor, see Sparse24Stats
    forward_mask_in_backward: bool = True  # False: the paper's ablation (see Sparse24Config)


def make_plan(config: Sparse24Config, shape: tuple[int, int, int], device, dtype, *, step: int,
              seed: int, scale=None, accumulate_main_grad: bool = False, stats=None) -> FFNPlan:
    """Resolve the backend and seeds for an FFN of shape (T, F, D)."""
    return FFNPlan(
        method=config.method,
        n_dense=reference.num_dense_features(shape[1], config.dense_feature_fraction),
        mvue_seed=rng.mix_seed(config.seed, seed, step, _MVUE_STREAM),
        gemm=resolve_backend(config.backend, device, dtype, shape),
        scale=scale,
        accumulate_main_grad=accumulate_main_grad,
        stats=stats,
        forward_mask_in_backward=config.forward_mask_in_backward,
    )


def permutation_seed(config: Sparse24Config, seed: int) -> int:
    """Seed of the fixed token permutation of one layer (independent of the step)."""
    return rng.mix_seed(config.seed, seed, _PERM_STREAM)


class Sparse24FFNFunction(torch.autograd.Function):
    """y = FFN(x) with 2:4 sparse F2/B2/B3/B4; see the module docstring. perm/inv may be None."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, perm, inv, plan: FFNPlan):
        xp = x if perm is None else x.index_select(0, perm)
        y1 = F.linear(xp, w1, b1)  # F1
        y1_numel = y1.numel()
        s2, d_vals, counts = ops.pack_relu2_sparse24(y1, plan.method, plan.scale, plan.mvue_seed,
                                                     layout=plan.gemm.layout)
        # Y1 not saved: the packed S2 (and d_vals, None for bf16 "naive") are all the backward needs
        # (but the ablation's).
        y1_saved = None if plan.forward_mask_in_backward else y1
        del y1
        y3 = plan.gemm.spmm(s2, w2.t())  # F2
        if plan.stats is not None:  # device-side telemetry, no host sync
            plan.stats[STAT_NNZ] += counts[-1]
            plan.stats[STAT_KEPT] += counts[:-1].sum()
            plan.stats[STAT_ELEMENTS] += y1_numel
        ctx.plan = plan
        ctx.has_b1 = b1 is not None
        # x, not xp: x is usually alive anyway (the caller's), xp would add [T, D] per layer; the
        # backward gathers it again (one [T, D] pass)
        ctx.save_for_backward(x, w1, w2, s2.buffer, d_vals, counts, perm, inv, y1_saved)
        return y3 if inv is None else y3.index_select(0, inv)

    @staticmethod
    def backward(ctx, grad_y):
        x, w1, w2, s2_buf, d_vals, counts, perm, inv, y1 = ctx.saved_tensors
        plan = ctx.plan
        s2 = Packed24(s2_buf, x.shape[0], w1.shape[0], plan.gemm.layout)  # [T, F], packed for this backend
        g3 = grad_y.contiguous() if perm is None else grad_y.index_select(0, perm)
        g2 = g3 @ w2  # B1
        dense_idx, dense_pos = ops.dense_feature_split(counts[:-1], plan.n_dense)
        if plan.stats is not None:
            plan.stats[STAT_DENSE_KEPT] += counts[dense_idx].sum()
        need_x, need_w1, need_b1, need_w2 = ctx.needs_input_grad[:4]
        if plan.forward_mask_in_backward:
            g1, g1t, g1_dense, s2t, s2_dense, db1 = ops.pack_backward(
                g2, s2, d_vals, dense_pos, plan.n_dense, with_bias_grad=ctx.has_b1 and need_b1
            )
        else:  # the paper's ablation (needs the saved Y1)
            g1, g1t, g1_dense, s2t, s2_dense, db1 = ops.pack_backward_without_forward_mask(
                g2, y1, s2, dense_pos, plan.n_dense, with_bias_grad=ctx.has_b1 and need_b1
            )
        dx = dw1 = dw2 = None
        if need_x:
            dxp = plan.gemm.spmm(g1, w1)  # B2: exact gradient of the sparsified forward
            dx = dxp if inv is None else dxp.index_select(0, inv)
        if need_w1:
            xp = x if perm is None else x.index_select(0, perm)
            dw1 = plan.gemm.spmm(g1t, xp)  # B4 (dense-feature rows are zero here)
            if plan.n_dense:
                dw1.index_copy_(0, dense_idx, g1_dense @ xp)
        if need_w2:
            dw2 = plan.gemm.spmm(s2t, g3, transpose_result=True)  # B3, [D, F]
            if plan.n_dense:
                dw2.index_copy_(1, dense_idx, (s2_dense @ g3).t())
        if db1 is not None:
            db1 = db1.to(w1.dtype)
        if plan.accumulate_main_grad:
            dw1, dw2 = _into_main_grad(w1, dw1), _into_main_grad(w2, dw2)
        return dx, dw1, db1, dw2, None, None, None


def _into_main_grad(weight: torch.Tensor, grad):
    """Megatron's gradient_accumulation_fusion contract: add into weight.main_grad, mark it, and
    hand autograd a placeholder (what megatron's own linear layers do without Transformer Engine)."""
    if grad is None or not hasattr(weight, "main_grad"):
        return grad
    weight.main_grad.add_(grad)
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    weight.grad_added_to_main_grad = True
    if getattr(weight, "zero_out_wgrad", False):
        return torch.zeros_like(weight)
    return torch.empty_like(weight)


def _check_inputs(x, w1, w2, b1):
    for name, t in (("x", x), ("w1", w1), ("w2", w2)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)} "
                             "(x: [tokens, hidden], w1: [ffn, hidden], w2: [hidden, ffn])")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"x.dtype={x.dtype} is not supported: use bfloat16, float16 or float32")
    if w1.dtype != x.dtype or w2.dtype != x.dtype or (b1 is not None and b1.dtype != x.dtype):
        raise ValueError(f"x, w1, w2 and b1 must share one dtype (x is {x.dtype}, w1 {w1.dtype}, "
                         f"w2 {w2.dtype}); cast the weights or the input")
    t, d = x.shape
    f = w1.shape[0]
    if w1.shape != (f, d) or w2.shape != (d, f):
        raise ValueError(f"shape mismatch: x {tuple(x.shape)}, w1 {tuple(w1.shape)} (expected [F, {d}]), "
                         f"w2 {tuple(w2.shape)} (expected [{d}, F])")
    if b1 is not None and b1.shape != (f,):
        raise ValueError(f"b1 has shape {tuple(b1.shape)}, expected ({f},)")
    if f % 4:
        raise ValueError(f"FFN width {f} (per tensor-parallel rank) is not a multiple of 4: 2:4 groups "
                         "need it; choose --ffn-hidden-size so that ffn_hidden_size / tp is a multiple "
                         "of 4 (of 64 for the cuSPARSELt backend)")
    if t % 4:
        raise ValueError(f"{t} tokens is not a multiple of 4: feature-wise 2:4 groups 4 consecutive "
                         "tokens; make seq_length x micro_batch_size (after the sequence-parallel "
                         "gather) a multiple of 4")


def sparse24_ffn(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, b1: torch.Tensor | None = None, *,
                 config: Sparse24Config, step: int, seed: int = 0,
                 soft_threshold_scale: torch.Tensor | float | None = None,
                 permutation: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Squared-ReLU FFN with 2:4 activation sparsity (Haziza et al. 2025).

    Args:
        x: [T, D] input tokens, T % 4 == 0. fp32, fp16 or bf16 (w1, w2, b1 the same dtype).
        w1: [F, D] fc1 weight (Megatron's ``linear_fc1.weight`` layout), F % 4 == 0.
        w2: [D, F] fc2 weight (``linear_fc2.weight``).
        b1: optional [F] fc1 bias. (An fc2 bias is added by the caller.)
        config: ``Sparse24Config``.
        step: optimizer steps done so far; ``step < config.dense_warmup_steps`` runs the plain
            dense FFN (``dense_relu2_ffn``) with ordinary autograd.
        seed: per-layer seed (e.g. the layer number), mixed with ``config.seed`` for the token
            permutation (fixed over steps) and with ``step`` for MVUE sampling.
        soft_threshold_scale: frozen S-STE scale (method "soft_threshold"); None computes it from
            this batch (a layer freezes it once instead).
        permutation: optional (perm, inv) int64 [T] on x's device, exactly
            ``ops.token_permutation(T, permutation_seed(config, seed), x.device)``: computed once and
            passed on every call, it saves recomputing the permutation (about 25 small kernels and
            a sort, 0.5 ms of host time on an H200 machine) each call, as the Megatron layer does
            by keeping it in the module. Only its shape is checked (a value check would sync).

    Returns:
        y [T, D] in x's dtype. Gradients: dx is the exact gradient of the sparsified forward (the
        forward mask is kept); dw1 and dw2 use feature-wise 2:4 on all but the densest
        ``dense_feature_fraction`` of the features; db1 is exact.
    """
    if not isinstance(config, Sparse24Config):
        raise TypeError("config must be a megatron_sparse24.Sparse24Config")
    _check_inputs(x, w1, w2, b1)
    if step < config.dense_warmup_steps:
        return dense_relu2_ffn(x, w1, w2, b1)
    t, d = x.shape
    f = w1.shape[0]
    if config.method == "soft_threshold" and soft_threshold_scale is None:
        with torch.no_grad():
            soft_threshold_scale = ops.soft_threshold_scale(F.linear(x, w1, b1))
    plan = make_plan(config, (t, f, d), x.device, x.dtype, step=step, seed=seed,
                     scale=soft_threshold_scale if config.method == "soft_threshold" else None)
    perm = inv = None
    if permutation is not None and not config.token_permutation:
        raise ValueError("permutation= was given but config.token_permutation is False: drop the argument "
                         "or enable the permutation")
    if config.token_permutation:
        if permutation is None:
            perm, inv = ops.token_permutation(t, permutation_seed(config, seed), x.device)
        else:
            perm, inv = permutation
            for name, p in (("perm", perm), ("inv", inv)):
                if p.shape != (t,) or p.dtype != torch.int64 or p.device != x.device:
                    raise ValueError(f"permutation: {name} must be int64 [{t}] on {x.device} (from "
                                     f"ops.token_permutation), got {p.dtype} {tuple(p.shape)} on {p.device}")
    return Sparse24FFNFunction.apply(x, w1, b1, w2, perm, inv, plan)
