"""tools/docstring_corpus.py: deterministic, de-duplicated real-text corpus from installed packages."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import docstring_corpus  # noqa: E402


def test_corpus_is_deterministic_and_clean(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    n, chars = docstring_corpus.main(["--packages", "json", "email", "--output", str(a), "--min-chars", "100"])
    docstring_corpus.main(["--packages", "json", "email", "--output", str(b), "--min-chars", "100"])
    assert a.read_text() == b.read_text() and n > 20 and chars > 10_000
    docs = [json.loads(line) for line in a.read_text().splitlines()]
    texts = [d["text"] for d in docs]
    assert len(set(texts)) == len(texts) and all(len(t) >= 100 for t in texts)
    assert all(d["source"].startswith(("json", "email")) for d in docs)
    manifest = json.loads((tmp_path / "a.jsonl.manifest.json").read_text())
    assert manifest["documents"] == n and "python" in manifest["packages"]
