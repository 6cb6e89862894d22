"""Triton kernels: fused squared-ReLU -> 2:4 select -> pack, and the backward packers.

Each kernel has a reference twin in ``kernels/reference.py`` with the same semantics and tie-breaks
(its module docstring has the rules). Kernels read and write contiguous row-major tensors and the
packed format of ``kernels/layout.py``. Tiles (BT x BF, powers of two >= 32) are sized so that every
program writes whole metadata words for both the [T, F] and the transposed [F, T] operands.
``tools/triton_kernel_stats.py`` shows what each kernel compiles to.

    forward.py         Y1 -> packed S2, d(S2)/d(Y1), per-feature counts (the 2:4 engine's forward);
                       the same pass with dense outputs (the dense-GEMM engine's)
    backward.py        G2 -> G1 on the forward mask + the feature-wise packs of G1^T and S2^T
    backward_dense.py  the dense-GEMM engine's backward pass
    dense_features.py  which features stay dense, and their columns of dW2
    unpack.py          packed -> dense; feature-wise 2:4 kept dense
    meta.py            the metadata layouts (cuSPARSELt's, CUTLASS's), chosen at compile time
    common.py          selection in registers, the MVUE random stream, loads/stores, launch helpers

On CPU they run under Triton's interpreter (TRITON_INTERPRET=1 before import).
"""

from .backward import BWD_CONFIG, pack_backward, pack_backward_without_forward_mask
from .backward_dense import DENSE_BWD_CONFIG, sparsify_backward_dense
from .dense_features import (DENSE_COLUMNS_CONFIG, DENSE_SPLIT_CONFIG, DENSE_SPLIT_MAX_FEATURES, dense_feature_split,
                             write_dense_columns)
from .forward import FWD_CONFIG, METHOD_IDS, pack_forward, relu2_sparsify24, sparsify_forward_dense
from .unpack import sparsify24_featurewise, unpack24

__all__ = ["relu2_sparsify24", "pack_forward", "sparsify_forward_dense", "pack_backward",
           "pack_backward_without_forward_mask", "sparsify_backward_dense", "dense_feature_split",
           "write_dense_columns", "sparsify24_featurewise", "unpack24", "FWD_CONFIG", "BWD_CONFIG",
           "DENSE_BWD_CONFIG", "DENSE_COLUMNS_CONFIG", "DENSE_SPLIT_CONFIG", "DENSE_SPLIT_MAX_FEATURES", "METHOD_IDS"]
