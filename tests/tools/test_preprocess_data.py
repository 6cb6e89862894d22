"""tools/preprocess_data.py: text -> Megatron indexed data -> the same tokens back."""

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import preprocess_data  # noqa: E402
from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: E402

from megatron_sparse24.training.data import build_tokenizer  # noqa: E402


def test_text_and_jsonl_round_trip(tmp_path):
    docs = ["Hello, world.", "Ünïcødé — ok ✓", "third\ndocument with\nlines"]
    for i, d in enumerate(docs):
        (tmp_path / f"d{i}.txt").write_text(d, encoding="utf-8")
    n_docs, n_tokens = preprocess_data.main(["--input", str(tmp_path / "d*.txt"), "--output-prefix",
                                             str(tmp_path / "out" / "txt"), "--tokenizer-type",
                                             "ByteLevelTokenizer", "--append-eod"])
    tok = build_tokenizer("ByteLevelTokenizer")  # megatron-core's, with the ids data was always written with:
    assert (tok.eod, tok.pad, tok.vocab_size) == (256, 257, 258)  # bytes, end-of-document 256, padding 257
    expect = [list(d.encode("utf-8")) + [256] for d in docs]
    assert [tok.tokenize(d) for d in docs] == [e[:-1] for e in expect]
    assert n_docs == 3 and n_tokens == sum(len(e) for e in expect)
    ds = IndexedDataset(str(tmp_path / "out" / "txt_text_document"))
    assert len(ds) == 3
    for i, e in enumerate(expect):
        assert ds[i].tolist() == e
        assert tok.detokenize(ds[i]) == docs[i]
    assert ds[0].dtype == np.uint16

    with open(tmp_path / "c.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "meta": 1}) + "\n")
    preprocess_data.main(["--input", str(tmp_path / "c.jsonl"), "--output-prefix", str(tmp_path / "j"),
                          "--tokenizer-type", "ByteLevelTokenizer"])
    ds = IndexedDataset(str(tmp_path / "j_text_document"))
    assert [tok.detokenize(ds[i]) for i in range(len(ds))] == docs


def test_paragraph_and_line_units(tmp_path):
    (tmp_path / "a.txt").write_text("p1 line1\np1 line2\n\np2\n\n\np3", encoding="utf-8")
    n, _ = preprocess_data.main(["--input", str(tmp_path / "a.txt"), "--output-prefix", str(tmp_path / "p"),
                                 "--tokenizer-type", "ByteLevelTokenizer", "--text-unit", "paragraph"])
    assert n == 3
    n, _ = preprocess_data.main(["--input", str(tmp_path / "a.txt"), "--output-prefix", str(tmp_path / "l"),
                                 "--tokenizer-type", "ByteLevelTokenizer", "--text-unit", "line"])
    assert n == 4
