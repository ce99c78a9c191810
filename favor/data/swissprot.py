"""The full Swiss-Prot set, fetched on demand from Debian's ``metastudent-data`` package.

``fetch_swissprot(out_dir)`` runs ``apt-get download metastudent-data`` (225 MB .deb),
unpacks it with ``dpkg -x``, and writes ``swissprot.fasta.gz``: the union of the three GO
ontology databases (1,338,325 entries; 516,371 distinct accessions, 186.7 M residues, 435,059
distinct sequences), deduplicated by accession and sorted. ``extract(...)`` draws the fixed,
seeded subset shipped as favor's embedded corpus.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .blastdb import read_blastdb
from .debian import unpack_package
from .fasta import write_fasta

__all__ = ["fetch_swissprot", "read_metastudent", "extract", "metastudent_databases", "DEB_PACKAGE", "DATASET_DIR"]

log = logging.getLogger(__name__)

DEB_PACKAGE = "metastudent-data"
#: where the BLAST databases lie inside an unpacked package (relative to the ``dpkg -x`` root)
DATASET_DIR = "usr/share/metastudent-data/dataset_201401"
_SUBDIR = DATASET_DIR  # old private name, still imported by favor.hf.antibodies
_ONTOLOGIES = ("MFO", "BPO", "CCO")


def metastudent_databases(root: str | Path) -> dict[str, Path]:
    """ontology ("MFO", "BPO", "CCO") -> BLAST database base path (for ``read_blastdb``) under an
    unpacked package ``root`` (the directory given to ``dpkg -x``); FileNotFoundError when one
    is missing."""
    base = Path(root) / DATASET_DIR
    if not base.is_dir():
        raise FileNotFoundError(f"{base} does not exist: expected an unpacked {DEB_PACKAGE} package under {root}")
    dbs = {onto: base / onto / "goasp.fasta" for onto in _ONTOLOGIES}
    for db in dbs.values():
        if not Path(f"{db}.pin").is_file():
            raise FileNotFoundError(f"{db}.pin does not exist: expected an unpacked {DEB_PACKAGE} package under {root}")
    return dbs


def read_metastudent(root: str | Path) -> dict[str, str]:
    """accession -> sequence over the MFO, BPO and CCO databases under an unpacked package
    ``root``. An accession in several databases has the same sequence in each (checked on
    package 2.0.1-8); the first one read is kept."""
    seqs: dict[str, str] = {}
    for db in metastudent_databases(root).values():
        for acc, seq in read_blastdb(db):
            seqs.setdefault(acc, seq)
    return seqs


def download_package(work: Path) -> Path:
    """apt-get download + dpkg -x into ``work``; returns the unpacked root."""
    needs = "fetching Swiss-Prot needs a Debian/Ubuntu system with apt-get and dpkg"
    return unpack_package(DEB_PACKAGE, work / "root", work, needs=needs)


def fetch_swissprot(
    out_dir: str | Path, *, root: str | Path | None = None, progress: Callable[[str], None] | None = None
) -> Path:
    """Write ``out_dir/swissprot.fasta.gz`` (all proteins, sorted by accession) and return it.

    ``root`` reuses an already unpacked package instead of downloading one.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = progress or log.info
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        if root is None:
            say(f"downloading {DEB_PACKAGE} (225 MB) with apt-get")
            root = download_package(Path(tmp))
        say("reading the BLAST databases")
        seqs = read_metastudent(root)
        dest = out / "swissprot.fasta.gz"
        part = out / ".swissprot.partial.fasta.gz"  # ends in .gz: write_fasta compresses by suffix
        say(f"writing {len(seqs)} proteins to {dest}")
        write_fasta(part, ((acc, seqs[acc]) for acc in sorted(seqs)))
        part.replace(dest)
    return dest


def extract(
    seqs: dict[str, str], *, num_proteins: int, seed: int = 0, max_length: int | None = None
) -> list[tuple[str, str]]:
    """A fixed random subset: accessions sorted, then ``num_proteins`` drawn without
    replacement by numpy's PCG64 seeded with ``seed`` (optionally among those no longer than
    ``max_length``), returned in accession order."""
    accs = sorted(a for a, s in seqs.items() if max_length is None or len(s) <= max_length)
    if num_proteins > len(accs):
        raise ValueError(f"num_proteins={num_proteins} but only {len(accs)} proteins qualify")
    pick = np.random.default_rng(seed).choice(len(accs), size=num_proteins, replace=False)
    return [(accs[i], seqs[accs[i]]) for i in sorted(pick)]
