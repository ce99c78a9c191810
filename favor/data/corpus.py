"""The embedded protein corpus and its fixed train/validation split.

``load_proteins()`` reads favor's embedded Swiss-Prot extract (see NOTICE); ``split``
divides proteins (not windows, so no protein straddles the split) by a seeded permutation.
``TokenStream`` concatenates proteins as <bos> residues <eos> ... for language modelling:
training windows are drawn at offsets that depend only on (seed, step), so the data
position of a run is its step number and resuming needs no sampler state.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from .fasta import read_fasta
from .tokenizer import ProteinTokenizer

__all__ = ["EMBEDDED", "load_proteins", "split", "TokenStream"]

#: file name of the embedded extract inside the favor.data package
EMBEDDED = "swissprot_8k.fasta.gz"


@functools.lru_cache(maxsize=1)
def _embedded() -> tuple[tuple[str, str], ...]:
    # parsed once per process: the demo and training loop ask for it several times
    with resources.as_file(resources.files("favor.data") / EMBEDDED) as p:
        return tuple(read_fasta(p))


def load_proteins(path: str | Path | None = None) -> list[tuple[str, str]]:
    """(accession, sequence) pairs from ``path`` (FASTA, optionally .gz) or, by default,
    the embedded extract: 8,000 Swiss-Prot proteins, 2.88 M residues."""
    if path is None:
        return list(_embedded())
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"protein FASTA file {path} does not exist")
    records = list(read_fasta(path))
    if not records:
        raise ValueError(f"{path} holds no FASTA records")
    return records


def split(
    records: list[tuple[str, str]], *, val_fraction: float = 0.05, seed: int = 0
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, val) by a permutation of the proteins drawn from numpy PCG64(seed)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    n = len(records)
    n_val = max(1, int(round(n * val_fraction)))
    if n_val >= n:
        raise ValueError(f"need at least 2 proteins to split, got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    val_idx, train_idx = sorted(perm[:n_val]), sorted(perm[n_val:])
    return [records[i] for i in train_idx], [records[i] for i in val_idx]


class TokenStream:
    """Proteins as one token sequence <bos> r1 r2 ... <eos> <bos> ...; windows of
    ``length + 1`` tokens give (input, target) pairs."""

    def __init__(self, records: list[tuple[str, str]], tokenizer: ProteinTokenizer | None = None) -> None:
        self.tokenizer = tokenizer or ProteinTokenizer()
        tok = self.tokenizer
        parts = []
        for _, seq in records:
            parts += [np.array([tok.bos_id]), tok.encode_array(seq), np.array([tok.eos_id])]
        self.tokens = (
            torch.from_numpy(np.concatenate(parts).astype(np.int64)) if parts else torch.empty(0, dtype=torch.long)
        )

    @classmethod
    def from_tokens(cls, tokens: torch.Tensor) -> TokenStream:
        """A stream over ready-made ids (text corpora); ``tokenizer`` is None."""
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 1:
            raise ValueError(f"tokens must be a 1-D tensor of ids, got {type(tokens).__name__}")
        stream = cls.__new__(cls)
        stream.tokenizer = None
        stream.tokens = tokens.long()
        return stream

    def __len__(self) -> int:
        return self.tokens.numel()

    def _check(self, length: int) -> None:
        if len(self) < length + 2:
            raise ValueError(
                f"windows of length {length} need at least {length + 2} tokens, the stream has {len(self)}"
            )

    def batch(self, batch_size: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: inputs and next-token targets, each (batch_size, length)."""
        self._check(length)
        starts = torch.randint(0, len(self) - length - 1, (batch_size,), generator=generator)
        idx = starts[:, None] + torch.arange(length + 1)
        w = self.tokens[idx]
        return w[:, :-1], w[:, 1:]

    def windows(self, length: int, max_windows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Consecutive non-overlapping windows from the start (a fixed evaluation set)."""
        self._check(length)
        n = (len(self) - 1) // length
        if max_windows is not None:
            n = min(n, max_windows)
        idx = torch.arange(n)[:, None] * length + torch.arange(length + 1)
        w = self.tokens[idx]
        return w[:, :-1], w[:, 1:]
