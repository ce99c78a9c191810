"""Residue-level protein tokenizer: one token per amino acid, plus pad/bos/eos."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["ProteinTokenizer", "RESIDUES", "SPECIALS"]

SPECIALS = ("<pad>", "<bos>", "<eos>")
#: the 20 standard amino acids, then X (unknown), B, Z, U (selenocysteine), O (pyrrolysine)
RESIDUES = "ACDEFGHIKLMNPQRSTVWYXBZUO"


class ProteinTokenizer:
    """Maps residue letters to ids (specials first). Unknown letters (J, *, -, lower case
    after upper-casing fails) become X; ``decode`` drops specials."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self) -> None:
        self.vocab = list(SPECIALS) + list(RESIDUES)
        self.unk_id = len(SPECIALS) + RESIDUES.index("X")
        lut = np.full(256, self.unk_id, dtype=np.int64)
        for i, ch in enumerate(RESIDUES):
            lut[ord(ch)] = lut[ord(ch.lower())] = len(SPECIALS) + i
        self._lut = lut
        self._chars = np.array([""] * len(SPECIALS) + list(RESIDUES))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode_array(self, seq: str) -> np.ndarray:
        if not isinstance(seq, str):
            raise TypeError(f"seq must be a str of residue letters, got {type(seq).__name__}")
        return self._lut[np.frombuffer(seq.encode("ascii", errors="replace"), dtype=np.uint8)]

    def encode(self, seq: str, *, bos: bool = False, eos: bool = False) -> torch.Tensor:
        """Residues -> LongTensor (L,), optionally framed by <bos>/<eos>."""
        ids = self.encode_array(seq)
        parts = ([np.array([self.bos_id])] if bos else []) + [ids] + ([np.array([self.eos_id])] if eos else [])
        return torch.from_numpy(np.concatenate(parts).astype(np.int64))

    def decode(self, ids) -> str:
        """ids -> residue string; special tokens are dropped."""
        arr = np.asarray(ids.tolist() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got range [{arr.min()}, {arr.max()}]")
        return "".join(self._chars[arr].tolist())

    def is_residue(self, ids: torch.Tensor) -> torch.Tensor:
        """Bool mask of residue tokens (what bits per residue counts)."""
        return ids >= len(SPECIALS)
