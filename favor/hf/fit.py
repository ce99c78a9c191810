"""Fit each layer's feature map to its softmax attention on calibration text (no model weights change).

The unbiased random features of FAVOR+/FAVOR++ need M ~ exp(|q|^2 + |k|^2) (scaled) for a
small error, and pretrained layers have |q|^2, |k|^2 of 3-40: no M in the hundreds makes
the swap accurate. Here the adapter's parameters (query map, key map, key shift, and the
projection W of the positive-exponential features; with exact local terms also the far
keys' gain) are instead fitted, layer by layer, to
reproduce the layer's softmax attention output on the softmax model's own queries, keys and
values (so errors do not compound while fitting). The features keep FAVOR's form
exp(w.x - |x|^2/2) and the attention stays linear in length; they are learned rather than
random (cf. Hedgehog, Zhang et al., ICLR 2024, which fits feature maps the same way).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .adapter import ATTRIBUTE
from .interface import favor_attention_forward
from .registry import probing
from .tie import key_groups, tie_adapter_

__all__ = ["record_attention", "fit_adapters"]

log = logging.getLogger(__name__)

_PARAMS = ("query_map", "key_map", "key_shift")


@torch.no_grad()
def record_attention(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]):
    """Run the softmax model and keep every attention call's inputs and output:
    {module: [(q, k, v, mask, scaling, is_causal, softmax_out, query_keep)]} in layer order."""
    calls: dict[nn.Module, list] = {}
    keep_mask = None

    def record(module, query, key, value, attention_mask, scaling, is_causal):
        ref, _ = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, is_causal=is_causal)
        keep = None if keep_mask is None or keep_mask.shape[1] != query.shape[2] else keep_mask.bool()
        calls.setdefault(module, []).append(
            (query.float(), key.float(), value.float(), attention_mask, scaling, is_causal, ref.float(), keep)
        )

    with probing(model, record):
        for b in batches:
            keep_mask = b.get("attention_mask")
            model(**b)
    return calls


def _loss(module, call) -> torch.Tensor:
    q, k, v, mask, scaling, is_causal, ref, keep = call
    out, _ = favor_attention_forward(module, q, k, v, mask, scaling=scaling, is_causal=is_causal)
    diff = (out - ref) ** 2
    den = ref**2
    if keep is not None:  # (B, Lq): real tokens only
        w = keep[:, :, None, None].to(diff.dtype)
        diff, den = diff * w, den * w
    return diff.sum() / den.sum().clamp_min(1e-12)


def fit_adapters(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    steps: int = 150,
    lr: float = 3e-3,
    gain_lr: float | None = None,
    fit_projection: bool = True,
    progress: Callable[[int, int, float], None] | None = None,
    max_seconds: float | None = None,
    tie_keys: bool = False,
) -> list[tuple[float, float]]:
    """Fit every FavorAdapter of a performerized ``model`` on ``batches`` (Adam, ``steps`` full
    passes per layer; with ``max_seconds``, each layer also stops after its equal share of that
    time; ``gain_lr``: the far gain's rate, None for ``lr``). Returns [(relative error
    before, after)] per layer, on the fitting data. ``tie_keys``: the key side tied per
    key/value group of GQA layers, put back on each group's mean after every step
    (favor.hf.tie).
    ``progress(layer, step, loss)`` is called after every step (the CLI draws a bar from it)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if gain_lr is not None and not gain_lr > 0:
        raise ValueError(f"gain_lr must be > 0 or None, got {gain_lr!r}")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0 or None, got {max_seconds!r}")
    calls = record_attention(model, list(batches))
    share = None if max_seconds is None else max_seconds / max(len(calls), 1)
    results = []
    for layer, (module, recorded) in enumerate(calls.items()):
        adapter = getattr(module, ATTRIBUTE)
        fm = adapter.feature_map
        adapter.calibrated.fill_(True)
        tie_groups = key_groups(module) if tie_keys else 1
        tie_adapter_(adapter, tie_groups)  # before the buffers become leaves (dense a may rewrite the projection)
        names = list(_PARAMS) + (["projection"] if fit_projection and fm.projection is not None else [])
        names += ["far_log_gain"] if adapter.local else []
        owners = {n: (fm if n == "projection" else adapter) for n in names}
        params = {n: getattr(owners[n], n).detach().clone().float().requires_grad_(True) for n in names}
        for n, p in params.items():
            setattr(owners[n], n, p)  # buffers may hold tensors that require grad
        own_rate = gain_lr is not None and "far_log_gain" in params
        groups = [{"params": [p for n, p in params.items() if not (own_rate and n == "far_log_gain")]}]
        groups += [{"params": [params["far_log_gain"]], "lr": gain_lr}] if own_rate else []
        opt = torch.optim.Adam(groups, lr=lr)
        with torch.no_grad():
            before = float(sum(_loss(module, c) for c in recorded) / len(recorded)) ** 0.5
        initial = {n: p.detach().clone() for n, p in params.items()}
        started = time.perf_counter()
        for step in range(steps):
            if share is not None and step and time.perf_counter() - started > share:
                break
            opt.zero_grad(set_to_none=True)
            loss = sum(_loss(module, c) for c in recorded) / len(recorded)
            loss.backward()
            opt.step()
            tie_adapter_(adapter, tie_groups)
            if progress is not None:
                progress(layer, step, float(loss))
        with torch.no_grad():
            after = float(sum(_loss(module, c) for c in recorded) / len(recorded)) ** 0.5
        final = {n: p.detach().clone() for n, p in params.items()}
        if not after < before:  # never leave a layer worse than it came
            final, after = initial, before
        for n, p in final.items():
            setattr(owners[n], n, p.to(getattr(owners[n], n).dtype))
        results.append((before, after))
        log.info("layer %d: relative attention error %.4f -> %.4f", layer, before, after)
    return results
