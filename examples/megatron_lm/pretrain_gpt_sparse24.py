"""A Megatron-LM checkout's own pretrain_gpt.py with 2:4 activation-sparse FFNs.

Put this file in a Megatron-LM checkout (core >= 0.17, next to pretrain_gpt.py) with megatron_sparse24
installed, and run it like pretrain_gpt.py plus

    --spec megatron_sparse24.specs SPARSE24_LAYER_SPEC --squared-relu \
    --activation-sparse-method naive --activation-dense-warmup-steps 1000

(see examples/megatron_lm/run.sh). It is pretrain_gpt.py's model builder, data and forward step with
the 2:4 flags added to the parser; the spec's Sparse24MLP reads them from Megatron-LM's args, and its
dense-warmup counter follows Megatron-LM's iteration by itself. (This package's own
pretrain_gpt_sparse.py is the same loop without a checkout.)
"""

from functools import partial

import pretrain_gpt  # Megatron-LM's script, imported as a module
from gpt_builders import gpt_builder
from model_provider import model_provider

from megatron_sparse24.mcore_compat import run_megatron_pretrain
from megatron_sparse24.training.megatron_lm import add_args

if __name__ == "__main__":
    pretrain_gpt.train_valid_test_datasets_provider.is_distributed = True
    run_megatron_pretrain(pretrain_gpt.train_valid_test_datasets_provider, partial(model_provider, gpt_builder),
                          pretrain_gpt.forward_step, extra_args_provider=add_args,
                          args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
