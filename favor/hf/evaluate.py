"""Evaluating causal LMs offline: perplexity, agreement with a teacher, a passkey test.

Task suites (lm-eval-harness) fetch their data from the model hub; these need only token ids:

- ``perplexity(model, ids)``: exp of the mean next-token negative log-likelihood over
  passages (P, L), every position predicted from the ones before it (L - 1 per passage);
  ``held_out_perplexity`` runs it on favor.data.english's held-out domain at several lengths;
- ``agreement(teacher, student, ids)``: mean KL(teacher || student) of the next-token
  distributions and the fraction of positions whose top-1 token is the same;
- ``passkey_prompt`` / ``passkey_accuracy``: a 5-digit key hidden at a chosen depth of N
  tokens of filler; the model, asked for it, must repeat it (greedy decoding).

Logits are computed ``chunk`` positions at a time, as the output embeddings applied to the
base model's last hidden state (``model.base_model``, ``model.get_output_embeddings()``):
at 8192 tokens and a 49k vocabulary the full logits would take 1.6 GB. ``chunk=None`` uses
``model(...).logits`` instead (for a model whose head does more than a projection).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data.english import passages

__all__ = [
    "next_token_logits",
    "negative_log_likelihood",
    "perplexity",
    "held_out_perplexity",
    "agreement",
    "compare",
    "Passkey",
    "passkey_prompt",
    "passkey_accuracy",
    "EVAL_LENGTHS",
]

#: the held-out lengths a causal LM is reported at
EVAL_LENGTHS = (512, 2048, 8192)


def _check_ids(ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < 2 or ids.dtype != torch.long:
        got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"ids must be a long tensor (passages, length >= 2), got {got}")
    return ids


@torch.no_grad()
def next_token_logits(model: nn.Module, ids: torch.Tensor, *, chunk: int | None = 1024) -> Iterator[torch.Tensor]:
    """Logits (1, C, vocab) in float32 for positions [s, s + C) of the single passage
    ``ids`` (1, L), C = ``chunk`` (the last one shorter; all L at once when None)."""
    mask = torch.ones_like(ids)
    if chunk is None:
        yield model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        return
    hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    for s in range(0, ids.shape[1], chunk):
        yield head(hidden[:, s : s + chunk]).float()


@torch.no_grad()
def negative_log_likelihood(model: nn.Module, ids: torch.Tensor, *, chunk: int | None = 1024) -> tuple[float, int]:
    """(sum of -log p(token t | tokens < t), number of predicted tokens) over passages
    ``ids`` (P, L), one passage per forward pass; token 0 of each passage is not predicted."""
    total, count = 0.0, 0
    for row in _check_ids(ids):
        row = row[None]
        start = 0
        for logits in next_token_logits(model, row, chunk=chunk):
            n = logits.shape[1]
            targets = row[:, start + 1 : start + n + 1]  # the last position predicts nothing
            logits = logits[:, : targets.shape[1]]
            total += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
            count += targets.numel()
            start += n
    return total, count


def perplexity(model: nn.Module, ids: torch.Tensor, *, chunk: int | None = 1024) -> float:
    """exp(mean next-token negative log-likelihood) over passages ``ids`` (P, L)."""
    total, count = negative_log_likelihood(model, ids, chunk=chunk)
    return math.exp(total / count)


def held_out_perplexity(
    model: nn.Module,
    tokenizer,
    *,
    lengths: tuple[int, ...] = EVAL_LENGTHS,
    count: int = 4,
    chunk: int | None = 1024,
) -> dict[int, float]:
    """length -> perplexity over the first ``count`` passages of that many tokens of
    favor.data.english's held-out domain (python-docs: not in its training mix)."""
    return {n: perplexity(model, passages(tokenizer, "heldout", length=n, count=count), chunk=chunk) for n in lengths}


@torch.no_grad()
def agreement(
    teacher: nn.Module, student: nn.Module, ids: torch.Tensor, *, chunk: int | None = 1024
) -> dict[str, float]:
    """How closely ``student``'s next-token distributions follow ``teacher``'s on passages
    ``ids`` (P, L), over every position: ``kl`` the mean KL(teacher || student) in nats,
    ``top1`` the fraction of positions where both rank the same token first, ``positions``."""
    got = compare(teacher, student, ids, chunk=chunk)
    return {key: got[key] for key in ("kl", "top1", "positions")}


@torch.no_grad()
def compare(teacher: nn.Module, student: nn.Module, ids: torch.Tensor, *, chunk: int | None = 1024) -> dict:
    """``agreement`` and both models' perplexity in one pass over passages ``ids`` (P, L):
    {"teacher_perplexity", "perplexity" (the student's), "kl", "top1", "positions"}; KL and
    top-1 over every position, the perplexities over the L - 1 predicted ones per passage."""
    kl, same, n = 0.0, 0, 0
    nll_t, nll_s, count = 0.0, 0.0, 0
    for row in _check_ids(ids):
        row = row[None]
        start = 0
        for t, s in zip(
            next_token_logits(teacher, row, chunk=chunk), next_token_logits(student, row, chunk=chunk), strict=True
        ):
            lt, ls = F.log_softmax(t, -1), F.log_softmax(s, -1)
            kl += float((lt.exp() * (lt - ls)).sum())
            same += int((t.argmax(-1) == s.argmax(-1)).sum())
            n += t.shape[1]
            targets = row[:, start + 1 : start + t.shape[1] + 1]
            m = targets.shape[1]
            nll_t -= float(lt[:, :m].gather(-1, targets[..., None]).sum())
            nll_s -= float(ls[:, :m].gather(-1, targets[..., None]).sum())
            count += m
            start += t.shape[1]
    return {
        "teacher_perplexity": math.exp(nll_t / count),
        "perplexity": math.exp(nll_s / count),
        "kl": kl / n,
        "top1": same / n,
        "positions": n,
    }


# -- passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention") ------------------------

_INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there."
)
_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
_QUESTION = " What is the pass key? The pass key is"


@dataclass(frozen=True)
class Passkey:
    """One passkey prompt: ``ids`` (1, L) token ids, the ``key`` (5 digits) it hides at
    ``depth`` (0: just after the instructions, 1: just before the question), the token index
    ``needle_start`` where the key's sentence begins and ``needle_end`` where it ends."""

    ids: torch.Tensor
    key: str
    depth: float
    needle_start: int
    needle_end: int


def _tokens(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def passkey_prompt(tokenizer, *, length: int, depth: float, key: str) -> Passkey:
    """A prompt of at most ``length`` tokens: instructions, whole filler sentences with the
    key's sentence inserted after a fraction ``depth`` of them, and the question. The pieces
    are tokenized apart and concatenated, so the key's tokens are the same at every depth."""
    if not (0.0 <= depth <= 1.0):
        raise ValueError(f"depth must lie in [0, 1], got {depth!r}")
    if not (len(key) == 5 and key.isdigit()):
        raise ValueError(f"key must be 5 digits, got {key!r}")
    intro, filler = _tokens(tokenizer, _INTRO), _tokens(tokenizer, _FILLER)
    needle, question = _tokens(tokenizer, _NEEDLE.format(key=key)), _tokens(tokenizer, _QUESTION)
    room = length - len(intro) - len(needle) - len(question)
    repeats = room // len(filler)
    if repeats < 1:
        raise ValueError(f"length {length} leaves no room for filler (one filler unit is {len(filler)} tokens)")
    before = round(depth * repeats)
    ids = intro + filler * before
    start = len(ids)
    ids = ids + needle + filler * (repeats - before) + question
    return Passkey(torch.tensor([ids], dtype=torch.long), key, depth, start, start + len(needle))


@torch.no_grad()
def passkey_accuracy(
    model: nn.Module,
    tokenizer,
    *,
    length: int,
    trials: int = 10,
    seed: int = 0,
    new_tokens: int = 8,
) -> dict:
    """Greedy passkey retrieval over ``trials`` prompts of ``length`` tokens: trial i hides a
    key drawn from ``seed`` at depth i / (trials - 1) (evenly from start to end); a trial is
    right when the key appears in the first ``new_tokens`` generated tokens. Returns
    {"accuracy", "trials": [{"depth", "key", "answer", "correct"}]}."""
    rng = random.Random(seed)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = getattr(tokenizer, "eos_token_id", None) if pad is None else pad
    rows = []
    for i in range(trials):
        depth = i / (trials - 1) if trials > 1 else 0.5
        prompt = passkey_prompt(tokenizer, length=length, depth=depth, key=f"{rng.randrange(10_000, 100_000)}")
        ids = prompt.ids
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        answer = tokenizer.decode(out[0, ids.shape[1] :].tolist())
        rows.append({"depth": round(depth, 4), "key": prompt.key, "answer": answer, "correct": prompt.key in answer})
    return {"accuracy": sum(r["correct"] for r in rows) / max(trials, 1), "trials": rows}
