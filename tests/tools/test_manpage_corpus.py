"""tools/manpage_corpus.py: troff markup to text, aliases and duplicates dropped, a reproducible order."""

import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

import manpage_corpus  # noqa: E402

PAGE = r""".\" a comment
.TH LS 1 "2024" "coreutils"
.SH NAME
ls \- list directory contents
.SH DESCRIPTION
List information about the \fBFILE\fRs (the current directory by default).
.TP 2m
\fB\-a\fR, \fB\-\-all\fR
do not ignore entries starting with \(dq.\(dq
.PP
Exit status is 0 if OK\&.
"""


def test_troff_to_text_keeps_the_words_and_drops_the_markup():
    text = manpage_corpus.troff_to_text(PAGE)
    assert text.startswith("NAME\nls - list directory contents\nDESCRIPTION")
    assert "List information about the FILEs (the current directory by default)." in text
    assert '-a, --all\ndo not ignore entries starting with "."' in text and "Exit status is 0 if OK." in text
    assert "\\" not in text and "2m" not in text and "comment" not in text and ".TH" not in text


def test_corpus_drops_aliases_duplicates_and_is_reproducible(tmp_path, monkeypatch):
    man = tmp_path / "man1"
    man.mkdir()
    for name, body in (("ls.1.gz", PAGE), ("dir.1.gz", PAGE), ("alias.1.gz", ".so man1/ls.1\n"),
                       ("cat.1.gz", PAGE.replace("ls", "cat") + "\n" + "More words. " * 60)):
        with gzip.open(man / name, "wt") as f:
            f.write(body + "Padding sentence. " * 40)
    monkeypatch.setattr(manpage_corpus, "SOURCES", {"man": str(man / "*")})
    out = tmp_path / "c.jsonl"
    assert manpage_corpus.main(["--output", str(out), "--sources", "man", "--min-chars", "10"])[0] == 2
    first = out.read_text()
    docs = [json.loads(line) for line in first.splitlines()]
    assert sorted(Path(d["source"]).name for d in docs) in (["cat.1.gz", "dir.1.gz"], ["cat.1.gz", "ls.1.gz"])
    manpage_corpus.main(["--output", str(out), "--sources", "man", "--min-chars", "10"])
    assert out.read_text() == first
    assert json.loads((tmp_path / "c.jsonl.manifest.json").read_text())["per_source"] == {"man": 2}
