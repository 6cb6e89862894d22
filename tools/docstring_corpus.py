"""Collect real English text that needs no network: the docstrings of installed Python packages.

    python tools/docstring_corpus.py --packages stdlib numpy torch --output data/docstrings.jsonl
    python tools/preprocess_data.py --input data/docstrings.jsonl --output-prefix data/docstrings \
        --tokenizer-type ByteLevelTokenizer --append-eod

One JSON line per documented object ({"text": ..., "source": "module.qualname"}), in sorted module
and attribute order, de-duplicated, so the same package versions give the same corpus on any
machine (the GPU machines have no network, but have these packages). Written by the packages'
authors, not by us. A manifest of package versions is written next to the output.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil
import sys
import warnings
from pathlib import Path

SKIP_PARTS = ("test", "tests", "_test", "testing", "__main__", "idlelib", "tkinter", "turtledemo", "lib2to3",
              "antigravity", "this", "_distributor_init", "conftest")


def _module_names(package: str) -> list[str]:
    if package == "stdlib":
        names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_"))
        return [n for n in names if n not in SKIP_PARTS]
    root = importlib.import_module(package)
    names = [package]
    # onerror: a subpackage that fails to import (any exception) is skipped, not fatal
    for info in pkgutil.walk_packages(getattr(root, "__path__", []), prefix=package + ".", onerror=lambda name: None):
        parts = info.name.split(".")
        if any(p in SKIP_PARTS or p.startswith("_") for p in parts[1:]):
            continue
        names.append(info.name)
    return sorted(set(names))


def _docs(module) -> list[tuple[str, str]]:
    out = []
    if isinstance(module.__doc__, str):
        out.append((module.__name__, module.__doc__))
    for name in sorted(vars(module)):
        if name.startswith("_"):
            continue
        obj = getattr(module, name, None)
        if not (inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__:
            continue  # documented where it is defined
        if isinstance(obj.__doc__, str):
            out.append((f"{module.__name__}.{name}", obj.__doc__))
        if inspect.isclass(obj):
            for attr in sorted(vars(obj)):
                if attr.startswith("_"):
                    continue
                member = vars(obj)[attr]
                doc = getattr(member, "__doc__", None)
                if isinstance(doc, str) and (inspect.isfunction(member) or isinstance(member, (property, classmethod, staticmethod))):
                    out.append((f"{module.__name__}.{name}.{attr}", doc))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--packages", nargs="+", default=["stdlib", "numpy", "torch"])
    ap.add_argument("--output", required=True)
    ap.add_argument("--min-chars", type=int, default=200, help="skip docstrings shorter than this")
    args = ap.parse_args(argv)
    seen, n_docs, n_chars, versions = set(), 0, 0, {"python": sys.version.split()[0]}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for package in args.packages:
            if package != "stdlib":
                versions[package] = getattr(importlib.import_module(package), "__version__", "?")
            for name in _module_names(package):
                try:
                    module = importlib.import_module(name)
                except BaseException:  # optional dependencies, platform modules: skip
                    continue
                for source, doc in _docs(module):
                    text = inspect.cleandoc(doc)
                    if len(text) < args.min_chars or text in seen:
                        continue
                    seen.add(text)
                    f.write(json.dumps({"text": text, "source": source}) + "\n")
                    n_docs += 1
                    n_chars += len(text)
    Path(args.output + ".manifest.json").write_text(json.dumps(
        {"packages": versions, "documents": n_docs, "characters": n_chars}, indent=1))
    print(f"{n_docs} docstrings, {n_chars / 1e6:.1f} M characters -> {args.output}")
    return n_docs, n_chars


if __name__ == "__main__":
    main()
