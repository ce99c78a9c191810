"""Training tasks for the paper's experiments: where batches come from and what is scored.

A *source* yields token rows: ``StreamSource`` cuts windows out of one long token stream
(books, concatenated proteins), ``SequenceSource`` samples whole sequences (proteins clipped
to a length, images) and right-pads them. A *task* turns rows into a loss and metrics:
``CausalLM`` predicts every next token, ``MaskedLM`` predicts 15 % masked tokens
(bidirectional). Every batch is a function of (seed, step) and the evaluation set is fixed,
so all attention variants see the same data in the same order and are scored on the same
tokens. Metrics: mean cross-entropy (nats), accuracy, perplexity exp(loss) and bits (per
token, = bits per dimension for pixels).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..nn import mix_seed

__all__ = ["StreamSource", "SequenceSource", "CausalLM", "MaskedLM", "WithEval", "Batch", "metrics_from"]

_EVAL_SEED = 20090  # the evaluation set's windows and masks: the same for every run


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, L) long
    targets: torch.Tensor  # (B, L) long
    weight: torch.Tensor  # (B, L) bool: which targets are scored
    padding: torch.Tensor | None  # (B, L) bool, True = padding key (bidirectional only)


class StreamSource:
    """Windows of ``length`` tokens at random offsets of a 1-d token tensor."""

    def __init__(self, tokens: torch.Tensor, length: int) -> None:
        if tokens.ndim != 1 or tokens.numel() < length + 2:
            raise ValueError(f"tokens must be 1-d with at least length + 2 = {length + 2} entries")
        self.tokens, self.length = tokens.long(), length

    def rows(self, n: int, gen: torch.Generator, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` windows of ``length`` tokens (default: the source's length)."""
        length = self.length if length is None else length
        starts = torch.randint(0, self.tokens.numel() - length, (n,), generator=gen)
        rows = self.tokens[starts[:, None] + torch.arange(length)]
        return rows, torch.zeros_like(rows, dtype=torch.bool)


class SequenceSource:
    """Whole sequences (each clipped to ``length``), sampled with replacement, right-padded
    with ``pad_id`` to the longest in the batch."""

    def __init__(self, seqs: list[torch.Tensor], length: int, pad_id: int) -> None:
        if not seqs:
            raise ValueError("seqs must hold at least one sequence")
        self.seqs = [s[:length].long() for s in seqs if s.numel() >= 2]
        self.length, self.pad_id = length, pad_id

    def rows(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        pick = torch.randint(0, len(self.seqs), (n,), generator=gen).tolist()
        width = max(self.seqs[i].numel() for i in pick)
        rows = torch.full((n, width), self.pad_id, dtype=torch.long)
        for r, i in enumerate(pick):
            rows[r, : self.seqs[i].numel()] = self.seqs[i]
        pad = torch.arange(width)[None, :] >= torch.tensor([self.seqs[i].numel() for i in pick])[:, None]
        return rows, pad


def metrics_from(loss_sum: float, correct: int, count: int) -> dict[str, float]:
    loss = loss_sum / max(1, count)
    return {
        "loss": loss,
        "accuracy": correct / max(1, count),
        "perplexity": math.exp(min(loss, 50.0)),
        "bits": loss / math.log(2.0),
    }


class _Task:
    causal: bool

    def __init__(
        self,
        train,
        val,
        *,
        vocab_size: int,
        batch_size: int,
        eval_rows: int,
        eval_batch: int = 8,
        length_at: Callable[[int], int] | None = None,
    ):
        self.train, self.val, self.vocab_size = train, val, vocab_size
        self.batch_size, self.eval_batch = batch_size, eval_batch
        if length_at is not None and not isinstance(train, StreamSource):
            raise TypeError("length_at needs a StreamSource as train (windows of any length)")
        self.length_at = length_at
        gen = torch.Generator().manual_seed(_EVAL_SEED)
        self.eval_set = [
            self._make(*val.rows(min(eval_batch, eval_rows - i), gen), gen) for i in range(0, eval_rows, eval_batch)
        ]

    def _make(self, rows, pad, gen) -> Batch:  # pragma: no cover - abstract
        raise NotImplementedError

    def batch(self, step: int, seed: int) -> Batch:
        """Training batch ``step`` of ``seed``. With ``length_at`` (a sequence-length
        curriculum), the rows of step ``step`` are ``length_at(step)`` tokens long and their
        number grows so that every step holds the same number of tokens (evaluation is
        always at the source's full length)."""
        gen = torch.Generator().manual_seed(mix_seed(seed, 1, step))
        if self.length_at is None:
            return self._make(*self.train.rows(self.batch_size, gen), gen)
        length = int(self.length_at(step))
        if not 1 <= length <= self.train.length:
            raise ValueError(f"length_at({step}) = {length} must be in [1, {self.train.length}]")
        n = max(1, self.batch_size * self.train.length // length)
        return self._make(*self.train.rows(n, gen, length), gen)

    def logits(self, model, b: Batch) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, model, b: Batch) -> torch.Tensor:
        logits = self.logits(model, b)
        return F.cross_entropy(logits[b.weight].float(), b.targets[b.weight])

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        was = model.training
        model.eval()
        loss_sum, correct, count = 0.0, 0, 0
        for b in self.eval_set:
            logits = self.logits(model, b)[b.weight].float()
            y = b.targets[b.weight]
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
            count += y.numel()
        model.train(was)
        return metrics_from(loss_sum, correct, count)

    def log_frequencies(self) -> torch.Tensor:
        """(vocab_size,) float64 natural log of each token's frequency in the training data,
        add-one smoothed: the unigram model, and where a logit bias can start
        (``train_run(logit_bias=...)``)."""
        tokens = self.train.tokens if hasattr(self.train, "tokens") else torch.cat(self.train.seqs)
        counts = torch.bincount(tokens, minlength=self.vocab_size).double() + 1.0
        return (counts / counts.sum()).log()

    def unigram(self) -> dict[str, float]:
        """The empirical baseline: training-token frequencies (add-one), scored on the eval set."""
        logp = self.log_frequencies()
        loss_sum, correct, count = 0.0, 0, 0
        for b in self.eval_set:
            y = b.targets[b.weight]
            loss_sum -= float(logp[y].sum())
            correct += int((y == int(logp.argmax())).sum())
            count += y.numel()
        return metrics_from(loss_sum, correct, count)


class CausalLM(_Task):
    """Next-token prediction on rows; padding targets are not scored."""

    causal = True

    def _make(self, rows, pad, gen) -> Batch:
        return Batch(rows[:, :-1], rows[:, 1:], ~pad[:, 1:], None)

    def logits(self, model, b: Batch) -> torch.Tensor:
        return model(b.inputs)

    def bigram(self) -> dict[str, float]:
        """The next-token-given-this-token baseline: add-one counts of adjacent pairs in the
        training stream (a StreamSource), scored on the eval set (the first scored target of
        a row is predicted from its input token, which the row holds)."""
        if not hasattr(self.train, "tokens"):
            raise TypeError("bigram() counts pairs of a token stream (a StreamSource)")
        tokens, v = self.train.tokens, self.vocab_size
        counts = torch.bincount(tokens[:-1] * v + tokens[1:], minlength=v * v).double().reshape(v, v) + 1.0
        logp = (counts / counts.sum(-1, keepdim=True)).log()
        loss_sum, correct, count = 0.0, 0, 0
        for b in self.eval_set:
            prev, y = b.inputs[b.weight], b.targets[b.weight]
            loss_sum -= float(logp[prev, y].sum())
            correct += int((logp[prev].argmax(-1) == y).sum())
            count += y.numel()
        return metrics_from(loss_sum, correct, count)


class MaskedLM(_Task):
    """Bidirectional masked LM: ``mask_rate`` of the non-padding tokens are replaced by
    ``mask_id`` and predicted (the paper's PG-19 / protein setting: 15 %)."""

    causal = False

    def __init__(self, train, val, *, mask_id: int, mask_rate: float = 0.15, **kw) -> None:
        if not 0.0 < mask_rate < 1.0:
            raise ValueError(f"mask_rate must be in (0, 1), got {mask_rate!r}")
        self.mask_id, self.mask_rate = mask_id, mask_rate
        super().__init__(train, val, **kw)

    def _make(self, rows, pad, gen) -> Batch:
        chosen = (torch.rand(rows.shape, generator=gen) < self.mask_rate) & ~pad
        return Batch(rows.masked_fill(chosen, self.mask_id), rows, chosen, pad if bool(pad.any()) else None)

    def logits(self, model, b: Batch) -> torch.Tensor:
        return model.logits(model(b.inputs, key_padding_mask=b.padding))


class WithEval:
    """``task`` whose evaluation also scores ``others`` (name -> task with the same model
    interface), their metrics prefixed ``name_`` (e.g. ``ood_accuracy``)."""

    def __init__(self, task, others: dict) -> None:
        self.task, self.others = task, dict(others)

    def __getattr__(self, name):
        return getattr(self.task, name)

    def evaluate(self, model) -> dict[str, float]:
        out = self.task.evaluate(model)
        for prefix, other in self.others.items():
            out.update({f"{prefix}_{k}": v for k, v in other.evaluate(model).items()})
        return out
