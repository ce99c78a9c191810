"""Plain text for language modelling: files, format detection, byte and Hugging Face tokens.

``data_files`` expands a file or a directory into files; ``detect_format`` tells FASTA
(by extension, or a leading '>') from plain text; ``ByteTokenizer`` maps UTF-8 text to its
bytes (vocabulary 256, no tokenizer to train); ``load_tokenizer`` wraps a local Hugging
Face tokenizer directory; ``read_tokens`` concatenates a list of text files into one id
sequence.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "FASTA_SUFFIXES",
    "ByteTokenizer",
    "HFTokenizer",
    "data_files",
    "detect_format",
    "load_tokenizer",
    "read_tokens",
]

#: extensions read as FASTA (also with a trailing .gz)
FASTA_SUFFIXES = (".fasta", ".fa", ".faa")
FORMATS = ("fasta", "text")


def _read_bytes(path: Path, limit: int | None = None) -> bytes:
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as f:
            return f.read() if limit is None else f.read(limit)
    with open(path, "rb") as f:
        return f.read() if limit is None else f.read(limit)


def data_files(path: str | Path) -> list[Path]:
    """``path`` itself if it is a file; the files under it (recursively, sorted, hidden
    names skipped) if it is a directory. Errors name the path."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise ValueError(f"data directory {path} holds no files")
        return files
    raise FileNotFoundError(f"data file {path} does not exist")


def detect_format(path: str | Path) -> str:
    """ "fasta" for a .fasta/.fa/.faa file (optionally .gz) or one whose first non-blank
    byte is '>'; "text" otherwise."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    if name.endswith(FASTA_SUFFIXES):
        return "fasta"
    head = _read_bytes(path, 4096).lstrip()
    return "fasta" if head.startswith(b">") else "text"


def files_format(files: list[Path]) -> str:
    """The one format of ``files``; a mix of FASTA and text raises ValueError naming one of each."""
    kinds = {f: detect_format(f) for f in files}
    found = sorted(set(kinds.values()))
    if len(found) > 1:
        example = {k: next(str(f) for f, v in kinds.items() if v == k) for k in found}
        raise ValueError(
            f"data mixes FASTA and text files (e.g. {example['fasta']} and {example['text']}); use one kind"
        )
    return found[0]


class ByteTokenizer:
    """UTF-8 bytes as token ids: vocabulary 256, any language, nothing to train."""

    name = "bytes"
    vocab_size = 256
    mask_id = None
    unit = "byte"

    def encode(self, text: bytes | str) -> np.ndarray:
        raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(raw, dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        arr = np.asarray(ids.tolist() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"byte ids must lie in [0, 256), got range [{arr.min()}, {arr.max()}]")
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class HFTokenizer:
    """A local Hugging Face tokenizer directory (``transformers`` needed; no network)."""

    unit = "token"

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory {path} does not exist")
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ImportError("--tokenizer needs transformers (pip install favor[hf])") from None
        self.name = str(path)
        self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.vocab_size = len(self._tok)
        self.mask_id = self._tok.mask_token_id

    def encode(self, text: bytes | str) -> np.ndarray:
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        return np.asarray(self._tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)

    def decode(self, ids) -> str:
        return self._tok.decode(ids.tolist() if isinstance(ids, torch.Tensor) else list(ids))


def load_tokenizer(path: str | Path | None) -> ByteTokenizer | HFTokenizer:
    """Bytes for None, else the Hugging Face tokenizer saved in directory ``path``."""
    return ByteTokenizer() if path is None else HFTokenizer(path)


def read_tokens(files: list[Path], tokenizer: ByteTokenizer | HFTokenizer) -> torch.Tensor:
    """The files' texts (``.gz`` decompressed), joined by a newline, as one LongTensor of
    ids. An empty result raises ValueError naming the files."""
    parts = [tokenizer.encode(_read_bytes(f)) for f in files]
    sep = tokenizer.encode(b"\n")
    joined = [p for i, part in enumerate(parts) for p in ((sep, part) if i else (part,))]
    ids = np.concatenate(joined) if joined else np.zeros(0, dtype=np.int64)
    if ids.size == 0 or all(part.size == 0 for part in parts):
        names = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
        raise ValueError(f"data is empty: no text in {names}")
    return torch.from_numpy(ids.astype(np.int64))
