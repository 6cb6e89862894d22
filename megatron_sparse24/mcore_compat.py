"""What differs between the megatron-core releases this package supports (0.16.1 through 0.19.x).

Each function is named by what changed; nothing else in the package checks versions.

* The MLP slot's process groups: up to 0.17 a TransformerLayer builds a custom MLP with only
  ``config`` (and logs "Unknown MLP type"); from 0.18 it passes ``pg_collection`` (plus
  ``is_mtp_layer`` and ``name``), and megatron's own MLP takes ``tp_group = pg_collection.tp``.
* Megatron-LM's training loop (``megatron.training``) ships in the wheel from 0.17 on; its
  ``pretrain()`` changed signature twice (0.18: a config container first; 0.19: ``model_provider``
  becomes a keyword).
* The wheel ships megatron's compiled dataset helpers but not the Makefile that
  ``megatron.training``'s initialisation runs to build them.
* Training CUDA graphs: ``cuda_graph_impl`` "local" or "transformer_engine" with
  ``cuda_graph_scope`` (0.16, 0.17) or ``cuda_graph_modules`` (0.18 on; an empty list captures whole
  layers); "full_iteration" is a scope in 0.16/0.17 and an implementation from 0.18.
* megatron's own MLP in a layer spec: from 0.18 a TransformerLayer rewraps a ``ModuleSpec`` of it
  (with a warning) into its ``as_mlp_submodule`` builder; before, a ``ModuleSpec`` is what it builds.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
from typing import Callable, Optional

import torch
from megatron.core import parallel_state

__all__ = [
    "HAVE_MEGATRON_TRAINING",
    "mlp_tp_group",
    "quiet_unknown_mlp_type",
    "use_prebuilt_dataset_helpers",
    "run_megatron_pretrain",
    "mlp_in_training_cuda_graph",
    "dense_mlp_submodule",
]

# megatron-core >= 0.17 wheels (and Megatron-LM checkouts) ship it; importing it is left to its users,
# so that a missing dependency of it is reported as such, never taken for its absence.
HAVE_MEGATRON_TRAINING = importlib.util.find_spec("megatron.training") is not None


def mlp_tp_group(tp_group: Optional[torch.distributed.ProcessGroup], pg_collection=None):
    """The tensor-parallel group of an MLP built in a TransformerLayer: the one passed in
    (``tp_group`` by older callers, ``pg_collection.tp`` from 0.18 on), else megatron's global one
    (what a 0.16/0.17 TransformerLayer's own groups default to)."""
    if tp_group is None and pg_collection is not None:
        tp_group = pg_collection.tp
    if tp_group is None:
        tp_group = parallel_state.get_tensor_model_parallel_group()
    return tp_group


class _DropUnknownMLPType(logging.Filter):
    def filter(self, record):
        return "Unknown MLP type" not in record.getMessage()


def quiet_unknown_mlp_type():
    """0.16/0.17 log "Unknown MLP type ... Using default kwargs" once per layer for any MLP class other
    than their own; for Sparse24MLP that is expected (it finds its TP group itself). Idempotent."""
    log = logging.getLogger("megatron.core.transformer.transformer_layer")
    if not any(isinstance(f, _DropUnknownMLPType) for f in log.filters):
        log.addFilter(_DropUnknownMLPType())


def mlp_in_training_cuda_graph(config) -> Optional[str]:
    """How megatron-core's training CUDA graphs would capture a dense layer's MLP under ``config`` (a
    TransformerConfig after its ``__post_init__``), e.g. "cuda_graph_impl='local', whole layers"; None
    where the MLP runs eagerly: graphs off, or Transformer Engine's graphs of attention only. The
    "local" implementation gives a dense TransformerLayer one graph manager for its whole forward
    whenever attention or the MLP is in scope (0.16 through 0.19), so "attn" captures the MLP too."""
    impl = getattr(config, "cuda_graph_impl", "none") or "none"
    if impl == "none":
        return None
    if impl == "full_iteration":
        return "cuda_graph_impl='full_iteration', the whole forward and backward"
    scope = getattr(config, "cuda_graph_modules", None)
    if scope is None:
        scope = getattr(config, "cuda_graph_scope", None)
    if isinstance(scope, str):
        scope = scope.split(",")
    names = [getattr(m, "name", str(m)) for m in (scope or [])]
    if not names or names == ["full"]:
        return f"cuda_graph_impl={impl!r}, whole layers"
    if "full_iteration" in names:
        return f"cuda_graph_impl={impl!r} with scope 'full_iteration', the whole forward and backward"
    if "mlp" in names:
        return f"cuda_graph_impl={impl!r} with 'mlp' among the captured modules"
    if impl == "local" and "attn" in names:
        return "cuda_graph_impl='local' with 'attn', which graphs a dense layer's whole forward"
    return None


def dense_mlp_submodule(submodules):
    """megatron's own MLP (the A/B baseline) for a TransformerLayer's mlp slot, as its own specs give it:
    the ``as_mlp_submodule`` builder where megatron's MLP has one (0.18 on), else a ``ModuleSpec``."""
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.spec_utils import ModuleSpec

    if hasattr(MLP, "as_mlp_submodule"):
        return functools.partial(MLP.as_mlp_submodule, submodules=submodules)
    return ModuleSpec(module=MLP, submodules=submodules)


def use_prebuilt_dataset_helpers():
    """``megatron.training``'s initialisation runs ``make`` in megatron/core/datasets to build the
    C++ dataset helpers; the wheel ships them compiled but without the Makefile, so that ``make``
    fails and exits. Skip the build when the compiled module imports (a checkout without it still
    builds)."""
    from megatron.core.datasets import utils as dataset_utils

    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        return
    dataset_utils.compile_helpers = lambda: None


def run_megatron_pretrain(datasets_provider: Callable, model_provider: Callable, forward_step: Callable,
                          extra_args_provider: Optional[Callable] = None, args_defaults: Optional[dict] = None,
                          **pretrain_kwargs):
    """Megatron-LM's ``pretrain()`` as each release spells it: 0.17 parses the command line itself
    (``extra_args_provider``, ``args_defaults``); 0.18 and 0.19 take a config container built from the
    parsed args, with ``model_provider`` positional (0.18) or a keyword (0.19)."""
    from megatron.core.enums import ModelType
    from megatron.training import pretrain

    args_defaults = dict(args_defaults or {})
    use_prebuilt_dataset_helpers()
    params = list(inspect.signature(pretrain).parameters)
    if "cfg_container" not in params:  # 0.17
        return pretrain(datasets_provider, model_provider, ModelType.encoder_or_decoder, forward_step,
                        extra_args_provider=extra_args_provider, args_defaults=args_defaults, **pretrain_kwargs)
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    args = parse_and_validate_args(extra_args_provider=extra_args_provider, args_defaults=args_defaults)
    cfg = pretrain_cfg_container_from_args(args)
    if params.index("model_provider") < params.index("forward_step_func"):  # 0.18
        return pretrain(cfg, datasets_provider, model_provider, ModelType.encoder_or_decoder, forward_step,
                        **pretrain_kwargs)
    return pretrain(cfg, datasets_provider, ModelType.encoder_or_decoder, forward_step,
                    model_provider=model_provider, **pretrain_kwargs)
