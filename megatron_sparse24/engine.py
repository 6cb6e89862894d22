"""Which engine runs an FFN shape under backend "auto": the 2:4 GEMMs of each backend that can run, or
the same 2:4 model on dense GEMMs, timed once per shape and process and agreed by every rank that
shares the layer's tokens (its tensor-parallel ranks, ``agreement.py``). The decisions live on the
backend object (``ffn_engines``, ``ffn_settled`` and its on-disk tuning cache), so every layer of one
shape shares them.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings

import torch

from . import ops
from .agreement import agree, group_size
from .backends import BACKEND_NAMES, auto_alternatives
from .backends.timing import interleaved_median_cuda_ms
from .functional import FFNPlan, Sparse24DenseGemmFFNFunction, Sparse24FFNFunction, dense_relu2_ffn

__all__ = ["choose_engine", "Sparse24PerformanceWarning"]

logger = logging.getLogger(__name__)

#: the dense squared-ReLU FFN's key in ``_time_engines``' result: timed for comparison, never chosen
DENSE_FFN = "dense FFN"


class Sparse24PerformanceWarning(UserWarning):
    """The layer's shape is one where the 2:4 FFN measured slower than the dense one."""


def choose_engine(plan: FFNPlan, shape: tuple[int, int, int], dtype, device, has_bias: bool,
                  sparse_permutes: bool, dense_permutes: bool) -> FFNPlan:
    """``plan`` with its engine resolved: unchanged unless ``plan.engine`` is "auto"; then the
    engines are timed once per shape and process (fwd + bwd on random inputs of that shape, medians
    after warm-up, in A B C C B A order): the 2:4 engine with ``plan.gemm`` and with each other 2:4
    backend that can run (``backends.auto_alternatives``), and the dense-GEMM engine. The returned
    plan has engine "sparse" (``gemm`` the chosen 2:4 backend) or "dense". The first backend keeps
    its place unless another is more than 1 % faster, and the dense-GEMM engine is chosen only when
    it is more than 1 % faster than the best 2:4 one (which also saves less memory). The choice is
    kept in ``plan.gemm``'s ``ffn_engines`` (and its on-disk ``TuningCache`` if set) and logged.
    The dense squared-ReLU FFN (the model without 2:4) is timed alongside; where even the chosen
    engine is slower than it, a ``Sparse24PerformanceWarning`` says so with both times. (Timed in
    this process after 2:4 kernels ran, the dense FFN runs a few % slow, see docs/performance.md's
    clock penalty: the warning errs towards silence.)
    ``sparse_permutes`` / ``dense_permutes``: whether the 2:4 / the dense-GEMM engine is given a
    token permutation to apply (the functional API; the layer, except for the 2:4 engine under
    sequence parallelism at tp > 2, which gets its tokens permuted by the layer instead).
    With ``plan.tuning_group`` (the layer's tensor-parallel ranks), the choice is the group's first
    rank's, agreed on the first call per shape and process (``agreement.agree``), whether each rank timed or
    read its choice from the cache. One-time host syncs; inside a CUDA-graph capture a shape not yet
    decided and agreed runs "sparse", untimed."""
    if plan.engine != "auto":
        return plan
    # the backend object belongs to one GPU; its key convention puts the device index last
    key = (tuple(shape), dtype, plan.method, has_bias, sparse_permutes, dense_permutes, plan.gemm.device_index)
    settled = plan.gemm.ffn_settled.get(key)
    if settled is not None:  # the steady state: decided in this process, nothing to look up or check
        engine, gemm = settled
        return dataclasses.replace(plan, engine=engine, gemm=gemm)
    engine = plan.gemm.ffn_engines.get(key)
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return _with_engine(plan, "sparse", ())  # no timing or agreeing inside a CUDA-graph capture
    alternatives = auto_alternatives(plan.gemm, device, dtype, shape)
    if engine is None:
        try:
            times = _time_engines(plan, alternatives, shape, dtype, device, has_bias, sparse_permutes, dense_permutes)
        except torch.cuda.OutOfMemoryError:  # the timing needs a second FFN's memory: not worth failing a run
            engine = plan.gemm.ffn_engines[key] = "sparse"  # for this process only, not in the tuning cache
            logger.warning("megatron_sparse24: FFN T x F x D = %s: out of memory while timing the engines; "
                           "using the 2:4 GEMMs (set --sparse24-backend to choose)", "x".join(map(str, shape)))
        else:
            engine = "sparse"
            for alt in alternatives:
                if times[alt.name] < 0.99 * times[engine]:
                    engine = alt.name
            if times["dense"] < 0.99 * times[engine]:
                engine = "dense"
            plan.gemm.remember_ffn_engine(key, engine)
            dense_ffn = times.pop(DENSE_FFN, None)
            logger.info("megatron_sparse24: FFN T x F x D = %s: fwd+bwd %s%s -> %s", "x".join(map(str, shape)),
                        ", ".join(f"{ms:.3f} ms with {_engine_label(plan, name)}" for name, ms in times.items()),
                        "" if dense_ffn is None else f" ({dense_ffn:.3f} ms without 2:4)", _engine_label(plan, engine))
            if dense_ffn is not None and dense_ffn < times[engine]:
                warnings.warn(_slower_than_dense(shape, _engine_label(plan, engine), times[engine], dense_ffn),
                              Sparse24PerformanceWarning, stacklevel=2)
    if group_size(plan.tuning_group) > 1:
        engine = _agreed_engine(plan, key, engine, alternatives, device)
    resolved = _with_engine(plan, engine, alternatives)
    plan.gemm.ffn_settled[key] = (resolved.engine, resolved.gemm)
    return resolved


#: FFN engines by what they run, for agreeing on one across ranks ("sparse" and an alternative's
#: name are relative to a rank's ``plan.gemm``; these are not)
_ENGINE_CODES = ("dense", "emulated", *BACKEND_NAMES)


def _agreed_engine(plan: FFNPlan, key: tuple, engine: str, alternatives: tuple, device) -> str:
    """The engine of the first rank of ``plan.tuning_group`` for ``key``, as this rank names it."""
    runs = "dense" if engine == "dense" else plan.gemm.name if engine == "sparse" else engine
    (code,) = agree([_ENGINE_CODES.index(runs)], plan.tuning_group, device)
    first = _ENGINE_CODES[code]
    if first == runs:
        return engine
    if first == "dense":
        agreed = "dense"
    elif first == plan.gemm.name:
        agreed = "sparse"
    elif first in (alt.name for alt in alternatives):
        agreed = first
    else:
        raise RuntimeError(
            f"megatron_sparse24: FFN T x F x D = {'x'.join(map(str, key[0]))}: the ranks holding this layer chose "
            f"the 2:4 GEMMs of '{first}', which cannot run on this rank (it has '{plan.gemm.name}'"
            f"{''.join(', ' + alt.name for alt in alternatives)}); make the same backends available on every "
            f"node or set --sparse24-backend")
    plan.gemm.remember_ffn_engine(key, agreed)
    logger.info("megatron_sparse24: FFN T x F x D = %s: %s, as the layer's first tensor-parallel rank chose (this rank "
                "measured %s)", "x".join(map(str, key[0])), _engine_label(plan, agreed), _engine_label(plan, engine))
    return agreed


def _slower_than_dense(shape, label: str, ms: float, dense_ms: float) -> str:
    t, f, d = shape
    return (f"megatron_sparse24: FFN T x F x D = {t}x{f}x{d} (F per tensor-parallel rank): the 2:4 FFN's fastest "
            f"engine ({label}) takes {ms:.3f} ms for forward + backward against {dense_ms:.3f} ms for the dense "
            f"squared-ReLU FFN ({dense_ms / ms:.2f}x). Training runs correctly but slower: at such widths the "
            "packing and the extra launches cost more than the 2:4 GEMMs save (docs/performance.md). Fewer "
            "tensor-parallel ranks (a wider F per rank) make 2:4 pay; --no-sparse24 trains the dense model")


def _engine_label(plan: FFNPlan, engine: str) -> str:
    return "dense GEMMs" if engine == "dense" else f"2:4 GEMMs ({plan.gemm.name if engine == 'sparse' else engine})"


def _with_engine(plan: FFNPlan, engine: str, alternatives: tuple) -> FFNPlan:
    """The plan for a resolved ``engine`` ("sparse", "dense" or the name of one of ``alternatives``;
    an alternative that cannot run here, e.g. named by an on-disk cache, means "sparse")."""
    if engine == "dense":
        return dataclasses.replace(plan, engine="dense")
    gemm = next((alt for alt in alternatives if alt.name == engine), plan.gemm)
    return dataclasses.replace(plan, engine="sparse", gemm=gemm)


def _time_engines(plan: FFNPlan, alternatives: tuple, shape, dtype, device, has_bias: bool, sparse_permutes: bool,
                  dense_permutes: bool) -> dict:
    """Median fwd+bwd milliseconds per engine: {"sparse": plan.gemm's 2:4, alt.name: each of
    ``alternatives``' 2:4, "dense": the dense-GEMM engine, DENSE_FFN: the dense squared-ReLU FFN}."""
    t, f, d = shape
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(t, d, generator=gen, device=device, dtype=dtype).requires_grad_()
    w1 = (torch.randn(f, d, generator=gen, device=device) * d ** -0.5).to(dtype).requires_grad_()
    w2 = (torch.randn(d, f, generator=gen, device=device) * f ** -0.5).to(dtype).requires_grad_()
    b1 = torch.zeros(f, device=device, dtype=dtype).requires_grad_() if has_bias else None
    grad_y = torch.randn(t, d, generator=gen, device=device, dtype=dtype)
    perm, inv = ops.token_permutation(t, 0, device)
    # local: a rank whose cache already holds the engine does not time, so no collective in here
    quiet = dataclasses.replace(plan, stats=None, accumulate_main_grad=False, tuning_group=None)
    inputs = [v for v in (x, w1, b1, w2) if v is not None]

    def run(fn, p, i, run_plan):
        y = fn.apply(x, w1, b1, w2, p, i, run_plan)
        torch.autograd.grad(y, inputs, grad_y)

    sparse_perm = (perm, inv) if sparse_permutes else (None, None)
    variants = {"sparse": lambda: run(Sparse24FFNFunction, *sparse_perm, quiet)}
    for alt in alternatives:
        alt_plan = dataclasses.replace(quiet, gemm=alt)
        variants[alt.name] = lambda alt_plan=alt_plan: run(Sparse24FFNFunction, *sparse_perm, alt_plan)
    variants["dense"] = lambda: run(Sparse24DenseGemmFFNFunction, *((perm, inv) if dense_permutes else (None, None)),
                                    quiet)

    def dense_ffn():
        torch.autograd.grad(dense_relu2_ffn(x, w1, w2, b1), inputs, grad_y)

    variants[DENSE_FFN] = dense_ffn
    with torch.enable_grad():  # forward then reverse order, as the GEMM tuners time (the clock drifts)
        ms = interleaved_median_cuda_ms(list(variants.values()), rounds=2, iters=5)
    return dict(zip(variants, ms))
