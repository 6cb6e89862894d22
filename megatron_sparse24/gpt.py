"""Build a megatron-core GPTModel whose FFNs are 2:4 activation-sparse (or the dense A/B twin).

Used by ``pretrain_gpt_sparse.py`` and the tests; a plain function over megatron-core's own
``GPTModel`` with this package's block spec.
"""

from __future__ import annotations

from typing import Optional

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from .config import Sparse24Config
from .specs import get_gpt_block_sparse24_spec

__all__ = ["build_gpt_model"]


def build_gpt_model(
    config: TransformerConfig,
    *,
    vocab_size: int,
    max_sequence_length: int,
    sparse24_config: Optional[Sparse24Config] = None,
    sparse24: bool = True,
    attention: str = "sdpa",
    position_embedding_type: str = "learned_absolute",
    share_embeddings_and_output_weights: bool = False,
    vp_stage: Optional[int] = None,
) -> GPTModel:
    """GPTModel for this pipeline stage. ``sparse24=False`` builds the same squared-ReLU model with
    megatron's dense MLP (identical parameters and checkpoint keys): the A/B baseline."""
    spec = get_gpt_block_sparse24_spec(config, vp_stage, sparse24_config, attention=attention,
                                       mlp="sparse24" if sparse24 else "dense")
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        position_embedding_type=position_embedding_type,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        vp_stage=vp_stage,
    )
