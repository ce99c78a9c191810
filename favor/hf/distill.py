"""Distillation: fine-tune a performerized model to reproduce its softmax teacher on unlabeled text.

Student and teacher start from the same weights; the teacher keeps softmax attention. The
loss matches every layer's hidden states (MSE over real tokens, normalised by the teacher's
variance; ``hidden_weight``) plus 1 - cosine of the mean-pooled embeddings
(``embedding_weight``), plus, for a model with an LM head (masked LMs such as AntiBERTy, causal
LMs), the KL divergence from the teacher's token distributions (``logit_weight``). A decoder
(favor.hf.linearize) trains on the KL alone: ``hidden_weight=0, embedding_weight=0``. The student's weights and its
FAVOR adapters (query/key maps, key shift, projection) are all trained; dropout is off.

``attention_weight`` adds attention transfer (as in LoLCATs, Zhang et al. 2024): every layer's
FAVOR output is also matched to softmax attention on the student's own queries, keys and
values (relative squared error over real tokens, target detached), a dense per-layer signal
that keeps the feature map an approximation of softmax while the projections move.

The teacher's outputs are kept for batches seen again (up to ``teacher_cache_mb``): the same
numbers, one teacher forward fewer per step after the first pass over the batches.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .adapter import ATTRIBUTE
from .fidelity import mean_pool
from .registry import observing
from .tie import tie_keys_

__all__ = ["DistillConfig", "distill", "adapter_tensors", "SCHEDULES", "TRAINABLE"]

#: learning-rate schedules over the run (by elapsed fraction of steps or of the time budget,
#: whichever is further along): constant, or cosine decay to 10 % after a linear warm-up
SCHEDULES = ("constant", "cosine")
#: which student weights train besides the FAVOR adapters: every weight, only the
#: self-attention layers' query/key projections, all of the attention layers' projections
#: (query, key, value and output; the rest stays the teacher's), or none ("adapters": only
#: FAVOR's estimate of the far keys moves, the exact terms stay the teacher's attention)
TRAINABLE = ("all", "query-key", "attention", "adapters")
_QUERY_KEY = ("query", "key", "q_proj", "k_proj")  # BERT, Llama
_VALUE_OUTPUT = ("value", "v_proj", "o_proj")  # BERT's output projection is its parent's output.dense

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 400
    max_seconds: float = 540.0
    lr: float = 1e-4
    adapter_lr: float = 3e-3
    #: the far gain's own rate (None: adapter_lr): Adam moves a tensor by about its rate per
    #: step, and the far gain must travel units of log-weight in tens of steps
    gain_lr: float | None = None
    embedding_weight: float = 1.0
    logit_weight: float = 1.0
    seed: int = 0
    schedule: str = "constant"
    warmup_steps: int = 10
    train: str = "all"
    attention_weight: float = 0.0
    teacher_cache_mb: float = 2048.0
    hidden_weight: float = 1.0
    #: the key side (shift, key map, dense a) tied per key/value group of GQA layers, put back
    #: on each group's mean after every step (favor.hf.tie): decoding keeps the far state once
    #: per key/value head
    tie_keys: bool = False

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.train not in TRAINABLE:
            raise ValueError(f"train must be one of {TRAINABLE}, got {self.train!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not self.embedding_weight >= 0:
            raise ValueError(f"embedding_weight must be >= 0, got {self.embedding_weight}")
        if not self.hidden_weight >= 0:
            raise ValueError(f"hidden_weight must be >= 0, got {self.hidden_weight}")
        if not self.attention_weight >= 0:
            raise ValueError(f"attention_weight must be >= 0, got {self.attention_weight}")
        if not self.teacher_cache_mb >= 0:
            raise ValueError(f"teacher_cache_mb must be >= 0, got {self.teacher_cache_mb}")
        if not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0, got {self.max_seconds}")
        if self.gain_lr is not None and not self.gain_lr > 0:
            raise ValueError(f"gain_lr must be > 0 or None, got {self.gain_lr}")


def adapter_tensors(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(owner, buffer name) of every trainable FAVOR buffer: maps, shift, projection, and with
    exact local terms the far keys' gain."""
    out = []
    for module in model.modules():
        adapter = getattr(module, ATTRIBUTE, None)
        if adapter is None or not isinstance(adapter, nn.Module):
            continue
        out += [(adapter, "query_map"), (adapter, "key_map"), (adapter, "key_shift")]
        if adapter.local:
            out.append((adapter, "far_log_gain"))
        if adapter.feature_map.projection is not None:
            out.append((adapter.feature_map, "projection"))
    return out


def _projections(model: nn.Module, train: str) -> list[nn.Module]:
    """The projection modules that ``train`` ("query-key" or "attention") trains: the
    performerized attention modules' query/key projections, with "attention" also their value
    and output projections (Llama's o_proj; BERT's sibling ``output.dense``)."""
    names = _QUERY_KEY + (_VALUE_OUTPUT if train == "attention" else ())
    out = []
    for parent in model.modules():
        for child_name, m in parent.named_children():
            if not isinstance(getattr(m, ATTRIBUTE, None), nn.Module):
                continue
            out += [getattr(m, n) for n in names if isinstance(getattr(m, n, None), nn.Module)]
            sibling = getattr(getattr(parent, "output", None), "dense", None)
            if train == "attention" and child_name == "self" and isinstance(sibling, nn.Module):
                out.append(sibling)  # BERT: BertAttention.self (scores) and .output.dense (projection)
    return out


def _fits(elapsed: float, steps: int, budget: float) -> bool:
    return elapsed + (elapsed / steps if steps else 0.0) < budget


def _hidden(model, batch, *, grad: bool):
    with torch.set_grad_enabled(grad):
        return model(**batch, output_hidden_states=True)


def _nbytes(out) -> int:
    tensors = list(out.hidden_states) + [getattr(out, "logits", None)]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _student_with_transfer(student, batch):
    """Student forward that also returns the attention-transfer loss: mean over attention calls
    of |favor - softmax|^2 / |softmax|^2 on the call's own q, k, v (real query tokens only)."""
    keep_tokens = batch["attention_mask"].bool()
    terms = []

    def observe(module, query, key, value, attention_mask, scaling, is_causal, out):
        with torch.no_grad():
            ref, _ = sdpa_attention_forward(
                module,
                query.detach(),
                key.detach(),
                value.detach(),
                attention_mask,
                scaling=scaling,
                is_causal=is_causal,
            )
        dt = torch.promote_types(out.dtype, torch.float32)  # half precision in float32
        diff, ref = (out.to(dt) - ref.to(dt)) ** 2, ref.to(dt) ** 2  # (B, Lq, H, D)
        if keep_tokens.shape[1] == out.shape[1]:
            w = keep_tokens[:, :, None, None].to(diff.dtype)
            diff, ref = diff * w, ref * w
        terms.append(diff.sum() / ref.sum().clamp_min(1e-12))

    with observing(student, observe):
        out = _hidden(student, batch, grad=True)
    return out, torch.stack(terms).mean()


def _logit_kl(student_logits, teacher_logits, keep) -> torch.Tensor:
    """Mean over real tokens of KL(teacher || student) of the output distributions."""
    t = torch.log_softmax(teacher_logits.float(), -1)
    s = torch.log_softmax(student_logits.float(), -1)
    kl = (t.exp() * (t - s)).sum(-1)
    w = keep.to(kl.dtype)
    return (kl * w).sum() / w.sum().clamp_min(1.0)


def _loss(
    student_out, teacher_out, keep, weight: float, logit_weight: float = 0.0, hidden_weight: float = 1.0
) -> torch.Tensor:
    student_h, teacher_h = student_out.hidden_states, teacher_out.hidden_states
    w = keep[..., None].to(teacher_h[-1].dtype)
    n = w.sum()
    total = 0.0
    if hidden_weight:
        for s, t in zip(student_h[1:], teacher_h[1:], strict=True):  # [0] is the embedding layer, shared
            var = ((t * w) ** 2).sum() / (n * t.shape[-1])
            total = total + (((s - t) ** 2) * w).sum() / (n * t.shape[-1]) / var.clamp_min(1e-12)
        total = hidden_weight * total / (len(student_h) - 1)
    if weight:
        cos = (mean_pool(student_h[-1], keep) * mean_pool(teacher_h[-1], keep)).sum(-1)
        total = total + weight * (1.0 - cos).mean()
    if logit_weight and getattr(teacher_out, "logits", None) is not None:
        total = total + logit_weight * _logit_kl(student_out.logits, teacher_out.logits, keep)
    return total


def distill(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]],
    config: DistillConfig = DistillConfig(),
    *,
    on_step: Callable[[int, float], None] | None = None,
    evaluate: Callable[[int], None] | None = None,
    eval_every: int = 25,
) -> list[float]:
    """Train ``student`` (performerized) towards ``teacher`` (softmax) on ``batches`` cycled in a
    seeded random order, for ``config.steps`` steps or ``config.max_seconds``, whichever first.
    Returns the loss per step. ``evaluate(step)`` is called every ``eval_every`` steps and at the end."""
    if not batches:
        raise ValueError("batches is empty")
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
        raise ValueError(f"eval_every must be an int >= 1, got {eval_every!r}")
    g = torch.Generator().manual_seed(config.seed)
    teacher.eval()
    student.eval()  # dropout off: the target is the deterministic teacher
    if config.tie_keys:  # before the buffers become leaves (an untied dense a rewrites the projection)
        tie_keys_(student)
    owned = adapter_tensors(student)
    extra, gains = [], []
    for owner, name in owned:
        t = getattr(owner, name).detach().clone().float().requires_grad_(True)
        setattr(owner, name, t)  # a buffer may hold a tensor that requires grad
        (gains if name == "far_log_gain" and config.gain_lr is not None else extra).append(t)
    for module in student.modules():
        adapter = getattr(module, ATTRIBUTE, None)
        if isinstance(adapter, nn.Module):
            adapter.calibrated.fill_(True)
    if config.train == "adapters":
        for p in student.parameters():
            p.requires_grad_(False)
    elif config.train != "all":
        keep = {id(p) for m in _projections(student, config.train) for p in m.parameters()}
        if not keep:
            raise ValueError(f"train={config.train!r} found no attention modules with projections named {_QUERY_KEY}")
        for p in student.parameters():
            p.requires_grad_(id(p) in keep)
    params = [p for p in student.parameters() if p.requires_grad]
    groups = [{"params": params, "lr": config.lr}] if params else []
    groups.append({"params": extra, "lr": config.adapter_lr, "weight_decay": 0.0})
    if gains:
        groups.append({"params": gains, "lr": config.gain_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    losses: list[float] = []
    start = time.perf_counter()
    order: list[int] = []
    cache: dict[int, object] = {}
    cached = 0
    step = 0
    if evaluate is not None:
        evaluate(0)
    base_lrs = [g["lr"] for g in opt.param_groups]
    # a step is not begun unless the mean step so far still fits: on a CPU one step of a
    # 135M decoder takes a minute, and the budget is the user's wall clock
    while step < config.steps and _fits(time.perf_counter() - start, step, config.max_seconds):
        if config.schedule == "cosine":
            done = max(step / config.steps, (time.perf_counter() - start) / config.max_seconds)
            factor = min(1.0, (step + 1) / max(config.warmup_steps, 1)) * (0.1 + 0.45 * (1 + math.cos(math.pi * done)))
            for group, lr in zip(opt.param_groups, base_lrs, strict=True):
                group["lr"] = lr * factor
        if not order:
            order = torch.randperm(len(batches), generator=g).tolist()
        index = order.pop()
        batch = batches[index]
        teacher_out = cache.get(index)
        if teacher_out is None:
            teacher_out = _hidden(teacher, batch, grad=False)
            size = _nbytes(teacher_out)
            if cached + size <= config.teacher_cache_mb * 2**20:  # the same numbers next time round
                cache[index], cached = teacher_out, cached + size
        keep = batch["attention_mask"].bool()
        if config.attention_weight:
            student_out, transfer = _student_with_transfer(student, batch)
        else:
            student_out, transfer = _hidden(student, batch, grad=True), 0.0
        loss = _loss(student_out, teacher_out, keep, config.embedding_weight, config.logit_weight, config.hidden_weight)
        loss = loss + config.attention_weight * transfer
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params + extra + gains, 1.0)
        opt.step()
        if config.tie_keys:
            tie_keys_(student)
        step += 1
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
        if evaluate is not None and step % eval_every == 0:
            evaluate(step)
    if evaluate is not None and step % eval_every:
        evaluate(step)
    for owner, name in owned:
        setattr(owner, name, getattr(owner, name).detach())
    log.info("distilled %d steps in %.0f s", step, time.perf_counter() - start)
    return losses
