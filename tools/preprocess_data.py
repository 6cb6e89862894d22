"""Turn text into Megatron indexed data (.bin/.idx) with megatron.core's IndexedDatasetBuilder.

    python tools/preprocess_data.py --input docs/*.txt --output-prefix data/docs \
        --tokenizer-type ByteLevelTokenizer --append-eod
    python tools/preprocess_data.py --input corpus.jsonl --json-keys text --output-prefix data/corpus \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model /path/to/local/tokenizer --append-eod

Inputs: ``.jsonl`` / ``.json`` files (one JSON object per line; the ``--json-keys`` fields are
documents) or plain-text files (one document per file, or per blank-line-separated paragraph with
``--text-unit paragraph``, or per line with ``--text-unit line``). Tokenizers work offline:
bytes (``ByteLevelTokenizer``) or a HuggingFace tokenizer from a local directory. Output:
``<prefix>_<key>_document.bin/.idx``, Megatron-LM's naming; pass ``<prefix>_<key>_document`` to
``pretrain_gpt_sparse.py --data-path`` with the same ``--tokenizer-type``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # noqa: E402

from megatron_sparse24.training.data import build_tokenizer  # noqa: E402


def iter_documents(paths, json_keys, text_unit):
    """Yields (key, text) for every document of every input file, in order."""
    for path in paths:
        if path.endswith((".jsonl", ".json")):
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        obj = json.loads(line)
                        for key in json_keys:
                            if obj.get(key):
                                yield key, obj[key]
            continue
        text = Path(path).read_text(encoding="utf-8", errors="replace")
        if text_unit == "file":
            pieces = [text]
        elif text_unit == "paragraph":
            pieces = [p for p in text.split("\n\n")]
        else:
            pieces = text.splitlines()
        for piece in pieces:
            if piece.strip():
                yield "text", piece


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", nargs="+", required=True, help="files or glob patterns")
    ap.add_argument("--output-prefix", required=True)
    ap.add_argument("--json-keys", nargs="+", default=["text"])
    ap.add_argument("--text-unit", choices=["file", "paragraph", "line"], default="file",
                    help="what one document is in a plain-text file")
    ap.add_argument("--tokenizer-type", choices=["ByteLevelTokenizer", "HuggingFaceTokenizer"], required=True)
    ap.add_argument("--tokenizer-model", default=None, help="local HuggingFace tokenizer directory")
    ap.add_argument("--append-eod", action="store_true", help="end every document with the EOD token")
    args = ap.parse_args(argv)

    paths = sorted({p for pattern in args.input for p in (glob.glob(pattern, recursive=True) or [pattern])})
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"no such input file(s): {missing[:5]}")
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    dtype = np.uint16 if tokenizer.vocab_size < 65500 else np.int32
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    keys = ["text"] if not any(p.endswith((".jsonl", ".json")) for p in paths) else args.json_keys
    builders = {k: IndexedDatasetBuilder(f"{args.output_prefix}_{k}_document.bin", dtype=dtype) for k in keys}
    n_docs, n_tokens = 0, 0
    for key, text in iter_documents(paths, args.json_keys, args.text_unit):
        ids = tokenizer.tokenize(text)
        if args.append_eod:
            ids.append(tokenizer.eod)
        if not ids:
            continue
        builders[key].add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
        n_docs += 1
        n_tokens += len(ids)
    for key, builder in builders.items():
        builder.finalize(f"{args.output_prefix}_{key}_document.idx")
    print(f"{n_docs} documents, {n_tokens} tokens from {len(paths)} files -> "
          + ", ".join(f"{args.output_prefix}_{k}_document" for k in keys))
    return n_docs, n_tokens


if __name__ == "__main__":
    main()
