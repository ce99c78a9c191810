"""Jane Austen's six novels from Debian's ``r-cran-janeaustenr`` (public domain), fetched on
demand with ``apt-get download`` + ``dpkg -x`` and read by ``read_austen``, a minimal reader
of R's serialised character vectors (no R, no extra Python package). Used by the paper's
books experiment (favor.paper.books) and the English corpus (favor.data.english)."""

from __future__ import annotations

import struct
import tempfile
import zlib
from pathlib import Path

from .debian import unpack_package

__all__ = ["read_austen", "fetch_austen", "AUSTEN_NOVELS", "AUSTEN_PACKAGE", "AUSTEN_DATA"]

AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_DATA = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
#: title line (upper case, as in the package) -> short name
AUSTEN_NOVELS = {
    "SENSE AND SENSIBILITY": "sensesensibility",
    "PRIDE AND PREJUDICE": "prideprejudice",
    "MANSFIELD PARK": "mansfieldpark",
    "EMMA": "emma",
    "NORTHANGER ABBEY": "northangerabbey",
    "PERSUASION": "persuasion",
}


def _r_strings(blob: bytes) -> list[str]:
    """A character vector from R's XDR serialisation (format 3), the only type the package holds."""
    if blob[:2] != b"X\n":
        raise ValueError("not an R XDR serialisation (expected the 'X\\n' header)")
    pos = 2
    version = struct.unpack(">i", blob[pos : pos + 4])[0]
    pos += 12  # version, writer version, minimal reader version
    if version == 3:
        (n,) = struct.unpack(">i", blob[pos : pos + 4])
        pos += 4 + n  # native encoding name
    flags, length = struct.unpack(">ii", blob[pos : pos + 8])
    pos += 8
    if flags & 0xFF != 16:
        raise ValueError(f"expected a character vector (STRSXP, 16), got R type {flags & 0xFF}")
    out = []
    for _ in range(length):
        _, n = struct.unpack(">ii", blob[pos : pos + 8])
        pos += 8
        if n < 0:  # NA_character_
            out.append("")
            continue
        out.append(blob[pos : pos + n].decode("utf-8", errors="replace"))
        pos += n
    return out


def read_austen(rdb: str | Path) -> dict[str, str]:
    """short name -> novel text from the package's ``Rdata.rdb`` (each object a 4-byte length
    plus a zlib stream); novels are recognised by their title line."""
    raw = Path(rdb).read_bytes()
    novels: dict[str, str] = {}
    pos = 0
    while pos < len(raw):
        d = zlib.decompressobj()
        blob = d.decompress(raw[pos + 4 :])
        pos = len(raw) - len(d.unused_data)
        lines = _r_strings(blob)
        title = next((ln.strip().upper() for ln in lines if ln.strip()), "")
        if title not in AUSTEN_NOVELS:
            raise ValueError(f"{rdb}: unexpected object starting {title[:40]!r}")
        novels[AUSTEN_NOVELS[title]] = "\n".join(lines) + "\n"
    if set(novels) != set(AUSTEN_NOVELS.values()):
        raise ValueError(f"{rdb}: found novels {sorted(novels)}, expected {sorted(AUSTEN_NOVELS.values())}")
    return novels


def fetch_austen(cache: str | Path) -> dict[str, str]:
    """The six novels, downloading the Debian package into ``cache`` once (RuntimeError when
    apt-get or dpkg is missing or the download fails)."""
    cache = Path(cache)
    rdb = cache / "janeaustenr" / AUSTEN_DATA
    if not rdb.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            unpack_package(AUSTEN_PACKAGE, cache / "janeaustenr", Path(tmp))
    return read_austen(rdb)
