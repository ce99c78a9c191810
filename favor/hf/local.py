"""Exact local terms: FAVOR for the far keys, exact exp(q.k) for each query's nearest keys.

Pretrained encoders put much of each query's attention on a few keys: its neighbours and the
first token (an "attention sink"). Those pairs also have the largest q.k, where the random
features' relative variance, exp(|q + k|^2) - 1, is worst. Here the weights of the keys
within ``window`` positions of the query, and of the first ``sinks`` positions, are computed
exactly, and FAVOR estimates the rest:

    num_i = phi(q_i).(sum_j phi(k_j) v_j) - sum_{j in E(i)} phi(q_i).phi(k_j) v_j + sum_{j in E(i)} exp(s_ij) v_j

and likewise the normaliser with v = 1. The far keys' estimate stays unbiased, and the exact
set E(i) has at most 2 * window + 1 + sinks keys, so time and memory stay linear in length.
With a window covering the whole sequence the output is softmax attention exactly (tested).

``log_const`` is log E[phi(q).phi(k)] - q.k for the feature map at hand: 0 for FAVOR+ and
FAVOR++, and a per-head constant for favor.hf's dense-exponential features (adapter.py).

Legend: B batch, H heads, Lq = Lk = L positions, M' features, E exact keys per query.
"""

from __future__ import annotations

import torch

from ..attention._normalise import exp_diff, masked_keys, max_log_scale, normalise
from ..features.maps import Features

__all__ = ["local_exact_attention", "exact_positions", "local_exact_reference"]


def exact_positions(length: int, window: int, sinks: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(index (L, E) long, valid (L, E) bool): the keys whose weight is exact for each query.
    Neighbours i - window .. i + window inside [0, L), then sinks 0 .. sinks-1 not already
    among the neighbours; invalid slots point at key 0 and must be ignored."""
    if window < 0 and sinks <= 0:
        raise ValueError(f"an exact set needs window >= 0 or sinks > 0, got window={window}, sinks={sinks}")
    i = torch.arange(length, device=device)[:, None]
    parts, valid = [], []
    if window >= 0:
        j = i + torch.arange(-window, window + 1, device=device)[None, :]
        parts.append(j)
        valid.append((j >= 0) & (j < length))
    if sinks > 0:
        j = torch.arange(min(sinks, length), device=device)[None, :].expand(length, -1)
        parts.append(j)
        valid.append((i - j).abs() > window if window >= 0 else torch.ones_like(j, dtype=torch.bool))
    index, ok = torch.cat(parts, 1), torch.cat(valid, 1)
    return index.where(ok, torch.zeros_like(index)), ok


def _gather_keys(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (..., L, C), index (L, E) -> (..., L, E, C)."""
    return x[..., index, :]


def local_exact_attention(
    fq: Features,
    fk: Features,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    sinks: int,
    log_const: torch.Tensor | float = 0.0,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Bidirectional FAVOR with exact local terms (module docstring), linear in L.

    fq, fk: features of the queries and keys (..., L, M'); q, k (..., L, D): the inputs whose
    dot products the features estimate (already scaled); v (..., L, Dv); ``log_const``: a
    float or a tensor broadcasting against (..., 1, 1) (per head); ``key_padding_mask`` bool
    (B, L), True for padding. Returns (..., L, Dv)."""
    length = q.shape[-2]
    if k.shape[-2] != length:
        raise ValueError(f"exact local terms need as many queries as keys, got {length} and {k.shape[-2]}")
    index, ok = exact_positions(length, window, sinks, device=q.device)
    mask = None if key_padding_mask is None else key_padding_mask[:, None, :]  # (B, 1, L) over heads
    values, log_scale = masked_keys(fk, mask)
    ref = max_log_scale(log_scale)  # (..., 1): one shift per (batch, head), as key_summary
    weighted = values * exp_diff(log_scale, ref)[..., None]  # (..., L, M'), padded rows 0
    kv, z = weighted.transpose(-1, -2) @ v, weighted.sum(-2)
    num_rf = fq.values @ kv  # (..., L, Dv), in units of exp(log_scale_q + ref)
    den_rf = (fq.values @ z[..., None])[..., 0]

    near_f = _gather_keys(weighted, index)  # (..., L, E, M')
    rf_near = (near_f @ fq.values[..., None])[..., 0]  # (..., L, E): the far sum's overcount
    near_v = _gather_keys(v, index)  # (..., L, E, Dv)
    logits = (_gather_keys(k, index) @ q[..., None])[..., 0]  # (..., L, E)
    live = ok
    if key_padding_mask is not None:
        live = live & ~key_padding_mask[:, None, index]  # (B, 1, L, E) over heads
    logits = logits.masked_fill(~live, float("-inf"))
    rf_near = rf_near.masked_fill(~live, 0.0)
    # exact weights in the far sum's units: exp(s + log_const - log_scale_q - ref)
    q_scale = fq.log_scale if fq.log_scale is not None else torch.zeros_like(den_rf)
    log_exact = logits + log_const - q_scale[..., None] - ref[..., None]
    # one more shift per query so that neither part overflows
    top = log_exact.amax(-1).clamp_min(0.0).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    exact = torch.exp(log_exact - top[..., None])  # -inf (masked) -> 0
    far = torch.exp(-top)
    far_num = num_rf - (rf_near[..., None] * near_v).sum(-2)
    far_den = (den_rf - rf_near.sum(-1)).clamp_min(0.0)  # >= 0 in exact arithmetic
    num = far[..., None] * far_num + (exact[..., None] * near_v).sum(-2)
    den = far * far_den + exact.sum(-1)
    return normalise(num, den, None)


def local_exact_reference(
    kernel: torch.Tensor,
    logits: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    sinks: int,
    log_const: torch.Tensor | float = 0.0,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same, quadratic and explicit: ``kernel`` (..., L, L) the features' estimate of
    exp(s_ij) * exp(log_const), ``logits`` s (..., L, L). For tests."""
    length = logits.shape[-1]
    index, ok = exact_positions(length, window, sinks, device=logits.device)
    near = torch.zeros(length, length, dtype=torch.bool, device=logits.device)
    near[torch.arange(length, device=logits.device)[:, None].expand_as(index)[ok], index[ok]] = True
    weights = torch.where(near, torch.exp(logits + log_const), kernel)
    if key_padding_mask is not None:
        weights = weights.masked_fill(key_padding_mask[:, None, None, :], 0.0)
    num = weights @ v
    return normalise(num, weights.sum(-1), None)
