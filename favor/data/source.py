"""What ``favor train`` trains on: proteins or text, a training stream and a held-out one.

``load_training_data(data, ...)`` reads a FASTA file, a text file or a directory of either
(``data=None``: the embedded Swiss-Prot extract) and returns a ``TrainingData``: the
training ``TokenStream``, the held-out one, the unit its bits count (residue, byte or
token) and the model's vocabulary size. The held-out data is ``eval_data`` when given,
else, for text, the last ``val_fraction`` of the tokens (a tail no training window
reaches) and, for proteins, a seeded choice of whole proteins (``corpus.split``).

Objectives: "causal" windows of context+1 tokens give (inputs, next-token targets);
"masked" windows of context tokens are masked BERT-style (``mask_tokens``), targets -100
where nothing is predicted. A masked vocabulary gains one id for the mask token when the
tokenizer has none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .corpus import TokenStream, load_proteins, split
from .text import data_files, files_format, load_tokenizer, read_tokens
from .tokenizer import ProteinTokenizer

__all__ = ["OBJECTIVES", "TrainingData", "load_training_data", "mask_tokens", "model_vocab", "IGNORE"]

OBJECTIVES = ("causal", "masked")
#: target id of positions a masked LM does not predict (F.cross_entropy's ignore_index)
IGNORE = -100
#: BERT's recipe: 15 % of positions chosen; of those 80 % masked, 10 % random, 10 % kept
MASK_RATE = 0.15


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def mask_tokens(
    tokens: torch.Tensor, *, mask_id: int, vocab_size: int, generator: torch.Generator, rate: float = MASK_RATE
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) for a masked LM from ids (B, L): each row has at least one chosen
    position; chosen ones are replaced by ``mask_id`` (80 %), a random id below
    ``vocab_size`` (10 %) or kept (10 %); targets are the original ids there, IGNORE elsewhere."""
    u = torch.rand(tokens.shape, generator=generator)
    chosen = (u < rate) | (u == u.min(dim=-1, keepdim=True).values)
    r = torch.rand(tokens.shape, generator=generator)
    random_ids = torch.randint(0, vocab_size, tokens.shape, generator=generator)
    inputs = torch.where(chosen & (r < 0.8), torch.full_like(tokens, mask_id), tokens)
    inputs = torch.where(chosen & (r >= 0.8) & (r < 0.9), random_ids, inputs)
    return inputs, torch.where(chosen, tokens, torch.full_like(tokens, IGNORE))


@dataclass(frozen=True)
class TrainingData:
    """Training and held-out token streams and how to score them."""

    train: TokenStream
    heldout: TokenStream
    format: str  # "fasta" or "text"
    unit: str  # what one held-out bit count is per: "residue", "byte" or "token"
    objective: str
    vocab_size: int  # the model's vocabulary, mask id included
    mask_id: int | None  # None for the causal objective
    counted: Callable[[torch.Tensor], torch.Tensor]  # targets (B, L) -> bool: scored positions

    def batch(self, batch_size: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random training windows -> (inputs, targets), each (batch_size, length)."""
        x, y = self.train.batch(batch_size, length, generator)
        if self.objective == "masked":
            return self._mask(x, generator)
        return x, y

    def heldout_windows(self, length: int, max_windows: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed held-out set: consecutive windows from the held-out start, masked
        (for "masked") by a generator seeded by ``seed``."""
        if len(self.heldout) < length + 2:
            raise ValueError(
                f"held-out data has {len(self.heldout)} tokens, too few for one window of context {length} "
                f"(needs {length + 2}): give more data, a larger held-out share or --eval-data"
            )
        x, y = self.heldout.windows(length, max_windows)
        if self.objective == "masked":
            return self._mask(x, torch.Generator().manual_seed(seed))
        return x, y

    def _mask(self, x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        base = self.vocab_size - 1 if self.mask_id == self.vocab_size - 1 else self.vocab_size
        return mask_tokens(x, mask_id=self.mask_id, vocab_size=base, generator=generator)


def _files_and_format(data: str | Path | None) -> tuple[list[Path] | None, str]:
    if data is None:
        return None, "fasta"
    files = data_files(data)
    return files, files_format(files)


def model_vocab(data: str | Path | None, *, tokenizer: str | Path | None = None, objective: str = "causal") -> int:
    """The vocabulary a model for this data and objective needs (reads only file heads,
    and the tokenizer)."""
    fmt = _files_and_format(data)[1]
    return _vocab(fmt, tokenizer, objective, None if fmt == "fasta" else load_tokenizer(tokenizer))[0]


def _vocab(fmt: str, tokenizer: str | Path | None, objective: str, text_tok) -> tuple[int, int | None]:
    """(model vocabulary, mask id or None); ``text_tok`` is the loaded text tokenizer."""
    _check_objective(objective)
    if fmt == "fasta":
        if tokenizer is not None:
            raise ValueError("tokenizer applies to text data; FASTA is read one residue per token")
        base, mask = ProteinTokenizer().vocab_size, None
    else:
        base, mask = text_tok.vocab_size, text_tok.mask_id
    if objective == "causal":
        return base, None
    return (base, mask) if mask is not None else (base + 1, base)


def _proteins(files: list[Path] | None) -> list[tuple[str, str]]:
    if files is None:
        return load_proteins(None)
    return [rec for f in files for rec in load_proteins(f)]


def load_training_data(
    data: str | Path | None,
    *,
    eval_data: str | Path | None = None,
    tokenizer: str | Path | None = None,
    objective: str = "causal",
    val_fraction: float = 0.05,
    seed: int = 0,
) -> TrainingData:
    """Read ``data`` (see the module doc) and hold out ``eval_data`` or a share of it.
    Errors: FileNotFoundError or ValueError naming the path (missing, empty, a FASTA/text mix)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    files, fmt = _files_and_format(data)
    eval_files, eval_fmt = (None, fmt) if eval_data is None else _files_and_format(eval_data)
    if eval_data is not None and eval_fmt != fmt:
        raise ValueError(f"eval_data {eval_data} is {eval_fmt} but data {data or 'the embedded extract'} is {fmt}")
    text_tok = None if fmt == "fasta" else load_tokenizer(tokenizer)
    vocab, mask_id = _vocab(fmt, tokenizer, objective, text_tok)
    if fmt == "fasta":
        records = _proteins(files)
        if eval_files is None:
            train_recs, val_recs = split(records, val_fraction=val_fraction, seed=seed)
        else:
            train_recs, val_recs = records, _proteins(eval_files)
        tok = ProteinTokenizer()
        train, heldout, unit, counted = (
            TokenStream(train_recs, tok),
            TokenStream(val_recs, tok),
            "residue",
            tok.is_residue,
        )
    else:
        ids = read_tokens(files, text_tok)
        if eval_files is None:
            cut = len(ids) - max(1, round(len(ids) * val_fraction))
            train_ids, val_ids = ids[:cut], ids[cut:]
        else:
            train_ids, val_ids = ids, read_tokens(eval_files, text_tok)
        train, heldout = TokenStream.from_tokens(train_ids), TokenStream.from_tokens(val_ids)
        unit, counted = text_tok.unit, _is_target
    return TrainingData(
        train=train, heldout=heldout, format=fmt, unit=unit, objective=objective, vocab_size=vocab,
        mask_id=mask_id, counted=counted,
    )  # fmt: skip


def _is_target(targets: torch.Tensor) -> torch.Tensor:
    return targets != IGNORE
