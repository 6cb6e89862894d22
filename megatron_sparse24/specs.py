"""Layer specs: where Megatron-LM, NeMo and Megatron-Bridge plug Sparse24MLP in.

* ``get_gpt_layer_sparse24_spec(sparse24_config=None, ...)``: a standard ``TransformerLayer`` spec
  (same structure as megatron's local/TE specs, so NeMo can still edit ``core_attention``) whose MLP
  is ``Sparse24MLP``. ``use_te=None`` picks the Transformer Engine variant when TE is importable.
* ``SPARSE24_LAYER_SPEC``: a module-level ``ModuleSpec`` for Megatron-LM's
  ``--spec megatron_sparse24.specs SPARSE24_LAYER_SPEC`` (used as is, never called); its
  Sparse24Config comes from ``config.sparse24`` or Megatron-LM's args (``add_sparse24_args``).
* ``sparse24_layer_spec(config, vp_stage=None)``: the callable for NeMo 2's
  ``GPTConfig.transformer_layer_spec`` and Megatron-Bridge's ``GPTModelProvider.transformer_layer_spec``.
* ``get_gpt_block_sparse24_spec(config, vp_stage=None, ...)``: a whole ``TransformerBlock`` spec whose
  final norm also works with sequence parallelism without TE or apex (used by pretrain_gpt_sparse.py).

Checkpoint keys match megatron's specs: ``pre_mlp_layernorm.*`` is saved as
``mlp.linear_fc1.layer_norm_*`` and ``input_layernorm.*`` as ``self_attention.linear_qkv.layer_norm_*``,
as in the TE layout, so dense squared-ReLU GPT checkpoints load into these models and back.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from .attention import SDPAttention
from .config import Sparse24Config
from .mcore_compat import dense_mlp_submodule, quiet_unknown_mlp_type
from .mlp import Sparse24MLP

try:  # the TE classes import without TE too, as MagicMock stand-ins: trust only HAVE_TE
    from megatron.core.extensions.transformer_engine import HAVE_TE
except Exception:  # pragma: no cover
    HAVE_TE = False

__all__ = [
    "SPARSE24_LAYER_SPEC",
    "TorchNorm",
    "get_gpt_block_sparse24_spec",
    "get_gpt_layer_sparse24_spec",
    "sparse24_layer_spec",
]

_KEYS_MAP = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


class TorchNorm:
    """torch LayerNorm / RMSNorm (``config.normalization``) that also works with sequence
    parallelism: megatron's WrappedTorchNorm refuses it, but a norm's parameters are replicated
    across TP ranks, so they only need ``sequence_parallel=True`` for finalize_model_grads to
    all-reduce their gradients."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps, dtype=config.params_dtype)
        else:
            raise ValueError(f"normalization={config.normalization!r}: expected LayerNorm or RMSNorm")
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


def _mlp_spec(sparse24_config: Optional[Sparse24Config], mlp: str):
    submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    if mlp == "dense":  # the A/B baseline: megatron's own MLP, same parameters and keys
        return dense_mlp_submodule(submodules)
    if mlp != "sparse24":
        raise ValueError(f"mlp={mlp!r}: expected 'sparse24' or 'dense'")
    return ModuleSpec(module=Sparse24MLP, submodules=submodules, params={"sparse24_config": sparse24_config})


def get_gpt_layer_sparse24_spec(
    sparse24_config: Optional[Sparse24Config] = None,
    *,
    qk_layernorm: bool = False,
    use_te: Optional[bool] = None,
    attention: str = "sdpa",
    mlp: str = "sparse24",
) -> ModuleSpec:
    """TransformerLayer spec with ``Sparse24MLP`` (see the module docstring).

    Args:
        sparse24_config: the sparsity settings (None: from ``config.sparse24``, Megatron-LM's args,
            or the defaults, resolved when the layer is built).
        qk_layernorm: query/key norms, as in megatron's specs.
        use_te: Transformer Engine attention and norms (None: when TE is importable). The MLP is
            always Sparse24MLP with megatron's ColumnParallelLinear/RowParallelLinear.
        attention: without TE, "sdpa" (torch scaled_dot_product_attention, causal) or "local"
            (megatron's DotProductAttention, which materialises the s x s scores).
        mlp: "sparse24", or "dense" for megatron's own MLP in the same layer (the A/B baseline).
    """
    if use_te is None:
        use_te = HAVE_TE
    if use_te and not HAVE_TE:
        raise ValueError("use_te=True but Transformer Engine is not installed")
    if attention not in ("sdpa", "local"):
        raise ValueError(f"attention={attention!r}: expected 'sdpa' or 'local'")
    mlp_spec = _mlp_spec(sparse24_config, mlp)
    if use_te:
        from megatron.core.extensions.transformer_engine import (
            TEDotProductAttention,
            TELayerNormColumnParallelLinear,
            TENorm,
            TERowParallelLinear,
        )

        # TE fuses the input norm into the QKV linear, so only pre_mlp_layernorm needs the key map.
        return _layer_spec(IdentityOp, TELayerNormColumnParallelLinear, TEDotProductAttention, TERowParallelLinear,
                           TENorm, qk_layernorm, mlp_spec, {"pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"})
    core = SDPAttention if attention == "sdpa" else DotProductAttention
    return _layer_spec(TorchNorm, ColumnParallelLinear, core, RowParallelLinear, TorchNorm, qk_layernorm, mlp_spec,
                       dict(_KEYS_MAP))


def _layer_spec(input_norm, linear_qkv, core_attention, linear_proj, norm, qk_layernorm, mlp_spec, keys_map):
    """megatron's standard TransformerLayer structure with the given building blocks."""
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=input_norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=linear_qkv,
                    core_attention=core_attention,
                    linear_proj=linear_proj,
                    q_layernorm=norm if qk_layernorm else IdentityOp,
                    k_layernorm=norm if qk_layernorm else IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            mlp=mlp_spec,
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def sparse24_layer_spec(config: TransformerConfig, vp_stage: Optional[int] = None,
                        sparse24_config: Optional[Sparse24Config] = None) -> ModuleSpec:
    """Callable spec for NeMo 2 / Megatron-Bridge: ``transformer_layer_spec=sparse24_layer_spec``, or
    ``functools.partial(sparse24_layer_spec, sparse24_config=Sparse24Config(...))`` to choose the
    settings. Without one, ``config.sparse24`` if the config carries it, else the defaults."""
    return get_gpt_layer_sparse24_spec(sparse24_config or getattr(config, "sparse24", None),
                                       qk_layernorm=getattr(config, "qk_layernorm", False))


def get_gpt_block_sparse24_spec(config: TransformerConfig, vp_stage: Optional[int] = None,
                                sparse24_config: Optional[Sparse24Config] = None, **layer_kwargs) -> ModuleSpec:
    """TransformerBlock spec: the layers of this pipeline stage plus a final norm that works with
    sequence parallelism (TorchNorm; TE's norm when use_te)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build

    layer = get_gpt_layer_sparse24_spec(sparse24_config, **layer_kwargs)
    use_te = layer.submodules.input_layernorm is IdentityOp
    final_norm = TorchNorm
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    return ModuleSpec(module=TransformerBlock,
                      submodules=TransformerBlockSubmodules(layer_specs=[layer] * n, layer_norm=final_norm))


quiet_unknown_mlp_type()

#: For Megatron-LM's ``--spec megatron_sparse24.specs SPARSE24_LAYER_SPEC`` (used as is).
SPARSE24_LAYER_SPEC = get_gpt_layer_sparse24_spec()
