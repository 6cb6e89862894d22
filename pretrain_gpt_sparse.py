"""Pretrain a GPT whose squared-ReLU FFNs are 2:4 activation-sparse: Megatron-LM's ``pretrain_gpt.py``
with this package's layer spec and flags.

    python pretrain_gpt_sparse.py --num-layers 2 --hidden-size 128 --num-attention-heads 4 \
        --seq-length 128 --max-position-embeddings 128 --micro-batch-size 4 --train-iters 50 --lr 1e-3 \
        --squared-relu --mock-data --tokenizer-type NullTokenizer --vocab-size 512   # CPU; torchrun for GPUs

With megatron-core >= 0.17 this runs Megatron-LM's own training loop (``megatron.training.pretrain``):
all of its flags, checkpoints (``torch_dist``), logging and checks, plus ``add_sparse24_args``'s 2:4
flags. megatron-core 0.16 ships no ``megatron.training``; there the package's own loop
(``megatron_sparse24/training/loop.py``) runs a subset of the same flags.

The path of a token: ``forward_step`` -> ``GPTModel`` built by ``model_provider`` from
``megatron_sparse24.specs`` -> ``TransformerLayer`` -> ``Sparse24MLP`` (``megatron_sparse24/mlp.py``)
-> ``Sparse24FFNFunction`` (``megatron_sparse24/functional.py``) -> the Triton pack kernels and the
sparse GEMMs (``megatron_sparse24/kernels``, ``megatron_sparse24/backends``).
"""

from __future__ import annotations

import sys
from functools import partial

from megatron_sparse24.training import quiet_known_warnings

quiet_known_warnings()
from megatron_sparse24.mcore_compat import HAVE_MEGATRON_TRAINING  # noqa: E402

if not HAVE_MEGATRON_TRAINING:  # megatron-core 0.16: the package's own loop
    if __name__ == "__main__":
        from megatron_sparse24.training.loop import main

        main(sys.argv[1:])
        sys.exit(0)
    raise ImportError("this module's Megatron-LM loop needs megatron.training (megatron-core >= 0.17); "
                      "megatron_sparse24.training.loop is the loop for megatron-core 0.16")

import torch

from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.models.gpt import GPTModel
from megatron.core.rerun_state_machine import get_rerun_state_machine
from megatron.core.transformer.spec_utils import import_module
from megatron.training import get_args, get_tokenizer
from megatron.training.arguments import core_transformer_config_from_args
from megatron.training.utils import get_blend_and_blend_per_split, is_first_or_last_pipeline_stage, print_rank_0

from megatron_sparse24.arguments import sparse24_config_from_args
from megatron_sparse24.specs import get_gpt_block_sparse24_spec
from megatron_sparse24.training.megatron_lm import SparsityLog, add_args, backend_line, preflight, run


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None, pg_collection=None):
    """GPTModel for this pipeline stage with the 2:4 layer spec (``--no-sparse24``: megatron's dense MLP
    in the same layer, the A/B baseline; ``--spec MODULE NAME``: any spec, as in Megatron-LM)."""
    args = get_args()
    preflight(args, vp_stage)
    print_rank_0(f"building {'sparse 2:4' if args.sparse24 else 'dense'} GPT model ...")
    if config is None:
        config = core_transformer_config_from_args(args)
    if args.spec is not None:
        spec = import_module(args.spec)
    else:
        sparse24 = sparse24_config_from_args(args) if args.sparse24 else None
        if sparse24 is not None and pre_process:
            print_rank_0(f"> 2:4 FFN backend: {backend_line(args, sparse24.backend)}")
        spec = get_gpt_block_sparse24_spec(config, vp_stage, sparse24, mlp="sparse24" if args.sparse24 else "dense",
                                           use_te=args.transformer_impl == "transformer_engine",
                                           qk_layernorm=args.qk_layernorm)
    extra = {"pg_collection": pg_collection} if pg_collection is not None else {}
    return GPTModel(
        config=config, transformer_layer_spec=spec, vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings, pre_process=pre_process, post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy, parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base, vp_stage=vp_stage, **extra,
    )


def loss_func(loss_mask, output_tensor):
    """Summed token losses, the token count, and the report Megatron-LM averages over ranks; NaN/Inf
    stop the run (``--check-for-nan-in-loss-and-grad``, on by default)."""
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    if get_args().check_for_nan_in_loss_and_grad:
        for reject, what in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
            get_rerun_state_machine().validate_result(result=loss, rejection_func=reject, tolerance=0.0, fatal=True,
                                                      message=f"found {what} in local forward loss calculation")
    return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}


def forward_step(data_iterator, model, sparsity_log: SparsityLog):
    """One micro-batch through this stage. Every tensor-parallel rank reads the same samples itself
    (the sampler splits by data-parallel rank only), so no broadcast is needed; middle pipeline stages
    read nothing."""
    sparsity_log.maybe_log(model)
    batch = dict.fromkeys(("tokens", "position_ids", "attention_mask", "labels", "loss_mask"))
    if is_first_or_last_pipeline_stage(getattr(model, "vp_stage", None)):
        batch.update({k: v.cuda(non_blocking=True) for k, v in next(data_iterator).items()})
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"])
    return output, partial(loss_func, batch["loss_mask"])


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """megatron-core's GPTDataset on --data-path (tools/preprocess_data.py), or MockGPTDataset."""
    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend, blend_per_split=blend_per_split,
        split=args.split, path_to_cache=args.data_cache_path, tokenizer=get_tokenizer(),
        reset_position_ids=args.reset_position_ids, reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss, create_attention_mask=args.create_attention_mask_in_dataloader,
        mid_level_dataset_surplus=args.mid_level_dataset_surplus,
    )
    dataset_type = MockGPTDataset if args.mock_data else GPTDataset
    print_rank_0("> building train, validation, and test datasets for GPT ...")
    return BlendedMegatronDatasetBuilder(
        dataset_type, train_val_test_num_samples,
        lambda: is_first_or_last_pipeline_stage(vp_stage), config,
    ).build()


train_valid_test_datasets_provider.is_distributed = True  # every rank that needs data builds it

if __name__ == "__main__":
    run(train_valid_test_datasets_provider, model_provider, partial(forward_step, sparsity_log=SparsityLog()),
        extra_args_provider=add_args)
    parallel_state.destroy_model_parallel()
