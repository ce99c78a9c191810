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

__all__ = ["read_blastdb", "blastdb_size", "parse_header"]

# NCBIstdaa alphabet of .psq files (index = byte value)
NCBISTDAA = "-ABCDEFGHIKLMNPQRSTVWXYZU*OJ"
_LUT = np.frombuffer(NCBISTDAA.encode(), dtype=np.uint8)
# A .phr entry is a BER-encoded Blast-def-line-set: SEQUENCE { SEQUENCE { [0] title VisibleString
# (tag 0x1a), ... } }. metastudent-data titles read "ACCESSION|GO:...,GO:...". Their BER length
# is one byte below 128 but 0x81 NN or 0x82 NN NN for longer titles (5 % of the entries, those
# with many GO terms), so the accession does not always start two bytes after the tag.
_TITLE_PREFIX = b"\x30\x80\x30\x80\xa0\x80\x1a"
_ACC = re.compile(rb"([A-Z0-9]+(?:-\d+)?)\|(.*)", re.S)


def _title(header: bytes) -> bytes | None:
    """The title string of one .phr entry, or None when it does not start with one."""
    if not header.startswith(_TITLE_PREFIX):
        return None
    o = len(_TITLE_PREFIX)
    if o >= len(header):
        return None
    first = header[o]
    o += 1
    if first < 0x80:
        length = first
    else:
        k = first & 0x7F
        if not 1 <= k <= 4 or o + k > len(header):
            return None
        length = int.from_bytes(header[o : o + k], "big")
        o += k
    if o + length > len(header):
        return None
    return header[o : o + length]


def parse_header(header: bytes) -> tuple[str, str]:
    """(accession, rest of the title) of one .phr entry, e.g. ("Q96RU7", "GO:0003714,...");
    ValueError when the entry holds no "ACCESSION|..." title."""
    title = _title(header)
    m = _ACC.fullmatch(title) if title is not None else None
    if m is None:
        raise ValueError(f"expected a BLAST header with an 'ACCESSION|...' title, got {header[:48]!r}")
    return m.group(1).decode(), m.group(2).decode("ascii", "replace")


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
    """Yield (accession, sequence) for every entry of the BLAST database ``base``.

    An entry whose header holds no accession raises ValueError (naming the entry) rather
    than being named by its position, which would collide across databases."""
    n, _, _, hoff, soff = _read_index(Path(f"{base}.pin"))
    psq = np.fromfile(f"{base}.psq", dtype=np.uint8)
    phr = Path(f"{base}.phr").read_bytes()
    for i in range(n):
        seq = _LUT[psq[soff[i] : soff[i + 1] - 1]].tobytes().decode()  # last byte is a 0 separator
        try:
            acc, _ = parse_header(phr[hoff[i] : hoff[i + 1]])
        except ValueError as e:
            raise ValueError(f"{base}.phr, entry {i}: {e}") from None
        yield acc, seq
