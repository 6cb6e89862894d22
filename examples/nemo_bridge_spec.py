"""NeMo 2 and Megatron-Bridge: the callable layer spec with your 2:4 settings (illustrative; needs
those frameworks installed). Both call ``transformer_layer_spec(config)`` (with ``vp_stage=`` when the
signature has it) and build a standard TransformerLayer whose MLP is Sparse24MLP."""

from functools import partial

from megatron.core.activations import squared_relu

import megatron_sparse24
from megatron_sparse24 import Sparse24Config
from megatron_sparse24.specs import sparse24_layer_spec

SPARSE24 = Sparse24Config(method="naive", dense_warmup_steps=1000, dense_feature_fraction=0.05)
LAYER_SPEC = partial(sparse24_layer_spec, sparse24_config=SPARSE24)
FFN_KWARGS = dict(activation_func=squared_relu, gated_linear_unit=False, bias_activation_fusion=False)


def nemo2_config():
    from nemo.collections import llm

    return llm.GPTConfig(num_layers=24, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=16,
                         seq_length=2048, transformer_layer_spec=LAYER_SPEC, **FFN_KWARGS)


def bridge_provider():
    from megatron.bridge.models import GPTModelProvider

    return GPTModelProvider(num_layers=24, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=16,
                            seq_length=2048, transformer_layer_spec=LAYER_SPEC, **FFN_KWARGS)


def bridge_callbacks():
    """Megatron-Bridge: pass ``callbacks=bridge_callbacks()`` to its ``pretrain``; the layers' dense-warmup
    counters then follow Bridge's optimizer steps (``train_state.step``)."""
    from megatron.bridge.training.callbacks import CallbackManager

    manager = CallbackManager()
    manager.register("on_train_step_start", megatron_sparse24.bridge_step_callback)
    return manager


def on_train_step(model, global_step: int):
    """NeMo 2 (Lightning): call from a callback's on_train_batch_start with trainer.global_step;
    dense warmup counts optimizer steps."""
    megatron_sparse24.set_step(model, global_step)
