"""FASTA reading and writing (plain or gzip)."""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterable, Iterator
from pathlib import Path

__all__ = ["read_fasta", "write_fasta"]


def _open(path: Path, mode: str):
    return gzip.open(path, mode + "t", encoding="ascii") if path.suffix == ".gz" else open(path, mode, encoding="ascii")


def read_fasta(path: str | Path) -> Iterator[tuple[str, str]]:
    """Yield (header without '>', sequence) from a FASTA file; ``.gz`` is decompressed."""
    path = Path(path)
    header, parts = None, []
    with _open(path, "r") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            if line.startswith(">"):
                if header is not None:
                    yield header, "".join(parts)
                header, parts = line[1:], []
            elif header is None:
                raise ValueError(f"{path}: sequence data before the first '>' header")
            else:
                parts.append(line)
    if header is not None:
        yield header, "".join(parts)


def write_fasta(path: str | Path, records: Iterable[tuple[str, str]], *, width: int = 60) -> int:
    """Write (header, sequence) records; returns how many were written. gzip output for ``.gz``
    is written with mtime 0 so the same records give the same bytes."""
    path = Path(path)
    n = 0
    if path.suffix == ".gz":
        raw = open(path, "wb")
        gz = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9, filename="")
        f = io.TextIOWrapper(gz, encoding="ascii")
    else:
        raw, f = None, open(path, "w", encoding="ascii")
    try:
        for header, seq in records:
            f.write(f">{header}\n")
            for i in range(0, len(seq), width):
                f.write(seq[i : i + width] + "\n")
            n += 1
    finally:
        f.close()
        if raw is not None:
            raw.close()
    return n
