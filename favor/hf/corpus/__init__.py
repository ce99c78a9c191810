"""Default text for calibration, distillation and fidelity: King James Bible passages
(public domain), from Debian's ``bible-kjv-text``, three consecutive verses per line.

``train``: Genesis, Proverbs, Matthew. ``heldout``: Psalms, Luke, Acts (no overlap).
"""

from __future__ import annotations

import gzip
import random
import re
from importlib import resources
from pathlib import Path

__all__ = ["load_text", "resegment", "SPLITS"]

SPLITS = ("train", "heldout")


def load_text(split: str | Path) -> list[str]:
    """Lines of the built-in split ("train" / "heldout") or of a text file (one passage per
    non-empty line; ``.gz`` is decompressed)."""
    if isinstance(split, str) and split in SPLITS:
        data = resources.files(__name__).joinpath(f"kjv_{split}.txt.gz").read_bytes()
        text = gzip.decompress(data).decode("utf-8")
    else:
        path = Path(split)
        if not path.is_file():
            raise FileNotFoundError(f"text must be one of {SPLITS} or a file, got {str(split)!r}")
        raw = path.read_bytes()
        text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"no text in {split!r}")
    return lines


_SENTENCE_END = re.compile(r"(?<=[.;:?!])\s+")


def resegment(lines: list[str], *, seed: int, min_sentences: int = 2, max_sentences: int = 6) -> list[str]:
    """The same text cut into different passages: ``lines`` joined, split after sentence and
    clause ends (. ; : ? !), regrouped into runs of ``min_sentences``..``max_sentences``
    consecutive pieces drawn with ``seed``. Distillation uses several seeds so that the
    student sees each stretch of text in many contexts and at many positions."""
    if not 1 <= min_sentences <= max_sentences:
        raise ValueError(f"need 1 <= min_sentences <= max_sentences, got {min_sentences}, {max_sentences}")
    pieces = [p for p in _SENTENCE_END.split(" ".join(lines)) if p]
    rng = random.Random(seed)
    out, i = [], rng.randrange(min_sentences)  # a seeded start, so no two seeds share every boundary
    if i:
        out.append(" ".join(pieces[:i]))
    while i < len(pieces):
        n = rng.randint(min_sentences, max_sentences)
        out.append(" ".join(pieces[i : i + n]))
        i += n
    return out
