"""Plain-PyTorch reference twins of every Triton kernel (same semantics, same tie-breaks).

Shared rules (the Triton kernels in ``triton_kernels/`` follow them exactly):

* relu keeps NaN: ``relu(x) = x if not x < 0 else 0`` so NaN/inf propagate instead of vanishing.
* "top-2 of 4": order the 4 values by key descending, ties to the LOWER index; NaN keys count as
  +inf. Exactly two elements are kept in every group, so the compressed metadata is always valid.
  Keys: the squared-ReLU value for token-wise selection, |g| for feature-wise selection.
* Arithmetic in fp32; results are rounded to the input dtype once, at the end.

Sparsifier methods (x = relu(y1)**2 >= 0, per group of 4 along the last dim):

* ``naive``: keep the top-2. out = x on kept. d(out)/d(y1) = 2 relu(y1).
* ``mvue``: groups with <= 2 non-zeros, or with a NaN/inf, are kept exactly (naive). Otherwise, with a = x + EPS and
  S = sum(a): draw i with P = a_i/S, then j != i with P = a_j/(S - a_i) (uniforms from ``rng``),
  keep {i, j} and divide each by its inclusion probability
  p_k = (a_k/S) * (1 + sum_{m != k} a_m/(S - a_m)), so E[out] = x. The gradient treats the drawn
  mask and 1/p as constants: d(out)/d(y1) = 2 relu(y1) / p.
* ``soft_threshold`` (S-STE): keep the top-2, shrink by t = the largest dropped value, times the
  frozen per-tensor ``scale``: out = scale * (x - t). Gradient with t held constant:
  d(out)/d(y1) = 2 scale relu(y1).
"""

from __future__ import annotations

import math

import torch

from . import rng
from .layout import Packed24, compress24, decompress24, mask_of

METHODS = ("naive", "mvue", "soft_threshold")
#: Added to every value of a group before MVUE sampling, so zeros have (negligible) mass.
MVUE_EPS = 1e-20
#: The dense-feature count of the 95/5 split is rounded up to a multiple of this.
DENSE_FEATURE_ALIGN = 8


def relu(x: torch.Tensor) -> torch.Tensor:
    """NaN-preserving ReLU (torch.relu also keeps NaN; spelled out to match the kernels)."""
    return torch.where(x < 0, torch.zeros((), dtype=x.dtype, device=x.device), x)


def _keys(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return torch.where(torch.isnan(x), torch.full_like(x, math.inf), x)


def top2_keep(keys: torch.Tensor) -> torch.Tensor:
    """keys [..., 4] -> bool [..., 4]: the two largest keys, ties to the lower index, NaN = +inf."""
    k = _keys(keys)
    ki, kj = k[..., :, None], k[..., None, :]  # [..., i, j]
    lower = torch.tril(torch.ones(4, 4, dtype=torch.bool, device=k.device), diagonal=-1)  # j < i
    beats = (kj > ki) | ((kj == ki) & lower)
    return beats.sum(-1) < 2


def _groups(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], x.shape[1] // 4, 4)


def _mvue(x: torch.Tensor, r: torch.Tensor, k1: int, k2: int, row_ids=None):
    """x, r: [R, G, 4] fp32 -> (keep, out, dmult) for groups with >= 3 non-zeros. Group (i, g)
    draws the uniforms of counter 2 (row_ids[i] G + g) (+1); row_ids defaults to i."""
    rows, groups = x.shape[0], x.shape[1]
    a = x + MVUE_EPS
    a0, a1, a2, a3 = a.unbind(-1)
    s = ((a0 + a1) + a2) + a3
    if row_ids is None:
        row_ids = torch.arange(rows, device=x.device, dtype=torch.int64)
    gid = row_ids.to(torch.int64)[:, None] * groups + torch.arange(groups, device=x.device, dtype=torch.int64)
    u1 = rng.uniform(2 * gid, k1, k2)
    u2 = rng.uniform(2 * gid + 1, k1, k2)
    v = u1 * s
    c2 = a0 + a1
    i = (v >= a0).int() + (v >= c2).int() + (v >= c2 + a2).int()
    o0 = torch.where(i == 0, 1, 0)
    o1 = torch.where(i <= 1, 2, 1)
    o2 = torch.where(i <= 2, 3, 2)
    b0, b1, b2 = (a.gather(-1, o[..., None])[..., 0] for o in (o0, o1, o2))
    w = u2 * ((b0 + b1) + b2)
    jj = (w >= b0).int() + (w >= b0 + b1).int()
    j = torch.where(jj == 0, o0, torch.where(jj == 1, o1, o2))
    q0, q1, q2, q3 = a0 / ((a1 + a2) + a3), a1 / ((a0 + a2) + a3), a2 / ((a0 + a1) + a3), a3 / ((a0 + a1) + a2)
    p = torch.stack(
        [
            (a0 / s) * (1.0 + ((q1 + q2) + q3)),
            (a1 / s) * (1.0 + ((q0 + q2) + q3)),
            (a2 / s) * (1.0 + ((q0 + q1) + q3)),
            (a3 / s) * (1.0 + ((q0 + q1) + q2)),
        ],
        -1,
    )
    pos = torch.arange(4, device=x.device)
    keep = (pos == i[..., None]) | (pos == j[..., None])
    return keep, x / p, (2.0 * r) / p


def relu2_sparsify24_full(y1: torch.Tensor, method: str, scale=None, k1: int = 0, k2: int = 0, row_ids=None):
    """y1 [R, F] -> (out fp32 [R, F], keep bool [R, F], dmult fp32 [R, F]).

    ``out`` is the sparsified relu(y1)**2 before rounding, zero where dropped; ``dmult`` is
    d(out)/d(y1) on kept elements (zero elsewhere), so G1 = G2 * dmult. ``row_ids`` (int [R], MVUE
    only): the row numbers that pick MVUE's random numbers (default 0..R-1), so rows sampled in
    another order draw what they would draw in their own place.
    """
    rows, feats = y1.shape
    r = _groups(relu(y1.float()))
    x = r * r
    keep = top2_keep(x)
    if method == "naive":
        out, dmult = x, 2.0 * r
    elif method == "soft_threshold":
        t = torch.where(keep, torch.full_like(x, -math.inf), x).amax(-1, keepdim=True)
        sc = torch.as_tensor(1.0 if scale is None else scale, dtype=torch.float32, device=x.device)
        out, dmult = sc * (x - t), sc * (2.0 * r)
    elif method == "mvue":
        keep_s, out_s, d_s = _mvue(x, r, k1, k2, row_ids)
        # Exact (naive) for <= 2 non-zeros, and for non-finite groups so NaN/inf are kept.
        exact = ((x != 0).sum(-1, keepdim=True) <= 2) | ~torch.isfinite(((x[..., :1] + x[..., 1:2]) + x[..., 2:3]) + x[..., 3:])
        keep = torch.where(exact, keep, keep_s)
        out = torch.where(exact, x, out_s)
        dmult = torch.where(exact, 2.0 * r, d_s)
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    zero = torch.zeros((), device=x.device)
    out = torch.where(keep, out, zero)
    dmult = torch.where(keep, dmult, zero)
    return out.reshape(rows, feats), keep.reshape(rows, feats), dmult.reshape(rows, feats)


def featurewise_keep(g: torch.Tensor) -> torch.Tensor:
    """g [T, F] -> bool [T, F]: top-2 |g| of each 4 consecutive tokens (dim 0) per feature."""
    t, f = g.shape
    k = g.float().abs().reshape(t // 4, 4, f).transpose(1, 2)  # [T/4, F, 4]
    return top2_keep(k).transpose(1, 2).reshape(t, f)


def num_dense_features(num_features: int, dense_fraction: float) -> int:
    """At least ``dense_fraction`` of the features, rounded up to DENSE_FEATURE_ALIGN, at most all."""
    if dense_fraction <= 0:
        return 0
    n = math.ceil(round(dense_fraction * num_features, 6))
    return min(num_features, -(-n // DENSE_FEATURE_ALIGN) * DENSE_FEATURE_ALIGN)


def select_dense_features(counts: torch.Tensor, n_dense: int, sort_indices: bool = True) -> torch.Tensor:
    """Indices (int64) of the ``n_dense`` features with the most non-zeros; ties -> lower index.
    Sorted, or (``sort_indices=False``, one sort less) by decreasing count, ties by index."""
    if n_dense == 0:
        return torch.empty(0, dtype=torch.int64, device=counts.device)
    # A stable descending sort keeps equal counts in index order: more non-zeros first, then lower
    # index, deterministically (one radix sort on CUDA; torch.topk with k ~ F/20 was 5x slower).
    chosen = torch.sort(counts, descending=True, stable=True).indices[:n_dense]
    return chosen.sort().values if sort_indices else chosen


def write_dense_columns(dst: torch.Tensor, dense_pos: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """In place: dst[:, f] = rows[dense_pos[f]] for every feature f with dense_pos[f] >= 0; returns dst.
    dst [C, F]; dense_pos int [F] (-1: not dense); rows [n_dense, C]."""
    dense = dense_pos >= 0
    if rows.shape[0] == 0:
        return dst
    gathered = rows.index_select(0, dense_pos.clamp(min=0).long()).t()  # [C, F]; no host sync
    return dst.copy_(torch.where(dense[None, :], gathered, dst))


def sparsify24_featurewise(g: torch.Tensor, dense_idx: torch.Tensor) -> torch.Tensor:
    """Reference of ``ops.sparsify24_featurewise`` once ``dense_idx`` is known."""
    out = torch.where(featurewise_keep(g), g, torch.zeros((), dtype=g.dtype, device=g.device))
    out[:, dense_idx] = g[:, dense_idx]
    return out


def token_permutation(num_tokens: int, seed: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, inv), int64: argsort of per-token hash keys, identical on every device type."""
    k1, k2 = rng.seed_keys(seed)
    idx = torch.arange(num_tokens, device=device, dtype=torch.int64)
    key = (rng.hash_bits(idx, k1, k2) << 32) | idx  # unique keys: no ties
    perm = torch.argsort(key)
    inv = torch.empty_like(perm)
    inv[perm] = idx
    return perm, inv


# --- The FFN's fused passes (references of the Triton pack kernels) -------------------------------


def recomputes_derivative(method: str, dtype: torch.dtype) -> bool:
    """Whether the backward recomputes d(s2)/d(y1) from s2 instead of saving it (half the saved
    activation memory): for "naive" in bf16, where it is exact. There s2 = bf16(r**2) with r =
    relu(y1) a bf16 value, and bf16(sqrt(s2)) == r: the square's rounding error (< 2**-8 relative)
    halves under the root, below half an ulp of r (>= 2**-9 relative, 8-bit significand), so
    d = 2 bf16(sqrt(s2)) = 2 r bit for bit, with any square root accurate to ~2**-16 (the kernel's
    approximate one included). Not in fp16 (r**2 overflows above 256 and the margin vanishes) or
    fp32, nor for "mvue" / "soft_threshold" (their derivative is not a function of s2). Only r**2
    below bf16's smallest subnormal (r < ~1e-19) would lose its tiny derivative."""
    return method == "naive" and dtype == torch.bfloat16


def check_derivative(d_vals, dtype: torch.dtype) -> None:
    """The backward packers' argument check: d_vals=None (recompute) only where it is exact."""
    if d_vals is None and not recomputes_derivative("naive", dtype):
        raise ValueError(f"d_vals=None recomputes the naive derivative from a bf16 s2, got {dtype}: pass the "
                         "d_vals that pack_forward returned")


def pack_forward(y1: torch.Tensor, method: str, scale=None, k1: int = 0, k2: int = 0,
                 layout: str = "cusparselt", row_ids=None):
    """Forward pass after F1: y1 [T, F] -> (s2: Packed24 [T, F], d_vals [T, F/2] or None, counts int32 [F+1]).

    s2 is the sparsified squared ReLU (token-wise 2:4, the F2 operand); d_vals are the kept values of
    d(s2)/d(y1) in s2's packed order (they share its metadata), or None where the backward recomputes
    them from s2 (``recomputes_derivative``); counts[f] (f < F) = non-zeros of s2
    in feature f (after rounding to y1.dtype), which decide the 95/5 split in the backward;
    counts[F] = non-zeros of relu(y1)**2 before 2:4 (telemetry). int32: T * F must stay < 2**31.
    row_ids: see ``relu2_sparsify24_full`` (MVUE's draws by each row's place in the token permutation).
    """
    out, keep, dmult = relu2_sparsify24_full(y1, method, scale, k1, k2, row_ids)
    s2_dense = out.to(y1.dtype)
    s2 = compress24(s2_dense, keep, layout)
    d_vals = (None if recomputes_derivative(method, y1.dtype)
              else compress24(dmult.to(y1.dtype), keep, layout).values.clone())
    counts = _feature_counts(s2_dense, y1)
    return s2, d_vals, counts


def _feature_counts(s2_dense: torch.Tensor, y1: torch.Tensor) -> torch.Tensor:
    """int32 [F+1]: non-zeros of s2 per feature, then of relu(y1)**2 before 2:4 (telemetry)."""
    nnz_before = (relu(y1.float()) ** 2 != 0).sum().reshape(1)
    return torch.cat([(s2_dense != 0).sum(0), nnz_before]).to(torch.int32)


def _featurewise_operand(a: torch.Tensor, dense_pos: torch.Tensor, n_dense: int, layout: str = "cusparselt"):
    """a [T, F] -> (Packed24 [F, T] of the feature-wise 2:4 of a^T with dense rows zeroed,
    dense part [n_dense, T] = a[:, dense features]^T)."""
    is_dense = dense_pos >= 0
    sparse_part = torch.where(is_dense[None, :], torch.zeros((), dtype=a.dtype, device=a.device), a)
    keep = featurewise_keep(sparse_part)
    packed = compress24(sparse_part.t().contiguous(), keep.t(), layout)
    dense = torch.empty(n_dense, a.shape[0], dtype=a.dtype, device=a.device)
    dense[dense_pos[is_dense]] = a[:, is_dense].t()
    return packed, dense


def pack_backward(g2: torch.Tensor, s2: Packed24, d_vals: torch.Tensor | None, dense_pos: torch.Tensor,
                  n_dense: int, with_bias_grad: bool, perm: torch.Tensor | None = None):
    """Backward pass after B1: G2 [T, F] -> the four sparse operands of the backward GEMMs.

    G1 = G2 * d(S2)/d(Y1) on the forward mask, rounded to g2.dtype, with d from ``d_vals`` (as
    ``pack_forward`` returns them) or, for d_vals None ("naive" in bf16), 2 bf16(sqrt(S2)) (= 2 relu(Y1)
    exactly, see ``recomputes_derivative``).

    dense_pos [F] int32: row of feature f in the dense outputs, or -1 for the sparse features.
    Returns (g1 Packed24 [T, F] token-wise with s2's mask -> B2; g1t Packed24 [F, T] feature-wise,
    dense rows zero -> B4; g1_dense [n_dense, T]; s2t Packed24 [F, T] -> B3; s2_dense [n_dense, T];
    db1 fp32 [F] or None). Every packed output uses s2's metadata layout.

    perm (int64 [T] or None): the token permutation, applied here instead of to the GEMM operands:
    the feature-wise outputs (g1t, g1_dense, s2t, s2_dense) hold the tokens in the order perm (their
    column j is token perm[j], so their 2:4 groups are tokens perm[4q..4q+3]) while g1 stays in
    token order; B3/B4 then take G3[perm] / X[perm] as their dense operands.
    """
    mask = mask_of(s2)
    check_derivative(d_vals, s2.dtype)
    if d_vals is None:
        d = 2.0 * torch.sqrt(decompress24(s2).float()).to(torch.bfloat16)
    else:
        d = decompress24(s2, values=d_vals)
    g1 = torch.where(mask, g2.float() * d.float(), torch.zeros((), device=g2.device)).to(g2.dtype)
    return _backward_operands(g1, mask, s2, dense_pos, n_dense, with_bias_grad, perm)


def pack_backward_without_forward_mask(g2: torch.Tensor, y1: torch.Tensor, s2: Packed24, dense_pos: torch.Tensor,
                                       n_dense: int, with_bias_grad: bool, perm: torch.Tensor | None = None):
    """The ablation of ``pack_backward`` that drops the forward mask (Sparse24Config.
    forward_mask_in_backward=False): G1 = 2 G2 * relu(Y1) everywhere (the sparsifier treated as the
    identity), rounded to g2.dtype; B2's operand is its own token-wise top-2 |G1| (ties to the lower
    index); B3/B4 operands and db1 as in ``pack_backward``. Same outputs (Triton twin:
    ``triton_kernels.pack_backward_without_forward_mask``)."""
    g1 = (2.0 * g2.float() * relu(y1.float())).to(g2.dtype)
    rows, cols = g1.shape
    keep = top2_keep(g1.abs().reshape(rows, cols // 4, 4)).reshape(rows, cols)
    return _backward_operands(g1, keep, s2, dense_pos, n_dense, with_bias_grad, perm)


def _in_order(a: torch.Tensor, perm) -> torch.Tensor:
    """a's rows (tokens) in the order perm (a itself without one)."""
    return a if perm is None else a.index_select(0, perm)


def _backward_operands(g1: torch.Tensor, keep: torch.Tensor, s2: Packed24, dense_pos: torch.Tensor, n_dense: int,
                       with_bias_grad: bool, perm=None):
    """G1 [T, F] and the mask of its token-wise 2:4 -> the outputs of ``pack_backward``."""
    g1t, g1_dense = _featurewise_operand(_in_order(g1, perm), dense_pos, n_dense, s2.layout)
    s2t, s2_dense = _featurewise_operand(_in_order(decompress24(s2), perm), dense_pos, n_dense, s2.layout)
    db1 = g1.float().sum(0) if with_bias_grad else None
    return compress24(g1, keep, s2.layout), g1t, g1_dense, s2t, s2_dense, db1


# --- The same FFN on dense GEMMs: the sparsified operands kept dense (references of the Triton twins) --


def sparsify_forward_dense(y1: torch.Tensor, method: str, scale=None, k1: int = 0, k2: int = 0, row_ids=None):
    """``pack_forward`` for dense GEMMs: y1 [T, F] -> (s2 [T, F], d [T, F] or None, counts int32 [F+1]).

    s2 is the sparsified squared ReLU with zeros where 2:4 dropped (the values ``pack_forward``
    packs), d = d(s2)/d(y1) on the kept elements and zero elsewhere (None where the backward
    recomputes it from s2, ``recomputes_derivative``), counts as in ``pack_forward``. Both in y1.dtype.
    row_ids: see ``relu2_sparsify24_full`` (pass the inverse token permutation, and MVUE draws what
    ``pack_forward`` draws on the permuted tokens).
    """
    out, _, dmult = relu2_sparsify24_full(y1, method, scale, k1, k2, row_ids)
    s2 = out.to(y1.dtype)
    d = None if recomputes_derivative(method, y1.dtype) else dmult.to(y1.dtype)
    counts = _feature_counts(s2, y1)
    return s2, d, counts


def _featurewise_dense_groups(a: torch.Tensor, is_dense: torch.Tensor, perm) -> torch.Tensor:
    """a [T, F] -> feature-wise 2:4 of a (top-2 |a| of the tokens perm[4q..4q+3], or of 4
    consecutive tokens without perm), dense features whole, zeros elsewhere; a's token order."""
    ap = _in_order(a, perm)
    kept = torch.where(featurewise_keep(ap) | is_dense[None, :], ap, torch.zeros((), dtype=a.dtype, device=a.device))
    if perm is None:
        return kept
    return torch.empty_like(a).index_copy_(0, perm, kept)


def sparsify_backward_dense(g2: torch.Tensor, s2: torch.Tensor, d: torch.Tensor | None, dense_pos: torch.Tensor,
                            perm: torch.Tensor | None, with_bias_grad: bool):
    """``pack_backward`` for dense GEMMs: G2 [T, F] -> (g1, g1_fw, s2_fw [T, F] in g2.dtype, db1 fp32 [F] or None).

    g1 = G2 * d rounded to g2.dtype, zero where d is zero (off the forward mask; d as
    ``sparsify_forward_dense`` returned it, or 2 bf16(sqrt(s2)) for d None): B2's operand, the
    token-wise 2:4 G1 of ``pack_backward``. g1_fw and s2_fw (B4's and B3's operands) keep, in
    every feature f with dense_pos[f] < 0, the top-2 |value| of each group of 4 tokens and
    zero the rest; features with dense_pos[f] >= 0 stay whole. The groups are tokens
    perm[4q..4q+3] (perm int64 [T]: the token permutation, applied here instead of to the GEMM
    operands) or 4 consecutive tokens (perm None). Same selections and values as ``pack_backward``
    on the permuted tokens, for finite G2 (a non-finite G2 off the forward mask gives 0 here, NaN
    on a kept slot with a zero derivative there).
    """
    check_derivative(d, s2.dtype)
    if d is None:
        d = 2.0 * torch.sqrt(s2.float()).to(torch.bfloat16)
    d = d.float()
    g1 = torch.where(d != 0, g2.float() * d, torch.zeros((), device=g2.device)).to(g2.dtype)
    is_dense = dense_pos >= 0
    db1 = g1.float().sum(0) if with_bias_grad else None
    return g1, _featurewise_dense_groups(g1, is_dense, perm), _featurewise_dense_groups(s2, is_dense, perm), db1
