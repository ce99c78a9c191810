"""Read protein sequences out of NCBI BLAST v4 protein databases (.pin/.psq/.phr), pure numpy.

Adapted from the team's ``shared/data/blastdb_proteins.py``; used for Debian's
``metastudent-data`` package (UniProtKB/Swiss-Prot, January 2014).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = ["read_blastdb", "blastdb_size"]

# NCBIstdaa alphabet of .psq files (index = byte value)
NCBISTDAA = "-ABCDEFGHIKLMNPQRSTVWXYZU*OJ"
_LUT = np.frombuffer(NCBISTDAA.encode(), dtype=np.uint8)
_ACC = re.compile(rb"\x1a.([A-Z0-9]+(?:-\d+)?)\|([^\x00]*)", re.S)


def _read_index(pin_path: Path) -> tuple[int, int, int, np.ndarray, np.ndarray]:
    b = pin_path.read_bytes()
    version, seqtype = struct.unpack(">ii", b[0:8])
    if version != 4 or seqtype != 1:
        raise ValueError(f"{pin_path}: expected a BLAST v4 protein index, got version {version}, type {seqtype}")
    o = 8
    (tl,) = struct.unpack(">i", b[o : o + 4])
    o += 4 + tl  # title
    (dl,) = struct.unpack(">i", b[o : o + 4])
    o += 4 + dl  # date
    (n,) = struct.unpack(">i", b[o : o + 4])
    o += 4
    (total,) = struct.unpack("<q", b[o : o + 8])  # little-endian, unlike the rest
    o += 8
    (maxlen,) = struct.unpack(">i", b[o : o + 4])
    o += 4
    hoff = np.frombuffer(b[o : o + 4 * (n + 1)], dtype=">i4").astype(np.int64)
    o += 4 * (n + 1)
    soff = np.frombuffer(b[o : o + 4 * (n + 1)], dtype=">i4").astype(np.int64)
    return n, total, maxlen, hoff, soff


def blastdb_size(base: str | Path) -> tuple[int, int]:
    """(number of sequences, total residues) of the database ``base`` (path without suffix)."""
    n, total, _, _, _ = _read_index(Path(f"{base}.pin"))
    return n, total


def read_blastdb(base: str | Path) -> Iterator[tuple[str, str]]:
    """Yield (accession, sequence) for every entry of the BLAST database ``base``."""
    n, _, _, hoff, soff = _read_index(Path(f"{base}.pin"))
    psq = np.fromfile(f"{base}.psq", dtype=np.uint8)
    phr = Path(f"{base}.phr").read_bytes()
    for i in range(n):
        seq = _LUT[psq[soff[i] : soff[i + 1] - 1]].tobytes().decode()  # last byte is a 0 separator
        m = _ACC.search(phr[hoff[i] : hoff[i + 1]])
        acc = m.group(1).decode() if m else str(i)
        yield acc, seq
