"""A local HuggingFace tokenizer through the data tool and the trainer (skipped without
`transformers` and `tokenizers`; the GPU machines have both, no network needed)."""

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import preprocess_data  # noqa: E402
from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: E402

from megatron_sparse24.training.data import build_tokenizer  # noqa: E402

DOCS = ["The quick brown fox jumps over the lazy dog. " * 3, "Return the sum of a and b, elementwise.",
        "Sparse tensor cores multiply 2:4 matrices twice as fast."] * 20


def _make_tokenizer(path: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(DOCS, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(path))


def test_hf_tokenizer_data_and_training(tmp_path):
    _make_tokenizer(tmp_path / "tok")
    from transformers import AutoTokenizer

    tok = build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "tok"))  # megatron-core's, from a local directory
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert tok.eod == hf.convert_tokens_to_ids("<|endoftext|>") and tok.vocab_size == len(hf)
    assert tok.tokenize(DOCS[1]) == hf(DOCS[1], add_special_tokens=False)["input_ids"]
    with open(tmp_path / "c.jsonl", "w") as f:
        for d in DOCS:
            f.write(json.dumps({"text": d}) + "\n")
    n_docs, _ = preprocess_data.main(["--input", str(tmp_path / "c.jsonl"), "--output-prefix", str(tmp_path / "hf"),
                                      "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                                      str(tmp_path / "tok"), "--append-eod"])
    ds = IndexedDataset(str(tmp_path / "hf_text_document"))
    assert n_docs == len(DOCS) == len(ds)
    for i in (0, 1, 2):
        ids = ds[i].tolist()
        assert ids[-1] == tok.eod and tok.detokenize(ids[:-1]) == DOCS[i]
        assert len(ids) < len(DOCS[i].encode())  # BPE merges: fewer tokens than bytes

    from tests.training.test_loop import MODEL, train

    model = [a for a in MODEL if a not in ("--mock-data",)]
    i = model.index("--vocab-size")
    del model[i:i + 2]
    backend = ["--distributed-backend", "nccl"] if torch.cuda.is_available() else []
    run = train(tmp_path, "hf", "--data-path", tmp_path / "hf_text_document",
                "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tmp_path / "tok",
                "--split", "90,10,0", "--train-iters", 3, *backend, model_args=model)
    assert sorted(run["train"]) == [1, 2, 3]
    assert all(r["loss"] > 0 for r in run["train"].values())
