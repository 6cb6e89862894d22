"""The op API over the kernels: a few functions with exact semantics.

Every op runs its Triton kernel when the tensor's device supports it (CUDA, or CPU with
``TRITON_INTERPRET=1``) and its plain-PyTorch reference otherwise; both give the same result
(bit-identical selections; values equal up to one bf16/fp16 rounding step on the interpreter).

Conventions: "token-wise 2:4" = groups of 4 consecutive elements along the LAST dim (features);
"feature-wise 2:4" = groups of 4 consecutive tokens along dim 0. Ties go to the lower index; NaN
ranks above every number so it propagates instead of being silently dropped.
"""

from __future__ import annotations

import torch

from . import kernels
from .kernels import reference, rng
from .kernels.layout import SUPPORTED_DTYPES, Packed24, decompress24

__all__ = [
    "relu2_sparsify24",
    "sparsify24_featurewise",
    "token_permutation",
    "soft_threshold_scale",
    "soft_threshold_sums",
    "dropped_by_24_sums",
    "dense_feature_split",
    "pack_relu2_sparse24",
    "pack_backward",
    "pack_backward_without_forward_mask",
    "sparsify_forward_dense",
    "sparsify_backward_dense",
    "unpack24",
]


def _check_float(name: str, t: torch.Tensor):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}.dtype={t.dtype} is not supported: cast it to bfloat16, float16 or float32")


def _check_method(method: str, scale, seed):
    if method not in reference.METHODS:
        raise ValueError(f"method={method!r}: expected one of {reference.METHODS}")
    if scale is not None and method != "soft_threshold":
        raise ValueError(f"scale= only applies to method='soft_threshold' (got method={method!r})")
    if method == "mvue" and seed is None:
        raise ValueError("method='mvue' samples: pass seed= (an int your framework controls, e.g. from "
                         "the step and layer) so results are reproducible")


def relu2_sparsify24(y1: torch.Tensor, method: str = "naive", *, scale=None, seed: int | None = None):
    """Squared ReLU followed by token-wise 2:4 sparsification.

    Args:
        y1: [..., F] pre-activation (fc1 output), F % 4 == 0; fp32, fp16 or bf16.
        method: "naive" keeps the two largest of each 4 consecutive values along the last dim (ties
            to the lower index); "mvue" samples two of them without replacement with probability
            proportional to their value and rescales them by their inclusion probability, so that
            E[y2_sparse] = relu(y1)**2 (groups with <= 2 non-zeros are kept exactly);
            "soft_threshold" keeps the top two, subtracts the largest dropped value from them and
            multiplies by ``scale`` (S-STE).
        scale: soft_threshold only: float or fp32 0-dim tensor (the frozen per-tensor scale, see
            ``soft_threshold_scale``); None means 1.
        seed: mvue only (required): int seed of the sampling. Same seed and input -> same output.

    Returns:
        (y2_sparse, mask): y2_sparse has y1's shape and dtype, at most 2 non-zeros in every group of
        4 along the last dim, zeros where dropped; mask (bool, same shape) marks the two kept slots
        of every group (a kept slot may hold a zero). Not differentiable: the FFN's autograd
        function (``functional.sparse24_ffn``) owns the gradients.
    """
    _check_float("y1", y1)
    _check_method(method, scale, seed)
    if y1.dim() == 0 or y1.shape[-1] % 4 != 0:
        raise ValueError(
            f"y1 has shape {tuple(y1.shape)}: its last dim (features) must be a multiple of 4 for 2:4 "
            "groups; pad it or pick an FFN width divisible by 4 (per tensor-parallel rank)"
        )
    shape = y1.shape
    y2d = y1.detach().reshape(-1, shape[-1]).contiguous()
    k1, k2 = rng.seed_keys(0 if seed is None else seed)
    if y2d.numel() == 0:
        return torch.zeros_like(y1), torch.zeros(shape, dtype=torch.bool, device=y1.device)
    if kernels.use_triton(y2d):
        out, mask = kernels.triton_kernels.relu2_sparsify24(y2d, method, scale, k1, k2)
    else:
        out, keep, _ = reference.relu2_sparsify24_full(y2d, method, scale, k1, k2)
        out, mask = out.to(y1.dtype), keep
    return out.reshape(shape), mask.reshape(shape)


def soft_threshold_sums(y1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(<x, S(x)>, <S(x), S(x)>) for x = relu(y1)**2, S the unscaled soft threshold along the last
    dim: fp32 0-dim tensors, so shards of one tensor (tensor parallelism) can be summed first."""
    _check_float("y1", y1)
    y2d = y1.detach().reshape(-1, y1.shape[-1])
    x = reference.relu(y2d.float()) ** 2
    s, _, _ = reference.relu2_sparsify24_full(y2d, "soft_threshold", 1.0)
    return (x * s).sum(), (s * s).sum()


def dropped_by_24_sums(y1: torch.Tensor) -> torch.Tensor:
    """What token-wise 2:4 drops of the activation x = relu(y1)**2, counted three ways: a float64
    [3, 2] tensor of (dropped, total) for the non-zeros, the L1 mass (sum of x) and the L2 mass (sum of
    x**2). Groups of 4 along the last dim (y1 [..., F], F a multiple of 4), naive top-2: the two smallest
    of each group are dropped (ties do not change the sums). Sums, so shards of one tensor (tensor
    parallelism, several ranks' tokens) add up before shares are taken."""
    _check_float("y1", y1)
    r = reference.relu(y1.detach()).reshape(-1, 4)  # x = r**2 orders like r (r >= 0)
    # The two smallest of each group by a min/max network on its four columns: elementwise, where torch's
    # topk over the 4-element rows took 26x longer (22.8 ms per layer at 1024 x 16384 on an H200).
    r0, r1, r2, r3 = r.unbind(-1)
    lo01, hi01, lo23, hi23 = torch.minimum(r0, r1), torch.maximum(r0, r1), torch.minimum(r2, r3), torch.maximum(r2, r3)
    first = torch.minimum(lo01, lo23)
    second = torch.minimum(torch.maximum(lo01, lo23), torch.minimum(hi01, hi23))
    dropped = torch.stack((first, second)).double() ** 2  # float64: shards' sums add up exactly
    x = r.double() ** 2
    rows = [((dropped > 0).sum(), (x > 0).sum()), (dropped.sum(), x.sum()), ((dropped ** 2).sum(), (x ** 2).sum())]
    return torch.stack([torch.stack([d.double(), t.double()]) for d, t in rows])


def soft_threshold_scale(y1: torch.Tensor) -> torch.Tensor:
    """S-STE's per-tensor scale beta = <x, S(x)> / <S(x), S(x)> for x = relu(y1)**2 and S the
    unscaled soft threshold: an fp32 0-dim tensor on y1's device (1 if S(x) is all zero), computed
    without host syncs. Compute it once (first sparse step) and freeze it; pass it as ``scale=``."""
    num, den = soft_threshold_sums(y1)
    return torch.where(den > 0, num / den, torch.ones_like(num))


def _dense_positions(dense_idx: torch.Tensor, num_features: int) -> torch.Tensor:
    pos = torch.full((num_features,), -1, dtype=torch.int32, device=dense_idx.device)
    # scatter_, not pos[dense_idx] = ...: same result, a third of the host time (no advanced indexing)
    return pos.scatter_(0, dense_idx, torch.arange(dense_idx.numel(), dtype=torch.int32, device=dense_idx.device))


def sparsify24_featurewise(g: torch.Tensor, *, dense_fraction: float = 0.05, dense_idx=None):
    """Feature-wise 2:4 with the paper's dense split.

    Args:
        g: [T, F], T % 4 == 0; fp32, fp16 or bf16.
        dense_fraction: share of features kept dense when ``dense_idx`` is None: the features with
            the MOST non-zeros in g (ties to the lower index), at least ``dense_fraction * F``
            rounded up to a multiple of 8 (the dense GEMM's alignment), at most F.
        dense_idx: optional int tensor of the dense features (any order).

    Returns:
        (g_sparse, dense_idx): g_sparse [T, F] in g's dtype: dense feature columns unchanged; every
        other column keeps the top-2 |g| of each 4 consecutive tokens (dim 0), zeros elsewhere.
        dense_idx: the dense features, sorted, int64.
    """
    _check_float("g", g)
    if g.dim() != 2:
        raise ValueError(f"g must be 2-D [tokens, features], got shape {tuple(g.shape)}")
    t, f = g.shape
    if t % 4 != 0:
        raise ValueError(
            f"g has {t} tokens: feature-wise 2:4 groups 4 consecutive tokens, so the token count "
            "(sequence length x micro-batch after the sequence-parallel gather) must be a multiple of 4"
        )
    if dense_idx is None:
        if not 0.0 <= dense_fraction <= 1.0:
            raise ValueError(f"dense_fraction={dense_fraction} must be in [0, 1]")
        counts = (g != 0).sum(0)
        dense_idx = reference.select_dense_features(counts, reference.num_dense_features(f, dense_fraction))
    else:
        dense_idx = torch.as_tensor(dense_idx, device=g.device).to(torch.int64).sort().values
    g = g.detach().contiguous()
    if kernels.use_triton(g):
        out = kernels.triton_kernels.sparsify24_featurewise(g, _dense_positions(dense_idx, f))
    else:
        out = reference.sparsify24_featurewise(g, dense_idx)
    return out, dense_idx


def token_permutation(num_tokens: int, seed: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed pseudo-random permutation of ``num_tokens`` tokens and its inverse (int64).

    ``x[perm]`` permutes rows, ``y[inv]`` undoes it. Depends only on (num_tokens, seed): the same on
    CPU and GPU, computed on ``device`` without host syncs.
    """
    if num_tokens < 0:
        raise ValueError(f"num_tokens={num_tokens} must be >= 0")
    return reference.token_permutation(int(num_tokens), int(seed), device)


# --- Internal ops of the FFN's autograd function ---------------------------------------------------


def pack_relu2_sparse24(y1: torch.Tensor, method: str, scale, seed: int, layout: str = "cusparselt",
                        row_ids: torch.Tensor | None = None):
    """F1 output y1 [T, F] -> (s2 Packed24 [T, F] token-wise 2:4, d_vals [T, F/2] or None where the
    backward recomputes them (bf16 "naive", ``reference.recomputes_derivative``), counts int32 [F+1]).

    See ``kernels.reference.pack_forward``. One pass over y1 on the Triton path. ``layout``: the
    metadata layout of the GEMM backend that consumes s2 (and the backward's packs). row_ids: int64
    [T], the inverse token permutation when the tokens are not permuted (MVUE then draws what it
    draws on permuted tokens)."""
    k1, k2 = rng.seed_keys(seed)
    if kernels.use_triton(y1):
        return kernels.triton_kernels.pack_forward(y1.contiguous(), method, scale, k1, k2, layout=layout,
                                                   row_ids=row_ids)
    return reference.pack_forward(y1, method, scale, k1, k2, layout, row_ids)


def dense_feature_split(counts: torch.Tensor, n_dense: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense_idx int64 [n_dense], dense_pos int32 [F]: row of the feature in the dense part or -1).
    dense_idx lists the dense features by decreasing count (ties: lower index first), not by index:
    the dense parts' rows only have to agree with dense_pos (one sort less on the hot path). counts:
    the per-feature non-zero counts (>= 0) of ``pack_relu2_sparsify24``; on GPU, for int32 counts of
    up to 8192 features (narrow per-rank widths, where launches dominate), one Triton kernel that
    ranks the features by pairwise comparison instead of sorting; above that torch's sort is faster."""
    if (kernels.use_triton(counts) and n_dense and counts.dtype == torch.int32 and counts.is_contiguous()
            and counts.numel() <= kernels.triton_kernels.DENSE_SPLIT_MAX_FEATURES):
        return kernels.triton_kernels.dense_feature_split(counts, n_dense)  # one launch, no sort
    dense_idx = reference.select_dense_features(counts, n_dense, sort_indices=False)
    return dense_idx, _dense_positions(dense_idx, counts.numel())


def write_dense_columns_(dst: torch.Tensor, dense_pos: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """In place: dst[:, f] = rows[dense_pos[f]] for every feature f with dense_pos[f] >= 0 (the dense
    features' columns of dW2, written into the 2:4 GEMM's output); returns dst. dst [D, F]; dense_pos
    int32 [F] from ``dense_feature_split``; rows [n_dense, D] in dst's dtype. On GPU one pass over the
    column tiles that hold a dense feature, in whole 32-byte sectors (``index_copy_`` along dim 1 took
    0.2 ms at 4096 x 16384)."""
    if rows.dim() != 2 or rows.shape[1] != dst.shape[0] or dense_pos.shape != dst.shape[1:] or rows.dtype != dst.dtype:
        raise ValueError(f"rows {tuple(rows.shape)} {rows.dtype} and dense_pos {tuple(dense_pos.shape)} do not fit "
                         f"dst {tuple(dst.shape)} {dst.dtype}: expected rows [n_dense, {dst.shape[0]}], dense_pos "
                         f"[{dst.shape[1]}]")
    if kernels.use_triton(dst) and dst.is_contiguous():
        return kernels.triton_kernels.write_dense_columns(dst, dense_pos.contiguous(), rows.contiguous())
    return reference.write_dense_columns(dst, dense_pos, rows)


def pack_backward(g2: torch.Tensor, s2: Packed24, d_vals: torch.Tensor | None, dense_pos: torch.Tensor,
                  n_dense: int, with_bias_grad: bool, perm: torch.Tensor | None = None):
    """B1 output G2 [T, F] -> operands of B2/B3/B4; see ``kernels.reference.pack_backward``.
    d_vals: what ``pack_relu2_sparse24`` returned (None for bf16 "naive": d(S2)/d(Y1) = 2 sqrt(S2)).
    perm: int64 [T] token permutation applied inside (the feature-wise operands come out in its order)."""
    if kernels.use_triton(g2):
        return kernels.triton_kernels.pack_backward(
            g2.contiguous(), s2, d_vals, dense_pos, n_dense, with_bias_grad, perm=perm
        )
    return reference.pack_backward(g2, s2, d_vals, dense_pos, n_dense, with_bias_grad, perm)


def pack_backward_without_forward_mask(g2: torch.Tensor, y1: torch.Tensor, s2: Packed24, dense_pos: torch.Tensor,
                                       n_dense: int, with_bias_grad: bool, perm: torch.Tensor | None = None):
    """The forward-mask-dropped ablation of ``pack_backward`` (needs the saved Y1 [T, F]); see
    ``kernels.reference.pack_backward_without_forward_mask``."""
    if kernels.use_triton(g2):
        return kernels.triton_kernels.pack_backward_without_forward_mask(
            g2.contiguous(), y1.contiguous(), s2, dense_pos, n_dense, with_bias_grad, perm=perm
        )
    return reference.pack_backward_without_forward_mask(g2, y1, s2, dense_pos, n_dense, with_bias_grad, perm)


def sparsify_forward_dense(y1: torch.Tensor, method: str, scale, seed: int, row_ids: torch.Tensor | None = None):
    """``pack_relu2_sparse24`` for dense GEMMs: y1 [T, F] -> (s2 [T, F] with zeros where 2:4 dropped,
    d(S2)/d(Y1) [T, F] (zero off the mask) or None where the backward recomputes it, counts int32 [F+1]).
    row_ids: int64 [T], the inverse token permutation, so MVUE draws what it draws on permuted tokens.
    See ``kernels.reference.sparsify_forward_dense``; one pass over y1 on the Triton path."""
    k1, k2 = rng.seed_keys(seed)
    if kernels.use_triton(y1):
        return kernels.triton_kernels.sparsify_forward_dense(y1.contiguous(), method, scale, k1, k2, row_ids)
    return reference.sparsify_forward_dense(y1, method, scale, k1, k2, row_ids)


def sparsify_backward_dense(g2: torch.Tensor, s2: torch.Tensor, d: torch.Tensor | None, dense_pos: torch.Tensor,
                            perm: torch.Tensor | None, with_bias_grad: bool):
    """``pack_backward`` for dense GEMMs: G2 [T, F] -> (g1, g1_fw, s2_fw [T, F], db1 fp32 [F] or None):
    B2's, B4's and B3's operands with zeros where 2:4 dropped; feature-wise groups are the tokens
    perm[4q..4q+3] (the token permutation applied inside, operands stay in token order). See
    ``kernels.reference.sparsify_backward_dense``."""
    if kernels.use_triton(g2):
        return kernels.triton_kernels.sparsify_backward_dense(
            g2.contiguous(), s2.contiguous(), None if d is None else d.contiguous(), dense_pos, perm, with_bias_grad)
    return reference.sparsify_backward_dense(g2, s2, d, dense_pos, perm, with_bias_grad)


def unpack24(packed: Packed24) -> torch.Tensor:
    """Packed24 [R, C] -> dense [R, C] (zeros where dropped); for GEMMs dispatched to dense."""
    if kernels.use_triton(packed.buffer):
        return kernels.triton_kernels.unpack24(packed)
    return decompress24(packed)
