"""How close a performerized model is to its softmax self.

Both are the same model object: ``attn_implementation`` "sdpa" gives the softmax model and
"favor" the Performer, so no weights are copied.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .interface import favor_attention_forward
from .models import builtin_documents, builtin_texts, interleave, model_texts
from .registry import NAME, probing

__all__ = [
    "mean_pool",
    "embeddings",
    "embedding_cosine",
    "layer_errors",
    "tokenize_batches",
    "packed_texts",
    "packed_documents",
    "embedding_cosines",
    "split_texts",
    "max_length",
    "eval_lengths",
    "held_out_batches",
    "EVAL_LENGTHS",
    "MASKED_LM_LENGTH",
]


def tokenize_batches(tokenizer, texts: list[str], *, batch_size: int = 16, max_length: int = 128) -> list[dict]:
    """Tokenized batches (padded to the longest in each batch)."""
    return [
        dict(
            tokenizer(
                texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
        )
        for i in range(0, len(texts), batch_size)
    ]


def packed_texts(tokenizer, texts: list[str], *, length: int, count: int | None = None) -> list[str]:
    """Consecutive ``texts`` joined (with a space) until each passage holds at least ``length``
    tokens with the special tokens, so that ``tokenize_batches(..., max_length=length)`` cuts
    every passage to exactly ``length`` tokens: long held-out inputs from a split of short
    passages. No line is used twice; a last passage that stays short is dropped. At most
    ``count`` passages (all that the text gives when None)."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 3:
        raise ValueError(f"length must be an int >= 3 (room for the special tokens), got {length!r}")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"count must be a positive int or None, got {count!r}")
    special = len(tokenizer("", add_special_tokens=True)["input_ids"])
    out: list[str] = []
    parts: list[str] = []
    tokens = 0
    for line in texts:
        parts.append(line)
        tokens += len(tokenizer(line, add_special_tokens=False)["input_ids"])
        if tokens + special >= length:
            out.append(" ".join(parts))
            parts, tokens = [], 0
            if count is not None and len(out) == count:
                break
    return out


def packed_documents(tokenizer, documents: list[list[str]], *, length: int, count: int | None = None) -> list[str]:
    """``packed_texts`` of each document (lines of one domain), one passage of each in turn
    while every document has one left, then the rest: no passage joins two documents' text.
    At most ``count`` passages."""
    out = interleave([packed_texts(tokenizer, d, length=length, count=count) for d in documents])
    return out[:count] if count is not None else out


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings (B, C): mean over non-padding tokens, L2-normalised (sentence-transformers)."""
    m = attention_mask[..., None].to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1)


@torch.no_grad()
def embeddings(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *, attn: str) -> torch.Tensor:
    """Mean-pooled embeddings of every sequence under ``attn`` ("sdpa" or "favor")."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(attn)
    try:
        out = []
        for b in batches:
            hidden = model(**b, output_hidden_states=True).hidden_states[-1]
            out.append(mean_pool(hidden.float(), b["attention_mask"]))
        return torch.cat(out)
    finally:
        model.set_attn_implementation(previous)


def embedding_cosines(
    model: nn.Module, batches: Mapping[int, list[Mapping[str, torch.Tensor]]], refs: Mapping[int, torch.Tensor]
) -> dict[str, tuple[float, float]]:
    """Per length (as a string): (mean, min) cosine of the FAVOR embeddings of ``batches[n]``
    to the softmax ones given in ``refs[n]`` (``embeddings(model, batches[n], attn="sdpa")``)."""
    out = {}
    for n, b in batches.items():
        cos = (embeddings(model, b, attn=NAME) * refs[n]).sum(-1)
        out[str(n)] = (float(cos.mean()), float(cos.min()))
    return out


def embedding_cosine(model: nn.Module, batches: list[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """Cosine between softmax and FAVOR sentence embeddings, one per sequence."""
    ref = embeddings(model, batches, attn="sdpa")
    got = embeddings(model, batches, attn=NAME)
    return (ref * got).sum(-1)


@torch.no_grad()
def layer_errors(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> list[float]:
    """Per attention layer: |favor - softmax| / |softmax| of its output on the softmax model's
    own queries, keys and values (so errors do not compound), over non-padding queries."""
    num: dict[int, float] = {}
    den: dict[int, float] = {}
    order: list[int] = []

    def record(module, query, key, value, attention_mask, scaling, is_causal):
        ref, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, is_causal=is_causal)
        got, _ = favor_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, is_causal=is_causal
        )
        diff, ref = (got - ref).double(), ref.double()
        if current_mask is not None:  # (B, L): keep real tokens only
            keep = current_mask[:, : ref.shape[1], None, None].to(ref.dtype)
            diff, ref = diff * keep, ref * keep
        i = id(module)
        if i not in num:
            order.append(i)
            num[i] = den[i] = 0.0
        num[i] += float((diff**2).sum())
        den[i] += float((ref**2).sum())

    current_mask = None
    with probing(model, record):
        for b in batches:
            current_mask = b.get("attention_mask")
            model(**b)
    return [(num[i] / max(den[i], 1e-300)) ** 0.5 for i in order]


#: tokens per sequence for a protein masked LM: a whole antibody V region (~110-130 residues)
MASKED_LM_LENGTH = 160


def max_length(given: int | None, kind: str, default: int) -> int:
    """``given``, else a whole V region for a masked LM, else ``default``."""
    if given is not None:
        return given
    return MASKED_LM_LENGTH if kind == "masked-lm" else default


def split_texts(split: str, kind: str, limit: int | None = None) -> list[str]:
    """The first ``limit`` texts of a built-in split or file, as the model reads them."""
    return model_texts(builtin_texts(split, kind)[:limit], kind)


#: held-out lengths that `favor performerize` and `favor distill` report for a sentence encoder: the built-in held-out
#: split packed (consecutive passages joined) to exactly this many tokens
EVAL_LENGTHS = (128, 512)


def eval_lengths(given: list[int] | None, kind: str, masked_lm_length: int, *, limit: int = 1 << 30) -> list[int]:
    """The held-out lengths to report: ``given``, else ``EVAL_LENGTHS`` capped at ``limit``
    (the model's positions; a masked LM: its own whole sequences, ``masked_lm_length``, not packed)."""
    if given:
        bad = [n for n in given if n < 3]
        if bad:
            raise ValueError(f"--eval-length must be >= 3 tokens, got {bad}")
        return list(given)
    if kind == "masked-lm":
        return [masked_lm_length]
    return list(dict.fromkeys(min(n, limit) for n in EVAL_LENGTHS))


def held_out_batches(tok, split: str, kind: str, *, length: int, count: int, batch_size: int = 16) -> list[dict]:
    """Tokenized held-out batches at ``length`` tokens: for a sentence encoder ``count``
    passages packed to exactly ``length`` tokens (packed_documents: a passage is one domain's
    text), for a masked LM the
    first ``count`` sequences cut at ``length``."""
    if kind == "masked-lm":
        return tokenize_batches(tok, split_texts(split, kind, count), batch_size=batch_size, max_length=length)
    packed = packed_documents(tok, builtin_documents(split, kind), length=length, count=count)
    if not packed:
        raise ValueError(f"the {split!r} text is too short for one passage of {length} tokens")
    return tokenize_batches(tok, packed, batch_size=batch_size, max_length=length)
