"""Sparse24MLP: megatron-core's MLP slot with the 2:4 activation-sparse FFN.

Weights live in megatron's own ``ColumnParallelLinear`` (fc1) and ``RowParallelLinear`` (fc2), so
names, shapes, init, DDP, optimizers and (distributed) checkpoints are exactly those of a dense
squared-ReLU GPT. The forward path, per tensor-parallel rank:

    hidden [s/tp, b, h] (SP) or [s, b, h] -> tokens [n, h]
      -> gather_from_sequence_parallel_region (SP) / copy_to_tensor_model_parallel_region (TP)
      -> Sparse24FFNFunction: fc1 -> squared ReLU -> 2:4 -> fc2 as ONE autograd function, given the
         token permutation of the gathered tokens (each rank's tokens permuted within its own block,
         the same permutation whatever the TP size); it groups tokens through it inside its backward
         pack; backend "auto" runs it on whichever 2:4 GEMMs (our CUTLASS kernels or cuSPARSELt)
         engine.choose_engine measured faster for the shape, or, where that was faster still,
         Sparse24DenseGemmFFNFunction: the same FFN on dense GEMMs
      -> reduce_scatter_to_sequence_parallel_region (SP) / reduce_from_tensor_model_parallel_region
      -> [s/tp, b, h], and fc2's bias returned separately (skip_bias_add)

Under sequence parallelism with tp > 2 the 2:4 engine gets its tokens permuted instead (each rank
permutes its own [n, h] shard before the gather and after the reduce-scatter: four [n, h] gathers move
less than the function's two [tp n, h] ones there).

During dense warmup (``optimizer_step < dense_warmup_steps``) it runs fc1/fc2's own forward with a
squared ReLU: the plain dense model. ``megatron_sparse24.step(model)`` advances the counter once per
optimizer step; it is saved in checkpoints with the permutation seed and the frozen soft-threshold
scale (``_extra_state``).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import sys
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from . import ops
from .agreement import group_size
from .backends import BACKEND_NAMES, CUSPARSELT_ALIGN
from .config import MEASURES, Sparse24Config
from .functional import (
    STAT_ELEMENTS,
    STAT_KEPT,
    STAT_NNZ,
    Sparse24DenseGemmFFNFunction,
    Sparse24FFNFunction,
    make_plan,
    permutation_seed,
)
from .engine import Sparse24PerformanceWarning, choose_engine
from .kernels import rng
from .mcore_compat import mlp_in_training_cuda_graph, mlp_tp_group

logger = logging.getLogger(__name__)

__all__ = ["Sparse24MLP", "Sparse24PerformanceWarning", "Sparse24StepWarning", "step", "set_step", "sparsity_stats",
           "summarize_counters", "is_squared_relu", "resolve_sparse24_config", "layer_permutes_shards"]


#: Optimizer steps between two measurements of what 2:4 drops (the measured switch and its guard).
MEASURE_EVERY = 10
#: Tokens of the step's first micro-batch a measurement looks at: 2:4 groups run along the features,
#: so a sample of tokens estimates the dropped share without bias, at ~1/16 of fc1's cost at 16k tokens.
MEASURE_TOKENS = 1024

#: Per-rank fc1 weights (FFN width per rank x hidden) smaller than this ran slower sparse than dense on
#: the H200 (0.69-0.84x: 16384 tokens x hidden 2048 x 1024-2048 per rank, hidden 4096 and 6144 x 1024 per
#: rank; eager, most of it host time); at exactly this size (hidden 2048 x 4096, hidden 4096 x 2048) and
#: above, 1.02x or more. The packers' work and launches grow with the width, a GEMM's with width x hidden.
NARROW_FC1_PER_RANK = 2 ** 23


def narrow_width_warning(ffn_per_rank: int, hidden: int) -> Optional[str]:
    """Why this per-rank FFN shape is expected to run slower sparse than dense, or None."""
    if ffn_per_rank * hidden >= NARROW_FC1_PER_RANK:
        return None
    return (f"megatron_sparse24: FFN width per tensor-parallel rank {ffn_per_rank} x hidden {hidden} is below "
            f"{NARROW_FC1_PER_RANK // 2 ** 20}M weights: at such shapes the packing and the extra launches cost "
            "more than the 2:4 GEMMs save, and the FFN measured 0.69-0.84x of the dense FFN's speed on an H200 "
            "(docs/performance.md); training runs correctly but slower. Use --sparse24-backend auto (it times the "
            "dense-GEMM engine and the dense FFN for each shape), fewer tensor-parallel ranks, or --no-sparse24")


def layer_permutes_shards(tp: int, sequence_parallel: bool) -> bool:
    """Whether the layer permutes each rank's token shard itself before the sequence-parallel gather
    (and back after the reduce-scatter) for the 2:4 engine, instead of giving the FFN function the
    permutation of the gathered tokens: under SP at tp > 2, where four [T/tp, D] shard gathers move
    less than the function's two [T, D] ones (at tp = 2 they move the same, in more launches)."""
    return sequence_parallel and tp > 2


def is_squared_relu(fn) -> bool:
    """True for megatron.core.activations.squared_relu (also through torch.compile wrappers)."""
    inner = getattr(fn, "_torchdynamo_orig_callable", None) or getattr(fn, "__wrapped__", None) or fn
    return getattr(inner, "__name__", "") == "squared_relu"


def resolve_sparse24_config(explicit: Optional[Sparse24Config], config: TransformerConfig) -> Sparse24Config:
    """The layer's Sparse24Config: the spec's param, else ``config.sparse24`` (set by our trainer,
    NeMo or Bridge), else Megatron-LM's parsed flags when run under ``megatron.training`` with
    ``add_sparse24_args`` (``--spec megatron_sparse24.specs SPARSE24_LAYER_SPEC``), else defaults.
    Invalid flag values raise (they are not replaced by defaults)."""
    if explicit is not None:
        return explicit
    from_config = getattr(config, "sparse24", None)
    if from_config is not None:
        return from_config
    args = megatron_lm_args()
    if args is not None and hasattr(args, "activation_sparse_method"):
        from .arguments import sparse24_config_from_args

        return sparse24_config_from_args(args)
    return Sparse24Config()


def megatron_lm_args():
    """Megatron-LM's parsed arguments when this process runs its training loop (megatron.training's
    global args are set), else None. Never imports megatron.training itself."""
    global_vars = sys.modules.get("megatron.training.global_vars")
    return getattr(global_vars, "_GLOBAL_ARGS", None)


def megatron_lm_iteration() -> Optional[int]:
    """Optimizer steps done so far by Megatron-LM's training loop (``args.curr_iteration``), or None
    outside it."""
    args = megatron_lm_args()
    iteration = getattr(args, "curr_iteration", None) if args is not None else None
    return None if iteration is None else int(iteration)


class Sparse24StepWarning(UserWarning):
    """A layer keeps training dense far past its warmup because nothing advances its step counter."""


class _PermuteRows(torch.autograd.Function):
    """y = x[perm] along dim 0; the gradient is gathered with the inverse (no scatter-add)."""

    @staticmethod
    def forward(ctx, x, perm, inv):
        ctx.save_for_backward(inv)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        (inv,) = ctx.saved_tensors
        return grad.index_select(0, inv), None, None


class Sparse24MLP(MegatronModule):
    """MLP with a 2:4-sparse squared-ReLU activation (see the module docstring).

    Same constructor as ``megatron.core.transformer.mlp.MLP`` plus ``sparse24_config``; the process
    groups come as megatron-core passes them to its own MLP (``tp_group``, or ``pg_collection`` from
    0.18 on).
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: MLPSubmodules,
        is_expert: bool = False,
        input_size: Optional[int] = None,
        ffn_hidden_size: Optional[int] = None,
        tp_group: Optional[torch.distributed.ProcessGroup] = None,
        sparse24_config: Optional[Sparse24Config] = None,
        pg_collection=None,
        is_mtp_layer: bool = False,
        name: Optional[str] = None,
    ):
        super().__init__(config=config)
        if is_expert:
            raise ValueError("Sparse24MLP is a dense-model MLP: MoE experts are not supported")
        if config.gated_linear_unit:
            raise ValueError("Sparse24MLP needs a plain squared-ReLU FFN: set gated_linear_unit=False "
                             "(drop --swiglu; use --squared-relu)")
        if not is_squared_relu(config.activation_func):
            raise ValueError(
                f"Sparse24MLP needs activation_func=megatron.core.activations.squared_relu "
                f"(--squared-relu), got {getattr(config.activation_func, '__name__', config.activation_func)}"
            )
        captured = mlp_in_training_cuda_graph(config)
        if captured:
            # A captured forward replays its kernels without running Python: the step counter, the
            # dense-warmup switch, MVUE's per-step seeds and the measurements would all freeze silently.
            raise ValueError(
                f"megatron-core's CUDA graphs ({captured}) would capture Sparse24MLP once and replay it, "
                "freezing what it decides in Python every step (dense warmup -> 2:4 switch, MVUE seeds, "
                "measurements). Keep the MLP out of the graphs: --cuda-graph-impl none, or with Transformer "
                "Engine --cuda-graph-impl transformer_engine --cuda-graph-modules attn (attention only; "
                "--cuda-graph-scope attn before megatron-core 0.18)")
        self.sparse24 = resolve_sparse24_config(sparse24_config, config)
        self.input_size = input_size if input_size is not None else config.hidden_size
        ffn = ffn_hidden_size if ffn_hidden_size is not None else config.ffn_hidden_size
        tp_group = mlp_tp_group(tp_group, pg_collection)
        self.tp_group = tp_group
        tp = tp_group.size()
        if ffn % tp:
            raise ValueError(f"ffn_hidden_size={ffn} is not divisible by tensor_model_parallel_size={tp}")
        self.ffn_per_rank = ffn // tp
        if self.ffn_per_rank % 4:
            raise ValueError(
                f"ffn_hidden_size / tp = {ffn} / {tp} = {self.ffn_per_rank} is not a multiple of 4, which "
                f"2:4 groups need: pick --ffn-hidden-size as a multiple of {4 * tp} (of "
                f"{CUSPARSELT_ALIGN * tp} for the sparse tensor-core GEMMs)"
            )
        if self.sparse24.backend in BACKEND_NAMES and self.ffn_per_rank % CUSPARSELT_ALIGN:
            raise ValueError(
                f"backend={self.sparse24.backend!r} needs ffn_hidden_size / tp = {self.ffn_per_rank} to be a "
                f"multiple of {CUSPARSELT_ALIGN}: pick --ffn-hidden-size as a multiple of {CUSPARSELT_ALIGN * tp}"
            )
        # Megatron's linears refuse gradient_accumulation_fusion without apex; our autograd
        # function accumulates into main_grad itself, so the linears get a copy with it off.
        linear_config = config
        if config.gradient_accumulation_fusion:
            linear_config = copy.copy(config)
            linear_config.gradient_accumulation_fusion = False
        self.linear_fc1 = build_module(
            submodules.linear_fc1, self.input_size, ffn, config=linear_config,
            init_method=config.init_method, gather_output=False, bias=config.add_bias_linear,
            skip_bias_add=True, is_expert=False, tp_comm_buffer_name="fc1", tp_group=tp_group,
        )
        self.linear_fc2 = build_module(
            submodules.linear_fc2, ffn, config.hidden_size, config=linear_config,
            init_method=config.output_layer_init_method, bias=config.add_bias_linear,
            input_is_parallel=True, skip_bias_add=True, is_expert=False, tp_comm_buffer_name="fc2",
            tp_group=tp_group,
        )
        slow = narrow_width_warning(self.ffn_per_rank, self.input_size)
        # only where the 2:4 GEMMs are forced ("auto" measures; on CPU the GEMMs are emulated anyway)
        if slow and self.linear_fc1.weight.is_cuda and self.sparse24.backend in BACKEND_NAMES:
            warnings.warn(slow, Sparse24PerformanceWarning, stacklevel=2)
        self.layer_number = 1
        # State saved in checkpoints (_extra_state): plain Python values, so reading them in
        # forward never syncs with the GPU.
        self.optimizer_step = 0
        # Training forwards counted while optimizer_step stayed at _counted_step: a counter nothing
        # advances is reported (Sparse24StepWarning) instead of leaving the layer dense forever.
        self._counted_step = 0
        self._forwards_since_step = 0
        self._step_warned = False
        # Layer-wise switch (Sparse24Config.switch): the step this layer left dense warmup, and the
        # first measurement of the current run of measurements below the threshold (both checkpointed).
        self.switched_at: Optional[int] = None
        self.below_since: Optional[int] = None
        # Last measured shares of the activation 2:4 drops, {"nonzeros", "l1", "l2"} (identical on every
        # rank holding the layer); the measurement in flight: (step, host copy, CUDA event or None).
        self.dropped_shares: Optional[dict] = None
        self._measured_step = -1
        self._in_flight = None
        self._over_guard = False
        self.soft_threshold_scale: Optional[torch.Tensor] = None
        self._perm_cache = None  # (num_tokens, device, perm, inv): derived from the seed, not state
        self._gathered_perm_cache = None  # (num_tokens, tp, device, perm, inv) of the gathered tokens
        # Telemetry summed on the device by the FFN function (functional.STAT_*), read by sparsity_stats().
        self.register_buffer("sparsity_counters", torch.zeros(4, dtype=torch.int64,
                                                              device=self.linear_fc1.weight.device),
                             persistent=False)
        # A dense checkpoint has no mlp._extra_state: load it as None (keep this layer's fresh state).
        self._register_load_state_dict_pre_hook(
            lambda state_dict, prefix, *args, **kwargs: state_dict.setdefault(f"{prefix}_extra_state")
        )

    # --- megatron hooks and state --------------------------------------------------------------

    def set_layer_number(self, layer_number: int):
        """Called by TransformerLayer: seeds are per layer."""
        self.layer_number = int(layer_number)
        self._perm_cache = self._gathered_perm_cache = None

    def sparse24_step(self):
        """One optimizer step done (see ``megatron_sparse24.step``)."""
        self.optimizer_step += 1

    @property
    def sparse_active(self) -> bool:
        if self.sparse24.switch == "measured":
            return self.switched_at is not None and self.optimizer_step >= self.switched_at
        return self.optimizer_step >= self.sparse24.dense_warmup_steps

    def get_extra_state(self):
        scale = None if self.soft_threshold_scale is None else float(self.soft_threshold_scale)
        return {"version": 2, "optimizer_step": self.optimizer_step, "seed": self.sparse24.seed,
                "soft_threshold_scale": scale, "switched_at": self.switched_at, "below_since": self.below_since}

    def set_extra_state(self, state):
        if state is None:  # e.g. a dense checkpoint: keep this layer's fresh state
            return
        if isinstance(state, torch.Tensor):  # torch's empty placeholder
            if state.numel() == 0:
                return
            raise ValueError("unexpected tensor _extra_state for Sparse24MLP")
        self.optimizer_step = int(state["optimizer_step"])
        if int(state["seed"]) != self.sparse24.seed:  # the run's seed wins: resume continues identically
            self.sparse24 = dataclasses.replace(self.sparse24, seed=int(state["seed"]))
            self._perm_cache = self._gathered_perm_cache = None
        self.switched_at = state.get("switched_at")
        self.below_since = state.get("below_since")
        scale = state.get("soft_threshold_scale")
        device = self.linear_fc1.weight.device
        self.soft_threshold_scale = None if scale is None else torch.tensor(scale, dtype=torch.float32, device=device)

    # --- forward -------------------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, per_token_scale=None, **kwargs):
        """[s, b, h] (s/tp under sequence parallel) -> (output [s, b, h], fc2 bias or None)."""
        if per_token_scale is not None:
            raise ValueError("Sparse24MLP does not take per_token_scale (an MoE feature)")
        self._follow_training_loop()
        measure = self.training and torch.is_grad_enabled() and self._measurement_due()
        if not self.sparse_active:
            return self._dense_forward(hidden_states, measure)
        self._run_linear_pre_hooks()
        if measure:  # the 2:4 path never forms fc1's output in full: a sample of it
            tokens = hidden_states.reshape(-1, hidden_states.shape[-1])[:MEASURE_TOKENS]
            with torch.no_grad():
                self._measure(F.linear(tokens, self.linear_fc1.weight, self.linear_fc1.bias))
        return self._sparse_forward(hidden_states)

    def _follow_training_loop(self):
        """Under Megatron-LM's loop the step counter follows its iteration (no user code needed);
        elsewhere it is advanced by ``megatron_sparse24.step`` / ``set_step``. Warns once when a layer
        still in dense warmup has trained far longer than its warmup without the counter moving."""
        iteration = megatron_lm_iteration()
        if iteration is not None:
            self.optimizer_step = iteration
        if not (self.training and torch.is_grad_enabled()) or self.sparse_active:
            return
        if self.optimizer_step != self._counted_step:  # the counter moved: count afresh
            self._counted_step, self._forwards_since_step = self.optimizer_step, 0
        self._forwards_since_step += 1
        n, warmup = self._forwards_since_step, self.sparse24.dense_warmup_steps
        if n > 2 * warmup and not self._step_warned and n > 2 * warmup * _microbatches_per_step():
            self._step_warned = True
            warnings.warn(
                f"megatron_sparse24: a Sparse24MLP ran {n} training forward passes (more than twice its "
                f"dense warmup of {warmup} optimizer steps) while its step counter stayed at "
                f"{self.optimizer_step}: it will stay dense. Call megatron_sparse24.step(model) once per "
                "optimizer step, or megatron_sparse24.set_step(model, iteration); with Megatron-Bridge register "
                "megatron_sparse24.bridge_step_callback (docs/megatron.md)", Sparse24StepWarning, stacklevel=3)

    def _measurement_due(self) -> bool:
        """True at the first training forward of every MEASURE_EVERY-th optimizer step; first takes the
        decision from the previous measurement (``_decide``), so the path this forward runs follows it."""
        step = self.optimizer_step
        if step % MEASURE_EVERY or step == self._measured_step:
            return False
        self._measured_step = step
        if self._in_flight is not None:
            self._decide(*self._in_flight)
        return True

    @torch.no_grad()
    def _measure(self, y1: torch.Tensor):
        """What 2:4 drops of the activation relu(y1)^2 (``ops.dropped_by_24_sums``) on up to
        MEASURE_TOKENS of this rank's tokens ([tokens, F/tp] of fc1's output, bias included), summed over
        the ranks that hold this layer by an all-reduce nobody waits for: its result is read
        MEASURE_EVERY steps later (long done: no stall, and every rank reads the same sums at the same
        step) and drives the switch."""
        sums = ops.dropped_by_24_sums(y1.reshape(-1, y1.shape[-1])[:MEASURE_TOKENS])
        group = _layer_holders_group(self.tp_group)
        if group_size(group) > 1:
            torch.distributed.all_reduce(sums, group=group, async_op=True).wait()  # the stream waits, not the host
        event = None
        if sums.is_cuda:
            host = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=True)
            host.copy_(sums, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = sums
        self._in_flight = (self.optimizer_step, host, event)

    def _decide(self, measured_step: int, host_sums: torch.Tensor, event):
        """Take the switch decision from a measurement's agreed sums (the same on every rank holding
        the layer, read at the same step, so every rank decides alike), and warn when a layer running
        2:4 drops more than twice the threshold."""
        if event is not None:
            event.synchronize()  # recorded MEASURE_EVERY steps ago: already complete
        self.dropped_shares = {name: dropped / total if total > 0 else 0.0
                               for name, (dropped, total) in zip(MEASURES, host_sums.tolist())}
        cfg, now = self.sparse24, self.optimizer_step
        share = self.dropped_shares[cfg.switch_measure]
        if share < cfg.switch_threshold:
            if self.below_since is None:
                self.below_since = measured_step
        else:
            self.below_since = None
        if cfg.switch == "measured" and self.switched_at is None:
            ready = now >= cfg.dense_warmup_steps and self.below_since is not None \
                and now - self.below_since >= cfg.switch_window
            if ready or (cfg.switch_max_steps is not None and now >= cfg.switch_max_steps):
                self.switched_at = now
                logger.info("layer %d: 2:4 from step %d (it drops %.2f%% of the activation's %s%s)", self.layer_number,
                            now, 100 * share, cfg.switch_measure, "" if ready else "; forced by switch_max_steps")
        over = self.sparse_active and share > 2 * cfg.switch_threshold
        if over and not self._over_guard:
            logger.warning("layer %d: 2:4 drops %.2f%% of its activation's %s at step %d, more than twice the "
                           "%.2f%% threshold", self.layer_number, 100 * share, cfg.switch_measure, measured_step,
                           100 * cfg.switch_threshold)
        self._over_guard = over

    def _run_linear_pre_hooks(self):
        """The 2:4 path reads fc1/fc2's weights without calling their forward, so it runs their
        forward pre-hooks itself: megatron's DistributedDataParallel waits there for the parameter
        all-gather (--overlap-param-gather) and dispatches the next bucket's."""
        for linear in (self.linear_fc1, self.linear_fc2):
            for key, hook in linear._forward_pre_hooks.items():
                if key in linear._forward_pre_hooks_with_kwargs:
                    hook(linear, (), {})
                else:
                    hook(linear, ())

    def _dense_forward(self, hidden_states, measure: bool = False):
        y1, b1 = self.linear_fc1(hidden_states)
        if b1 is not None:
            y1 = y1 + b1
        if measure:  # on the fc1 output the dense path computes anyway
            self._measure(y1)
        r = torch.relu(y1)
        if self.training:  # activation sparsity during warmup too (nothing is dropped yet); no host sync
            with torch.no_grad():  # one reduction over the relu output the FFN computes anyway
                nnz = torch.count_nonzero(r)
                self.sparsity_counters[STAT_NNZ] += nnz
                self.sparsity_counters[STAT_KEPT] += nnz
                self.sparsity_counters[STAT_ELEMENTS] += y1.numel()
        return self.linear_fc2(r.square())

    def _permutation(self, num_tokens: int, device):
        cache = self._perm_cache
        if cache is None or cache[0] != num_tokens or cache[1] != device:
            perm, inv = ops.token_permutation(
                num_tokens, permutation_seed(self.sparse24, self.layer_number), device
            )
            self._perm_cache = cache = (num_tokens, device, perm, inv)
        return cache[2], cache[3]

    def _gathered_permutation(self, num_tokens: int, tp: int, device):
        """The permutation of the gathered tokens ([tp * n] under sequence parallelism) that permuting
        each rank's n tokens before the gather amounts to: rank r's rows stay in block r."""
        if tp == 1:
            return self._permutation(num_tokens, device)
        cache = self._gathered_perm_cache
        if cache is None or cache[:3] != (num_tokens, tp, device):
            perm, inv = self._permutation(num_tokens, device)
            base = torch.arange(tp, device=device, dtype=perm.dtype)[:, None] * num_tokens
            self._gathered_perm_cache = cache = (num_tokens, tp, device, (base + perm).reshape(-1),
                                                 (base + inv).reshape(-1))
        return cache[3], cache[4]

    def _sparse_forward(self, hidden_states):
        s, b, h = hidden_states.shape
        tokens = hidden_states.reshape(s * b, h)
        cfg = self.sparse24
        tp = self.tp_group.size()
        sequence_parallel = self.config.sequence_parallel and tp > 1
        n_gathered = s * b * (tp if sequence_parallel else 1)
        w1, b1 = self.linear_fc1.weight, self.linear_fc1.bias
        w2 = self.linear_fc2.weight
        plan = make_plan(cfg, (n_gathered, w1.shape[0], h), tokens.device, tokens.dtype,
                         step=self.optimizer_step, seed=rng.mix_seed(self.layer_number, self.tp_group.rank()),
                         scale=self.soft_threshold_scale if cfg.method == "soft_threshold" else None,
                         accumulate_main_grad=self.config.gradient_accumulation_fusion,
                         stats=self.sparsity_counters, tuning_group=self.tp_group)
        # Where the 2:4 engine takes the permutation itself; the dense-GEMM engine always does (it
        # gathers nothing).
        into_ffn = not layer_permutes_shards(tp, sequence_parallel)
        plan = choose_engine(plan, (n_gathered, w1.shape[0], h), tokens.dtype, tokens.device, b1 is not None,
                             sparse_permutes=cfg.token_permutation and into_ffn,
                             dense_permutes=cfg.token_permutation)
        engine = plan.engine
        perm = inv = ffn_perm = ffn_inv = None
        if cfg.token_permutation and (engine == "dense" or into_ffn):
            ffn_perm, ffn_inv = self._gathered_permutation(s * b, tp if sequence_parallel else 1, tokens.device)
        elif cfg.token_permutation:  # permute this rank's own tokens (no communication)
            perm, inv = self._permutation(s * b, tokens.device)
            tokens = _PermuteRows.apply(tokens, perm, inv)
        if sequence_parallel:
            full = gather_from_sequence_parallel_region(tokens, group=self.tp_group)
        elif tp > 1:
            full = copy_to_tensor_model_parallel_region(tokens, group=self.tp_group)
        else:
            full = tokens
        if cfg.method == "soft_threshold" and self.soft_threshold_scale is None:  # the first sparse step
            self.soft_threshold_scale = self._freeze_soft_threshold_scale(full, w1, b1)
            plan = dataclasses.replace(plan, scale=self.soft_threshold_scale)
        function = Sparse24DenseGemmFFNFunction if engine == "dense" else Sparse24FFNFunction
        y = function.apply(full, w1, b1, w2, ffn_perm, ffn_inv, plan)
        if sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y, group=self.tp_group)
        elif tp > 1:
            y = reduce_from_tensor_model_parallel_region(y, group=self.tp_group)
        if perm is not None:
            y = _PermuteRows.apply(y, inv, perm)
        return y.reshape(s, b, h), self.linear_fc2.bias

    @torch.no_grad()
    def _freeze_soft_threshold_scale(self, full, w1, b1) -> torch.Tensor:
        """S-STE scale over the whole layer (all TP ranks' features), once; then frozen."""
        num, den = ops.soft_threshold_sums(F.linear(full, w1, b1))
        sums = torch.stack([num, den]).double()
        if self.tp_group.size() > 1:
            torch.distributed.all_reduce(sums, group=self.tp_group)
        scale = torch.where(sums[1] > 0, sums[0] / sums[1], torch.ones_like(sums[0])).float()
        logger.info("layer %d: soft-threshold scale frozen", self.layer_number)
        return scale


def sparsity_stats(model, reset: bool = True) -> list[dict]:
    """Per Sparse24MLP (in layer order): activation sparsity (share of zeros in relu(Y1)^2), the
    share of its non-zeros that 2:4 dropped, and the share of kept non-zeros in the dense-gradient
    features, accumulated since the last reset. One host sync for all layers: call it at the log
    interval, not every step. Layers with no sparse step since the reset report None values."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    layers = [m for chunk in chunks for m in chunk.modules() if isinstance(m, Sparse24MLP)]
    if not layers:
        return []
    counters = torch.stack([m.sparsity_counters for m in layers]).cpu().tolist()
    if reset:
        for m in layers:
            m.sparsity_counters.zero_()
    return [summarize_counters(m.layer_number, c) for m, c in zip(layers, counters)]


def summarize_counters(layer: int, counters) -> dict:
    """Ratios from one layer's summed counters [non-zeros before 2:4, kept, elements, kept in dense
    features]; all None if the layer ran no sparse step (nothing counted)."""
    nnz, kept, elements, dense_kept = counters
    if not elements:
        return {"layer": layer, "activation_sparsity": None, "dropped_by_24": None, "dense_feature_share": None}
    return {
        "layer": layer,
        "activation_sparsity": 1.0 - nnz / elements,
        "dropped_by_24": 1.0 - kept / nnz if nnz else 0.0,
        "dense_feature_share": dense_kept / kept if kept else 0.0,
    }


def _layer_holders_group(tp_group):
    """The ranks that hold a layer: its tensor-, data- and context-parallel ranks (megatron's group of
    one pipeline stage), or just its TP group outside megatron's parallel state."""
    if not torch.distributed.is_initialized():
        return None
    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
    return tp_group


def _microbatches_per_step() -> int:
    """Micro-batches per optimizer step from megatron's calculator (set by every megatron loop), else 1."""
    from megatron.core.num_microbatches_calculator import get_num_microbatches

    try:
        return max(1, int(get_num_microbatches()))
    except AttributeError:  # no calculator initialised: a plain loop
        return 1


def set_step(model, optimizer_steps: int) -> int:
    """Set every Sparse24MLP's optimizer-step counter (for training loops this package does not own,
    e.g. Megatron-LM's: call it from forward_step with the loop's iteration count)."""
    n = 0
    for chunk in (model if isinstance(model, (list, tuple)) else [model]):
        for module in chunk.modules():
            if isinstance(module, Sparse24MLP):
                module.optimizer_step = int(optimizer_steps)
                n += 1
    return n


def step(model) -> int:
    """Advance the dense-warmup counter of every Sparse24MLP in ``model`` (a module, a wrapped
    module, or a list of model chunks) by one optimizer step. Call it once after each optimizer
    step. Returns the number of layers advanced."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    n = 0
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, Sparse24MLP):
                module.sparse24_step()
                n += 1
    return n
