"""The King James Bible extracts favor ships (favor/data/kjv_*.txt.gz). Default text for calibration, distillation and fidelity: King James Bible passages
(public domain), from Debian's ``bible-kjv-text``, three consecutive verses per line.

``train``: Genesis, Proverbs, Matthew. ``heldout``: Psalms, Luke, Acts (no overlap).
"""

from __future__ import annotations

import gzip
from importlib import resources
from pathlib import Path

__all__ = ["load_text", "SPLITS"]

SPLITS = ("train", "heldout")


def load_text(split: str | Path) -> list[str]:
    """Lines of the built-in split ("train" / "heldout") or of a text file (one passage per
    non-empty line; ``.gz`` is decompressed)."""
    if isinstance(split, str) and split in SPLITS:
        data = resources.files(__package__).joinpath(f"kjv_{split}.txt.gz").read_bytes()
        text = gzip.decompress(data).decode("utf-8")
    else:
        path = Path(split)
        if not path.is_file():
            raise FileNotFoundError(f"text must be one of {SPLITS} or a file, got {str(split)!r}")
        raw = path.read_bytes()
        raw = gzip.decompress(raw) if path.suffix == ".gz" else raw
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"text file {str(split)!r} is not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}); convert it, "
                f"e.g. `iconv -f latin1 -t utf-8 FILE > FILE.utf8`"
            ) from None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"no text in {split!r}")
    return lines
