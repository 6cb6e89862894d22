"""Collect real technical documentation that needs no network: the machine's manual pages and help files.

    python tools/manpage_corpus.py --output data/manpages.jsonl
    python tools/preprocess_data.py --input data/manpages.jsonl --output-prefix data/manpages \
        --tokenizer-type ByteLevelTokenizer --append-eod

One JSON line per document ({"text": ..., "source": path}): every English manual page under
/usr/share/man/man[1-8] (troff markup stripped to its text), Vim's help files and CMake's reStructuredText
help, when installed. Pages that only include another page, or repeat one word for word, are dropped, and so are the
thousands of generated near-identical pages of the Google Cloud CLI.
Documents are shuffled with a fixed seed (so Megatron's train/valid/test split by document is not a
split by section), and ``--max-chars`` keeps the first ones up to that size. A manifest (sources,
counts, SHA-256 of the output) is written next to the output. Written by the tools' authors, not by us.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import json
import random
import re
from pathlib import Path

SOURCES = {
    "man": "/usr/share/man/man[1-8]/*",
    "vim": "/usr/share/vim/vim*/doc/*.txt",
    "cmake": "/usr/share/cmake-*/Help/**/*.rst",
}
# generated pages of one tool, thousands of near-identical templates: left out
SKIP_PAGES = ("gcloud", "bq.", "gsutil")
# troff requests whose arguments are text (section headings, fonts, tagged paragraphs)
_TEXT_REQUESTS = {"SH", "SS", "B", "I", "BR", "RB", "IR", "RI", "BI", "IB", "SM", "SB", "IP", "UR", "MT", "Nm",
                  "Nd", "Ar", "Fl", "Op", "Xr", "Dt", "Sh", "Ss", "Pa", "Em", "Sy", "Va", "Fn", "Dv", "Ev", "Cm"}
_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),      # font changes
    (re.compile(r"\\s[+-]?\d+"), ""),                  # size changes
    (re.compile(r"\\\*(\[[^\]]*\]|\(..|.)"), ""),      # strings
    (re.compile(r"\\\((em|en)"), "-"), (re.compile(r"\\\((lq|rq|dq)"), '"'), (re.compile(r"\\\((oq|cq|aq)"), "'"),
    (re.compile(r"\\\(bu"), "*"), (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""),
    (re.compile(r"\\[-]"), "-"), (re.compile(r"\\e"), "\\\\"), (re.compile(r"\\[&|^%:,/]"), ""),
    (re.compile(r"\\ "), " "), (re.compile(r"\\c$"), ""), (re.compile(r"\\[nwhvkoxzYNRdurDlLbCZ]('[^']*'|\[[^\]]*\]|\(..|.)?"), ""),
]


def troff_to_text(source: str) -> str:
    """The running text of a troff manual page (man or mdoc macros): requests dropped, the text
    arguments of heading/font/tag requests kept, escapes resolved or removed."""
    lines = []
    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\}', "'")) or line.strip() in (".", ""):
            if line.strip() in (".", "") and lines and lines[-1] != "":
                lines.append("")
            continue
        if line.startswith("."):
            request, _, rest = line[1:].strip().partition(" ")
            if request not in _TEXT_REQUESTS or not rest:
                if request in ("PP", "LP", "P", "Pp", "sp", "br"):
                    lines.append("")
                continue
            line = re.sub(r"\s+\d+[mni]?$", "", rest).replace('"', "")  # .IP tag [indent]
        for pattern, repl in _ESCAPES:
            line = pattern.sub(repl, line)
        lines.append(line.strip())
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _read(path: str) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read()


def documents(sources=("man", "vim", "cmake")):
    """Yields (source name, path, text) in sorted path order."""
    for name in sources:
        for path in sorted(glob.glob(SOURCES[name], recursive=True)):
            if not Path(path).is_file() or Path(path).name.startswith(SKIP_PAGES):
                continue
            raw = _read(path)
            if name == "man":
                if raw.lstrip().startswith(".so "):  # an alias of another page
                    continue
                yield name, path, troff_to_text(raw)
            else:
                yield name, path, raw.strip()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output", required=True)
    ap.add_argument("--sources", nargs="+", default=["man", "vim", "cmake"], choices=sorted(SOURCES))
    ap.add_argument("--min-chars", type=int, default=500, help="skip documents shorter than this")
    ap.add_argument("--max-chars", type=int, default=None, help="keep shuffled documents up to this many characters")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)
    seen, docs = set(), []
    for name, path, text in documents(args.sources):
        digest = hashlib.sha256(text.encode()).digest()
        if len(text) < args.min_chars or digest in seen:
            continue
        seen.add(digest)
        docs.append({"text": text, "source": path, "kind": name})
    random.Random(args.seed).shuffle(docs)
    if args.max_chars is not None:
        total, kept = 0, []
        for doc in docs:
            if total + len(doc["text"]) > args.max_chars:
                break
            kept.append(doc)
            total += len(doc["text"])
        docs = kept
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc) + "\n")
    n_chars = sum(len(d["text"]) for d in docs)
    sha = hashlib.sha256(Path(args.output).read_bytes()).hexdigest()
    counts = {name: sum(d["kind"] == name for d in docs) for name in args.sources}
    Path(args.output + ".manifest.json").write_text(json.dumps(
        {"documents": len(docs), "characters": n_chars, "per_source": counts, "sha256": sha, "seed": args.seed},
        indent=1))
    print(f"{len(docs)} documents, {n_chars / 1e6:.1f} M characters -> {args.output}")
    return len(docs), n_chars


if __name__ == "__main__":
    main()
