"""Tokenizers that work offline, and the GPT data pipeline on megatron-core's datasets.

Datasets come from ``BlendedMegatronDatasetBuilder`` with ``GPTDataset`` (indexed data made by
``tools/preprocess_data.py``) or ``MockGPTDataset`` (``--mock-data``). The sampler is Megatron-LM's
pretraining order: global batches of consecutive sample indices, each data-parallel rank taking its
slice of every micro-batch; it starts at ``consumed_samples``, so a resumed run reads exactly the
samples an uninterrupted run would have read.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterator

import torch

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.utils import get_blend_from_list

__all__ = ["ByteTokenizer", "HFTokenizer", "build_tokenizer", "build_datasets", "data_iterator"]


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, end-of-document 256, padding 257 (vocabulary 258). No files."""

    eod = 256
    pad = 257
    vocab_size = 258

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict({"class": "megatron_sparse24.ByteTokenizer"})


class HFTokenizer:
    """A HuggingFace tokenizer loaded from a local directory (``local_files_only``: no network)."""

    def __init__(self, path: str):
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:  # pragma: no cover - optional dependency
            raise ValueError("--tokenizer-type HuggingFaceTokenizer needs `pip install transformers`") from exc
        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.path = path
        if self._tok.eos_token_id is None:
            raise ValueError(f"tokenizer at {path} has no EOS token to use as end-of-document")
        self.eod = self._tok.eos_token_id
        self.vocab_size = len(self._tok)
        if self._tok.pad_token_id is not None and self._tok.pad_token_id != self.eod:
            self.pad = self._tok.pad_token_id

    def tokenize(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=False)["input_ids"]

    def detokenize(self, ids) -> str:
        return self._tok.decode(list(ids))

    @property
    def unique_identifiers(self) -> OrderedDict:
        return OrderedDict({"class": "megatron_sparse24.HFTokenizer", "path": self.path})


def build_tokenizer(tokenizer_type: str, tokenizer_model=None, vocab_size=None):
    if tokenizer_type == "ByteLevelTokenizer":
        return ByteTokenizer()
    if tokenizer_type == "HuggingFaceTokenizer":
        return HFTokenizer(tokenizer_model)
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
