"""The 2:4 activation-sparse squared-ReLU FFN as one autograd function.

Read top to bottom: ``sparse24_ffn`` validates and picks dense warmup or the sparse path (and its engine);
``Sparse24FFNFunction`` is the paper's algorithm (``docs/algorithm.md``):

    forward   Y1 = X W1^T + b1                                 F1  dense
              S2 = sp_tok(relu(Y1)^2), one fused pass           packed 2:4 along F (+ counts); or, where
                                                                timed faster, inside F1's epilogue (plan.f1)
              Y  = S2 W2^T                                      F2  sparse
    backward  G2 = dY W2                                        B1  dense
              G1 = G2 * dS2/dY1 on the forward mask             (fused pass, also packs B3/B4)
              dX = G1 W1                                        B2  sparse, exact for the sparse forward
              dW1 = sp_feat(G1)^T X  on the sparse features     B4  sparse  (+ dense GEMM on the 5%)
              dW2 = (sp_feat(S2)^T dY)^T likewise               B3  sparse  (+ dense GEMM on the 5%)

The token permutation (perm, optional) decides which tokens form a feature-wise group: perm[4q..4q+3].
It is applied inside the backward pack, whose feature-wise operands come out with their tokens in the
order perm, so only B3's and B4's dense operands are gathered (dY[perm], X[perm]); every other tensor
stays in token order (no gathers of X, Y, dY, dX). MVUE draws its random numbers by a token's place
in perm (inv = perm's inverse). The dense features are the ones with the most non-zeros in S2,
re-chosen every step from the forward's per-feature counts. Saved for backward: X, W1, W2 (no
copies), the packed S2 (values + metadata) and the counts, plus the kept values of dS2/dY1 (except for "naive" in bf16, whose
backward recomputes them exactly, 2 relu(Y1) = 2 bf16(sqrt(S2))): about a quarter of the activation
memory of a dense squared-ReLU FFN, which keeps Y1 and relu(Y1)^2 (a half with the derivatives).
(``Sparse24Config.forward_mask_in_backward=False`` is the paper's ablation instead: Y1 saved,
G1 = 2 G2 * relu(Y1) without the mask.)

``Sparse24DenseGemmFFNFunction`` computes the same FFN with dense GEMMs on the sparsified operands
kept dense (the permutation applied inside its backward kernel too, with no gathers at all);
``engine.choose_engine`` times the engines once per shape for backend "auto" (the 2:4 one with each 2:4
backend that can run: our CUTLASS kernels, cuSPARSELt) and keeps the fastest.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import ops
from .backends import device_index, resolve_backend
from .backends.f1_pack import shared_f1_packer
from .config import Sparse24Config
from .kernels import reference, rng
from .kernels.layout import SUPPORTED_DTYPES, Packed24

__all__ = ["sparse24_ffn", "dense_relu2_ffn", "Sparse24FFNFunction", "Sparse24DenseGemmFFNFunction", "FFNPlan",
           "make_plan"]

logger = logging.getLogger(__name__)

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
    gemm: object  # a backends.Sparse24Gemm (None for the dense-GEMM engine, backend "dense")
    scale: object = None  # soft threshold: frozen fp32 tensor or float
    accumulate_main_grad: bool = False  # Megatron's gradient_accumulation_fusion: dW -> weight.main_grad
    stats: object = None  # optional int64 [4] device tensor, see Sparse24Stats
    forward_mask_in_backward: bool = True  # False: the paper's ablation (see Sparse24Config)
    #: "sparse": Sparse24FFNFunction (2:4 GEMMs of ``gemm``); "dense": Sparse24DenseGemmFFNFunction;
    #: "auto": whichever ``engine.choose_engine`` measures faster for the shape
    engine: str = "sparse"
    #: the layer's tensor-parallel group: its engine and GEMM choices are theirs in common (agreement.py)
    tuning_group: object = None
    #: a backends.F1Packer where F1 may run with the forward packer fused into its epilogue (bf16,
    #: "naive", CUTLASS library built), else None: F1, then the packer
    f1: object = None


def make_plan(config: Sparse24Config, shape: tuple[int, int, int], device, dtype, *, step: int,
              seed: int, scale=None, accumulate_main_grad: bool = False, stats=None,
              tuning_group=None) -> FFNPlan:
    """Resolve the backend, engine and seeds for an FFN of shape (T, F, D)."""
    if config.backend == "dense":
        gemm, engine = None, "dense"
    else:
        gemm = resolve_backend(config.backend, device, dtype, shape)
        # "auto" over real 2:4 GEMMs measures both engines per shape (the ablation exists only sparse)
        timed = config.backend == "auto" and gemm.name != "emulated" and config.forward_mask_in_backward
        engine = "auto" if timed else "sparse"
    f1 = None
    if (config.fused_f1 and gemm is not None and gemm.name != "emulated" and dtype == torch.bfloat16
            and config.method == "naive" and config.forward_mask_in_backward):
        f1 = shared_f1_packer(device_index(torch.device(device)))
    return FFNPlan(
        method=config.method,
        n_dense=reference.num_dense_features(shape[1], config.dense_feature_fraction),
        mvue_seed=rng.mix_seed(config.seed, seed, step, _MVUE_STREAM),
        gemm=gemm,
        scale=scale,
        accumulate_main_grad=accumulate_main_grad,
        stats=stats,
        forward_mask_in_backward=config.forward_mask_in_backward,
        engine=engine,
        tuning_group=tuning_group,
        f1=f1,
    )


def permutation_seed(config: Sparse24Config, seed: int) -> int:
    """Seed of the fixed token permutation of one layer (independent of the step)."""
    return rng.mix_seed(config.seed, seed, _PERM_STREAM)


class Sparse24FFNFunction(torch.autograd.Function):
    """y = FFN(x) with 2:4 sparse F2/B2/B3/B4; see the module docstring. perm/inv may be None."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, perm, inv, plan: FFNPlan):
        y1_numel = x.shape[0] * w1.shape[0]
        if plan.f1 is not None:  # F1 with the packer in its epilogue where that is faster (Y1 never stored)
            s2, d_vals, counts = plan.f1.pack(x, w1, b1, plan.gemm.layout, group=plan.tuning_group)
            y1_saved = None
        else:
            y1 = F.linear(x, w1, b1)  # F1
            s2, d_vals, counts = ops.pack_relu2_sparse24(y1, plan.method, plan.scale, plan.mvue_seed,
                                                         layout=plan.gemm.layout, row_ids=inv)
            # Y1 not saved: the packed S2 (and d_vals, None for bf16 "naive") are all the backward needs
            # (but the ablation's).
            y1_saved = None if plan.forward_mask_in_backward else y1
            del y1
        y3 = plan.gemm.spmm(s2, w2.t(), group=plan.tuning_group)  # F2
        _count_forward(plan, counts, y1_numel)
        ctx.plan = plan
        ctx.has_b1 = b1 is not None
        ctx.save_for_backward(x, w1, w2, s2.buffer, d_vals, counts, perm, y1_saved)
        return y3

    @staticmethod
    def backward(ctx, grad_y):
        x, w1, w2, s2_buf, d_vals, counts, perm, y1 = ctx.saved_tensors
        plan = ctx.plan
        s2 = Packed24(s2_buf, x.shape[0], w1.shape[0], plan.gemm.layout)  # [T, F], packed for this backend
        g3 = grad_y.contiguous()
        g2 = g3 @ w2  # B1
        dense_idx, dense_pos = _dense_split(plan, counts)
        need_x, need_w1, need_b1, need_w2 = ctx.needs_input_grad[:4]
        # the feature-wise outputs (g1t, s2t and the dense parts) hold the tokens in the order perm
        if plan.forward_mask_in_backward:
            g1, g1t, g1_dense, s2t, s2_dense, db1 = ops.pack_backward(
                g2, s2, d_vals, dense_pos, plan.n_dense, with_bias_grad=ctx.has_b1 and need_b1, perm=perm
            )
        else:  # the paper's ablation (needs the saved Y1)
            g1, g1t, g1_dense, s2t, s2_dense, db1 = ops.pack_backward_without_forward_mask(
                g2, y1, s2, dense_pos, plan.n_dense, with_bias_grad=ctx.has_b1 and need_b1, perm=perm
            )
        dx = dw1 = dw2 = None
        if need_x:
            dx = plan.gemm.spmm(g1, w1, group=plan.tuning_group)  # B2: exact gradient of the sparsified forward
        if need_w1:
            xp = x if perm is None else x.index_select(0, perm)  # B4's dense operand in the packs' token order
            dw1 = plan.gemm.spmm(g1t, xp, group=plan.tuning_group)  # B4 (dense-feature rows are zero here)
            if plan.n_dense:
                dw1.index_copy_(0, dense_idx, g1_dense @ xp)
        if need_w2:
            g3p = g3 if perm is None else g3.index_select(0, perm)  # B3's, likewise
            dw2 = plan.gemm.spmm(s2t, g3p, transpose_result=True, group=plan.tuning_group)  # B3, [D, F]
            if plan.n_dense:
                ops.write_dense_columns_(dw2, dense_pos, s2_dense @ g3p)
        if db1 is not None:
            db1 = db1.to(w1.dtype)
        if plan.accumulate_main_grad:
            dw1, dw2 = _into_main_grad(w1, dw1), _into_main_grad(w2, dw2)
        return dx, dw1, db1, dw2, None, None, None


class Sparse24DenseGemmFFNFunction(torch.autograd.Function):
    """The same FFN as Sparse24FFNFunction, same selections and values, with all six GEMMs dense
    (cuBLAS) on operands kept dense with zeros where 2:4 dropped (``FFNPlan.engine`` "dense").

    Where 2:4 GEMMs do not pay (narrow per-rank widths: small GEMMs, and the packs, permutation
    gathers and launches cost more than they save) this is the faster way to train the same model.
    The token permutation is not applied to any operand: perm (int64 [T] or None) only defines the
    feature-wise groups (tokens perm[4q..4q+3]) inside the backward kernel, and inv (its inverse)
    the rows whose random numbers MVUE draws, so results equal those of Sparse24FFNFunction with
    the same perm, up to GEMM summation order. Saved: X, W1, W2, S2 [T, F] (and d(S2)/d(Y1) [T, F]
    unless recomputed exactly, as above), the counts.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, perm, inv, plan: FFNPlan):
        y1 = F.linear(x, w1, b1)  # F1
        y1_numel = y1.numel()
        s2, d, counts = ops.sparsify_forward_dense(y1, plan.method, plan.scale, plan.mvue_seed, row_ids=inv)
        del y1
        _count_forward(plan, counts, y1_numel)
        ctx.plan = plan
        ctx.has_b1 = b1 is not None
        ctx.save_for_backward(x, w1, w2, s2, d, counts, perm)
        return F.linear(s2, w2)  # F2

    @staticmethod
    def backward(ctx, grad_y):
        x, w1, w2, s2, d, counts, perm = ctx.saved_tensors
        plan = ctx.plan
        g3 = grad_y.contiguous()
        g2 = g3 @ w2  # B1
        _, dense_pos = _dense_split(plan, counts)
        need_x, need_w1, need_b1, need_w2 = ctx.needs_input_grad[:4]
        g1, g1_fw, s2_fw, db1 = ops.sparsify_backward_dense(g2, s2, d, dense_pos, perm,
                                                            with_bias_grad=ctx.has_b1 and need_b1)
        dx = g1 @ w1 if need_x else None  # B2
        dw1 = g1_fw.t() @ x if need_w1 else None  # B4 (dense features whole)
        dw2 = g3.t() @ s2_fw if need_w2 else None  # B3
        if db1 is not None:
            db1 = db1.to(w1.dtype)
        if plan.accumulate_main_grad:
            dw1, dw2 = _into_main_grad(w1, dw1), _into_main_grad(w2, dw2)
        return dx, dw1, db1, dw2, None, None, None


def _count_forward(plan: FFNPlan, counts, y1_numel: int) -> None:
    if plan.stats is not None:  # device-side telemetry, no host sync
        plan.stats[STAT_NNZ] += counts[-1]
        plan.stats[STAT_KEPT] += counts[:-1].sum()
        plan.stats[STAT_ELEMENTS] += y1_numel


def _dense_split(plan: FFNPlan, counts):
    dense_idx, dense_pos = ops.dense_feature_split(counts[:-1], plan.n_dense)
    if plan.stats is not None:
        plan.stats[STAT_DENSE_KEPT] += counts[dense_idx].sum()
    return dense_idx, dense_pos


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
                 permutation: tuple[torch.Tensor, torch.Tensor] | None = None,
                 tuning_group: torch.distributed.ProcessGroup | None = None) -> torch.Tensor:
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
        tuning_group: ranks that run this FFN on the same tokens at the same time (its
            tensor-parallel ranks); backend "auto"'s engine and every GEMM choice are then the same
            on all of them (one broadcast per shape and process, which every rank of the group must
            reach with the same shape).

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
                     scale=soft_threshold_scale if config.method == "soft_threshold" else None,
                     tuning_group=tuning_group)
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
    from .engine import choose_engine  # engine.py times this module's functions: imported at use

    plan = choose_engine(plan, (t, f, d), x.dtype, x.device, b1 is not None,
                         sparse_permutes=config.token_permutation, dense_permutes=config.token_permutation)
    function = Sparse24DenseGemmFFNFunction if plan.engine == "dense" else Sparse24FFNFunction
    return function.apply(x, w1, b1, w2, perm, inv, plan)
