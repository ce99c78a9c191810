"""Antibody variable regions from Swiss-Prot, and AntiBERTy's masked-residue accuracy on them.

The extract shipped in ``favor/data/swissprot_ig_v.fasta.gz`` (see the NOTICE there) holds
the immunoglobulin heavy and light chain variable (V) regions of UniProtKB/Swiss-Prot (January
2014) as packaged in Debian's ``metastudent-data``. That package's FASTA headers carry an
accession and GO terms but no protein names, so V regions are recognised by their sequence:
the framework motifs that flank CDR1 (the Cys that ends framework 1, then the Trp that starts
framework 2: ``W[VIF]RQ..G.GLEW`` in heavy chains, ``W[YFL]QQ.PG`` in kappa/lambda light
chains), with a length of a V region (80-170 residues, signal peptide included). A signal
peptide in front of framework 1 is cut off (AntiBERTy was trained on mature V domains).
``build_extract`` rebuilds the file from the .deb.

Masked-residue accuracy (``masked_batches``, ``masked_accuracy``): 15 % of the residues of
each held-out sequence, drawn with a fixed seed, are replaced by [MASK] and the model must
name them; special tokens and padding are never masked.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.blastdb import read_blastdb
from ..data.fasta import read_fasta, write_fasta
from ..data.swissprot import DATASET_DIR, download_package

__all__ = [
    "EXTRACT",
    "v_region",
    "ig_v_regions",
    "build_extract",
    "load_antibodies",
    "SPLITS",
    "masked_batches",
    "masked_accuracy",
]

log = logging.getLogger(__name__)

#: the shipped extract (in package favor.data)
EXTRACT = "swissprot_ig_v.fasta.gz"
SPLITS = ("train", "heldout", "all")
#: fraction of sequences held out (seeded by HELDOUT_SEED, over the extract's sorted records)
HELDOUT_FRACTION = 0.3
HELDOUT_SEED = 0

_STANDARD = frozenset("ACDEFGHIKLMNPQRSTVWY")  # AntiBERTy's residue vocabulary
_HEAVY = re.compile(r"C.{6,16}W[VIF]RQ.{2,4}[GDE][KQRE][GRA][LPF]EW")
_LIGHT = re.compile(r"C.{6,20}W[YFL][QLRK]Q[KRLHI][PS][GD]")
# where framework 1 starts: heavy (Q/E)V(Q/K)L.(Q/E)SG, kappa (D/E)I(V/Q)(M/L)TQ, lambda Q(S/P/A)(A/V)LTQ
_FR1 = re.compile(r"[QEDA]V[QKTE]L[VQKLER][EQD][SNT]G|[DEAQN][IVF][QVEL][ML][TI]Q|[QSNH][SPATF][AVEGM]LTQ")


def v_region(sequence: str) -> tuple[str, str] | None:
    """(chain, mature V region) with chain "H" or "L", or None when ``sequence`` is not an
    immunoglobulin V region (no framework motifs, wrong length, residues outside the 20)."""
    if not 80 <= len(sequence) <= 170:
        return None
    m = _HEAVY.search(sequence)
    chain = "H"
    if m is None:
        m, chain = _LIGHT.search(sequence), "L"
    if m is None:
        return None
    cys = m.start()  # framework 1 is ~22 residues long, ending in this Cys
    start = 0
    if cys > 26:  # a signal peptide (or a leader) precedes framework 1
        fr1 = _FR1.search(sequence, max(0, cys - 27), cys)
        start = fr1.start() if fr1 is not None and fr1.start() <= cys - 15 else cys - 22
    v = sequence[start:]
    if len(v) < 80 or not set(v) <= _STANDARD:
        return None
    return chain, v


def ig_v_regions(records: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """[(name, V region)] from (name, protein) records: V regions only, duplicates of a
    sequence dropped (the first name is kept), sorted by sequence. Names become "H|name" or
    "L|name" by chain."""
    seen: dict[str, str] = {}
    for name, seq in records:
        found = v_region(seq)
        if found is not None and found[1] not in seen:
            seen[found[1]] = f"{found[0]}|{name}"
    return sorted(((n, s) for s, n in seen.items()), key=lambda r: r[1])


def _metastudent_records(root: Path) -> Iterable[tuple[str, str]]:
    for onto in ("MFO", "BPO", "CCO"):
        base = root / DATASET_DIR / onto / "goasp.fasta"
        if not Path(f"{base}.pin").is_file():
            raise FileNotFoundError(f"{base}.pin does not exist: expected an unpacked metastudent-data under {root}")
        for i, (acc, seq) in enumerate(read_blastdb(base)):
            # an accession the header reader could not parse comes back as the entry's index
            yield (acc if not acc.isdigit() else f"{onto}#{i}"), seq


def build_extract(out: str | Path, *, root: str | Path | None = None) -> tuple[Path, int]:
    """Write the V-region extract to ``out`` (a .fasta.gz path) from an unpacked
    ``metastudent-data`` package ``root`` (downloaded with apt-get when None); returns
    (path, number of sequences). The shipped file is ``build_extract(...)`` of package 2.0.1-8."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        base = Path(root) if root is not None else download_package(Path(tmp))
        records = ig_v_regions(_metastudent_records(base))
    write_fasta(out, records)
    log.info("wrote %d immunoglobulin V regions to %s", len(records), out)
    return out, len(records)


def _read_extract(path: str | Path | None) -> list[tuple[str, str]]:
    if path is not None:
        return list(read_fasta(path))
    with resources.as_file(resources.files("favor.data").joinpath(EXTRACT)) as p:
        return list(read_fasta(p))


def load_antibodies(split: str = "heldout", *, path: str | Path | None = None) -> list[str]:
    """V-region sequences of the extract (or of a FASTA file ``path``): "train", "heldout"
    (a fixed 30 % of the sequences, seeded) or "all"."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    records = sorted(_read_extract(path), key=lambda r: r[1])
    seqs = [s for _, s in records]
    if split == "all":
        return seqs
    n_held = round(HELDOUT_FRACTION * len(seqs))
    held = set(np.random.default_rng(HELDOUT_SEED).choice(len(seqs), size=n_held, replace=False).tolist())
    return [s for i, s in enumerate(seqs) if (i in held) == (split == "heldout")]


def masked_batches(
    tokenizer, sequences: list[str], *, rate: float = 0.15, seed: int = 0, batch_size: int = 16
) -> list[dict[str, torch.Tensor]]:
    """Tokenized batches of space-separated residues with ``labels``: the original token id
    where a residue was masked (``rate`` of the residues of each sequence, at least one,
    drawn by a torch.Generator seeded with ``seed``), -100 elsewhere."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"rate must be in (0, 1), got {rate}")
    g = torch.Generator().manual_seed(seed)
    special = set(tokenizer.all_special_ids)
    out = []
    for i in range(0, len(sequences), batch_size):
        chunk = [" ".join(s.replace(" ", "")) for s in sequences[i : i + batch_size]]
        enc = dict(tokenizer(chunk, padding=True, return_tensors="pt"))
        ids = enc["input_ids"]
        labels = torch.full_like(ids, -100)
        masked = ids.clone()
        for row in range(ids.shape[0]):
            pos = torch.tensor([j for j, t in enumerate(ids[row].tolist()) if t not in special], dtype=torch.long)
            k = max(1, round(rate * len(pos)))
            pick = pos[torch.randperm(len(pos), generator=g)[:k]]
            labels[row, pick] = ids[row, pick]
            masked[row, pick] = tokenizer.mask_token_id
        enc["input_ids"], enc["labels"] = masked, labels
        out.append(enc)
    return out


@torch.no_grad()
def masked_accuracy(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> tuple[float, int]:
    """(fraction of masked residues whose arg-max prediction is right, number masked) for a
    masked LM under its current attn_implementation."""
    right = total = 0
    for b in batches:
        labels = b["labels"]
        logits = model(**{k: v for k, v in b.items() if k != "labels"}).logits
        sel = labels != -100
        right += int((logits.argmax(-1)[sel] == labels[sel]).sum())
        total += int(sel.sum())
    if total == 0:
        raise ValueError("no masked positions in batches")
    return right / total, total
