"""Held-out news text for fidelity measurements, from a registry package: the Lee corpus
(350 short Australian news articles; Lee, Pincombe and Welsh, 2005) that gensim's wheel
carries as test data. Nothing is installed: the wheel is downloaded with pip (or given) and
the two corpus files are read out of it, Latin-1 converted to UTF-8, one article per line.
favor does not ship this text; it is measurement data, as a reviewer's own held-out text would be.

    python -m benchmarks.news_text --out runs/news.txt [--wheel gensim-4.3.3-....whl]
    favor distill --model minilm --heldout runs/news.txt ...
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "gensim==4.3.3"
FILES = ("gensim/test/test_data/lee_background.cor", "gensim/test/test_data/lee.cor")


def news_lines(wheel: str | Path) -> list[str]:
    """The Lee corpus's articles (background set, then the 50-article test set), one per line."""
    with zipfile.ZipFile(wheel) as z:
        texts = [z.read(name).decode("latin-1") for name in FILES]
    # split each file on its own: the background set has no final newline, and joined its last
    # article would run into the test set's first
    return [ln.strip() for text in texts for ln in text.splitlines() if ln.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the UTF-8 text file to write")
    p.add_argument("--wheel", help=f"a downloaded {PACKAGE} wheel (default: pip download it)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        wheel = a.wheel
        if wheel is None:
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", tmp]
            subprocess.run(cmd, check=True)
            wheel = next(Path(tmp).glob("gensim-*.whl"))
        lines = news_lines(wheel)
    Path(a.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{a.out}: {len(lines)} articles, {sum(map(len, lines)):,} characters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
