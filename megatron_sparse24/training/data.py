"""megatron-core's tokenizers, offline, and the GPT data pipeline on megatron-core's datasets.

Datasets come from ``BlendedMegatronDatasetBuilder`` with ``GPTDataset`` (indexed data made by
``tools/preprocess_data.py``) or ``MockGPTDataset`` (``--mock-data``). The sampler is Megatron-LM's
pretraining order: global batches of consecutive sample indices, each data-parallel rank taking its
slice of every micro-batch; it starts at ``consumed_samples``, so a resumed run reads exactly the
samples an uninterrupted run would have read.
"""

from __future__ import annotations

import importlib.util
from typing import Iterator

import torch

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.utils import get_blend_from_list

__all__ = ["build_tokenizer", "build_datasets", "data_iterator"]


def build_tokenizer(tokenizer_type: str, tokenizer_model=None, vocab_size=None):
    """megatron-core's tokenizer of ``--tokenizer-type``, offline:

    - ``ByteLevelTokenizer``: UTF-8 bytes as tokens 0..255, end-of-document 256, padding 257
      (vocabulary 258), no files;
    - ``HuggingFaceTokenizer``: a HuggingFace tokenizer from the local directory ``tokenizer_model``;
    - ``NullTokenizer``: ids as they are, ``vocab_size`` of them (for ``--mock-data``)."""
    from megatron.core.tokenizers import MegatronTokenizer

    if tokenizer_type == "ByteLevelTokenizer":
        # special tokens take the ids below the vocabulary's end, last first: <eod> 256, <pad> 257
        return MegatronTokenizer.from_pretrained(metadata_path={"library": "byte-level"}, vocab_size=256,
                                                 special_tokens=["<pad>", "<eod>"], _eos_id=256, _pad_id=257)
    if tokenizer_type == "HuggingFaceTokenizer":
        if not tokenizer_model:
            raise ValueError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model (a local directory)")
        if importlib.util.find_spec("transformers") is None:  # pragma: no cover - optional dependency
            raise ValueError("--tokenizer-type HuggingFaceTokenizer needs `pip install transformers`")
        tokenizer = MegatronTokenizer.from_pretrained(tokenizer_path=str(tokenizer_model),
                                                      metadata_path={"library": "huggingface"})
        if tokenizer.eod is None:
            raise ValueError(f"tokenizer at {tokenizer_model} has no EOS token to use as end-of-document")
        return tokenizer
    if tokenizer_type == "NullTokenizer":
        from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

        return NullTokenizer(vocab_size)
    raise ValueError(f"unknown --tokenizer-type {tokenizer_type}")


def build_datasets(args, tokenizer):
    """(train, valid, test) datasets sized for the run, built through megatron-core's builder."""
    gbs = args.global_batch_size
    n_evals = args.train_iters // args.eval_interval + 1 if args.eval_interval else 1
    sizes = [args.train_iters * gbs, n_evals * args.eval_iters * gbs, args.eval_iters * gbs]
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=None if args.mock_data else get_blend_from_list(args.data_path),
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.attention_backend == "local",
    )
    cls = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()


def _batches(dataset, consumed: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> Iterator[list[int]]:
    step = micro_batch_size * dp_size
    start = consumed
    while start + step <= len(dataset):
        yield list(range(start + dp_rank * micro_batch_size, start + (dp_rank + 1) * micro_batch_size))
        start += step


def data_iterator(dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                  num_workers: int = 0):
    """Iterator over this data-parallel rank's micro-batches (dicts of stacked tensors), or None."""
    if dataset is None:
        return None
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=_batches(dataset, consumed_samples, micro_batch_size, dp_rank, dp_size),
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        # its own generator: creating an iterator must not draw from the global RNG (dropout's),
        # or a resumed run would not continue like an uninterrupted one
        generator=torch.Generator().manual_seed(0),
    )
    return iter(loader)
