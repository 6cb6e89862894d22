"""Sparse24Config: what to sparsify and how."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

METHODS = ("naive", "mvue", "soft_threshold")
SWITCHES = ("steps", "measured")
MEASURES = ("nonzeros", "l1", "l2")
BACKENDS = ("auto", "cutlass", "cusparselt", "dense", "emulated")


@dataclass
class Sparse24Config:
    """Settings of the 2:4 activation-sparse FFN (paper recipe by default).

    method: token-wise sparsifier of the squared-ReLU activation: "naive" (top-2 of 4),
        "mvue" (unbiased sampling) or "soft_threshold" (S-STE, frozen per-layer scale).
    dense_warmup_steps: optimizer steps trained as a plain dense squared-ReLU FFN first (with
        ``switch="measured"``, the least).
    switch: when each layer leaves dense warmup. "steps": after ``dense_warmup_steps`` (the paper's
        recipe). "measured": once the share of its activation relu(Y1)^2 that 2:4 would drop
        (``switch_measure``) has stayed below ``switch_threshold`` for ``switch_window`` steps, and not
        before ``dense_warmup_steps`` (nor after ``switch_max_steps``, when given). Either way every layer
        keeps measuring that share and warns when it exceeds twice the threshold.
    switch_measure: what the share counts: "nonzeros" (the activations 2:4 zeroes, which also lose
        their gradient), "l1" (their sum) or "l2" (their squared norm: the FFN output's relative squared
        error).
    switch_threshold: the largest share 2:4 may drop (see ``switch``).
    switch_window: steps the measured share must stay below the threshold before a layer switches.
    switch_max_steps: with ``switch="measured"``, switch by this step whatever the measure (None: never
        forced).
    dense_feature_fraction: share of FFN features (the least sparse ones, re-chosen every step)
        whose weight gradients are computed densely; the rest use feature-wise 2:4.
    token_permutation: apply a fixed random token permutation before the FFN (inverted after), so
        that feature-wise 2:4 groups hold uncorrelated tokens.
    backend: "auto" (our CUTLASS kernels where built, else cuSPARSELt where it can run, else
        emulated; on a GPU with 2:4 GEMMs, each FFN shape is timed once against "dense" and runs
        with the faster), "cutlass", "cusparselt", "dense" (the same 2:4 FFN with dense GEMMs on
        operands kept dense: fused passes, no packing, no permutation gathers; faster where the
        2:4 GEMMs do not pay, e.g. narrow per-rank widths), or "emulated" (dense GEMMs on the
        decompressed packed operands: the reference path, runs anywhere). All give the same
        numerics up to GEMM rounding.
    seed: base seed of the token permutation and of MVUE sampling.
    forward_mask_in_backward: the recipe (True) keeps the forward 2:4 mask in the backward, so dX
        is the exact gradient of the sparsified forward. False is the paper's ablation (its run
        diverged): G1 = 2 G2 * relu(Y1) as if the sparsifier were the identity, then the top-2 |G1|
        of each 4 along F for dX. For experiments only: it saves Y1 ([T, F] per layer); its
        backward runs on Triton (a G1 pass, then the backward packer) where the recipe's does.
    fused_f1: with a 2:4 backend, bf16, method "naive" and the CUTLASS library built, F1 may run with
        the forward packer in its epilogue (one kernel; Y1 never stored), timed once per shape against
        F1 + the packer and used where faster. False: always F1, then the packer.
    """

    method: str = "naive"
    dense_warmup_steps: int = 1000
    switch: str = "steps"
    switch_measure: str = "nonzeros"
    switch_threshold: float = 0.10
    switch_window: int = 100
    switch_max_steps: Optional[int] = None
    dense_feature_fraction: float = 0.05
    token_permutation: bool = True
    backend: str = "auto"
    seed: int = 1234
    forward_mask_in_backward: bool = True
    fused_f1: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"Sparse24Config.method={self.method!r}: expected one of {METHODS}")
        if self.backend not in BACKENDS:
            raise ValueError(f"Sparse24Config.backend={self.backend!r}: expected one of {BACKENDS}")
        if isinstance(self.dense_warmup_steps, bool) or not isinstance(self.dense_warmup_steps, int) \
                or self.dense_warmup_steps < 0:
            raise ValueError(
                f"Sparse24Config.dense_warmup_steps={self.dense_warmup_steps!r}: expected an int >= 0"
            )
        if not isinstance(self.dense_feature_fraction, (int, float)) or isinstance(self.dense_feature_fraction, bool) \
                or not 0.0 <= float(self.dense_feature_fraction) <= 1.0:
            raise ValueError(
                f"Sparse24Config.dense_feature_fraction={self.dense_feature_fraction!r}: expected a "
                "float in [0, 1] (the paper uses 0.05)"
            )
        if self.switch not in SWITCHES:
            raise ValueError(f"Sparse24Config.switch={self.switch!r}: expected one of {SWITCHES}")
        if self.switch_measure not in MEASURES:
            raise ValueError(f"Sparse24Config.switch_measure={self.switch_measure!r}: expected one of {MEASURES}")
        if isinstance(self.switch_threshold, bool) or not isinstance(self.switch_threshold, (int, float)) \
                or not 0.0 < float(self.switch_threshold) < 1.0:
            raise ValueError(f"Sparse24Config.switch_threshold={self.switch_threshold!r}: expected a share in (0, 1)")
        if isinstance(self.switch_window, bool) or not isinstance(self.switch_window, int) or self.switch_window < 0:
            raise ValueError(f"Sparse24Config.switch_window={self.switch_window!r}: expected an int >= 0")
        if self.switch_max_steps is not None and (
                isinstance(self.switch_max_steps, bool) or not isinstance(self.switch_max_steps, int)
                or self.switch_max_steps < self.dense_warmup_steps):
            raise ValueError(f"Sparse24Config.switch_max_steps={self.switch_max_steps!r}: expected None or an int >= "
                             f"dense_warmup_steps ({self.dense_warmup_steps})")
        if not isinstance(self.token_permutation, bool):
            raise ValueError(f"Sparse24Config.token_permutation={self.token_permutation!r}: expected a bool")
        if not isinstance(self.forward_mask_in_backward, bool):
            raise ValueError(f"Sparse24Config.forward_mask_in_backward={self.forward_mask_in_backward!r}: "
                             "expected a bool")
        if self.backend == "dense" and not self.forward_mask_in_backward:
            raise ValueError("Sparse24Config: the forward-mask-dropped ablation runs on the packed path only: use "
                             "backend='auto', 'cutlass', 'cusparselt' or 'emulated' with "
                             "forward_mask_in_backward=False")
        if not isinstance(self.fused_f1, bool):
            raise ValueError(f"Sparse24Config.fused_f1={self.fused_f1!r}: expected a bool")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"Sparse24Config.seed={self.seed!r}: expected an int")
        self.dense_feature_fraction = float(self.dense_feature_fraction)
        self.switch_threshold = float(self.switch_threshold)
