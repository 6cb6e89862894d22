"""Megatron-LM's own pretrain() with 2:4 activation-sparse FFNs.

Put this file in a Megatron-LM checkout (core 0.13-0.17, next to pretrain_gpt.py) with
megatron_sparse24 installed, and run it like pretrain_gpt.py plus:

    --spec megatron_sparse24.specs SPARSE24_LAYER_SPEC --squared-relu --no-bias-gelu-fusion \
    --activation-sparse-method naive --activation-dense-warmup-steps 1000

(see examples/megatron_lm/run.sh). The spec's Sparse24MLP reads the 2:4 flags from Megatron-LM's args;
this wrapper only adds them to the parser and keeps the layers' warmup counter in step with
Megatron-LM's iteration, since its loop does not call megatron_sparse24.step().
"""

from functools import partial

import pretrain_gpt  # Megatron-LM's script, imported as a module
from gpt_builders import gpt_builder
from megatron.core.enums import ModelType
from megatron.training import get_args, pretrain
from model_provider import model_provider

import megatron_sparse24
from megatron_sparse24.arguments import add_sparse24_args


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    megatron_sparse24.set_step(model, get_args().curr_iteration)
    return pretrain_gpt.forward_step(data_iterator, model, return_schedule_plan)


if __name__ == "__main__":
    pretrain_gpt.train_valid_test_datasets_provider.is_distributed = True
    pretrain(
        pretrain_gpt.train_valid_test_datasets_provider,
        partial(model_provider, gpt_builder),
        ModelType.encoder_or_decoder,
        forward_step,
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
        extra_args_provider=add_sparse24_args,
    )
