"""Exact references, slow on purpose: they build the L x L matrix.

- ``softmax_attention``: exact softmax attention, what FAVOR estimates.
- ``kernel_matrix`` / ``kernel_attention``: the random-feature attention written as
  A = phi(Q) phi(K)^T explicitly, then masked and row-normalised. Every fast path
  (bidirectional, causal chunked, recurrent step) must equal ``kernel_attention`` given the
  same feature map.
"""

from __future__ import annotations

import torch

from ..features.feature_map import FeatureMap
from .checks import check_feature_map, check_qkv, check_scale, compute_dtype, key_mask
from .normalise import exp_diff, masked_keys, max_log_scale

__all__ = ["softmax_attention", "kernel_attention", "kernel_matrix"]


def _visibility(lq: int, lk: int, causal: bool, mask: torch.Tensor | None, device) -> torch.Tensor | None:
    """Bool (..., Lq, Lk), True where query i may see key j; None when all may."""
    vis = torch.ones(lq, lk, dtype=torch.bool, device=device).tril() if causal else None
    if mask is not None:
        keep = ~mask[..., None, :]
        vis = keep if vis is None else vis & keep
    return vis


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(Q K^T scale + mask) V, exactly; a row with no visible key returns 0."""
    check_qkv(q, k, v, causal=causal)
    s = check_scale(scale, q.shape[-1])
    mask = key_mask(key_padding_mask, k)
    dtype = compute_dtype(q.dtype)
    logits = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * s
    vis = _visibility(q.shape[-2], k.shape[-2], causal, mask, q.device)
    if vis is not None:
        logits = logits.masked_fill(~vis, float("-inf"))
    row_max = logits.amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    weights = torch.exp(logits - row_max)
    den = weights.sum(-1, keepdim=True)
    out = (weights @ v.to(dtype)) / torch.where(den == 0, torch.ones_like(den), den)
    return out.to(v.dtype)


def kernel_matrix(
    q: torch.Tensor,
    k: torch.Tensor,
    feature_map: FeatureMap,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    normalised: bool = True,
) -> torch.Tensor:
    """The approximated attention matrix (..., Lq, Lk). With ``normalised`` each row is
    divided by its sum (the approximation of softmax's weights, guard included for the
    official stabilizer); without, it is phi(q_i).phi(k_j) up to one positive factor per row."""
    check_feature_map(feature_map)
    check_qkv(q, k, k, causal=causal)
    root = check_scale(scale, q.shape[-1]) ** 0.5
    mask = key_mask(key_padding_mask, k)
    dtype = compute_dtype(q.dtype)
    qs, ks = q.to(dtype) * root, k.to(dtype) * root
    q_mask = mask if (mask is not None and q.shape[-2] == k.shape[-2]) else None
    fq, fk = feature_map.pair(qs, ks, causal=causal, q_mask=q_mask, k_mask=mask)
    k_values, k_log = masked_keys(fk, mask)
    # one shift per (batch, head) over all keys: a common factor, so it cancels
    k_values = k_values * exp_diff(k_log, max_log_scale(k_log))[..., None]
    a = fq.values @ k_values.transpose(-1, -2)
    vis = _visibility(q.shape[-2], k.shape[-2], causal, mask, q.device)
    if vis is not None:
        a = torch.where(vis, a, torch.zeros_like(a))
    if not normalised:
        return a
    den = a.sum(-1, keepdim=True)
    if feature_map.stabilizer == "official":
        den = den + 2.0 * feature_map.eps * (den.abs() <= feature_map.eps).to(den.dtype)
    return torch.where(den == 0, torch.zeros_like(a), a / torch.where(den == 0, torch.ones_like(den), den))


def kernel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: FeatureMap,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Random-feature attention through the explicit L x L matrix (the fast paths' reference)."""
    check_qkv(q, k, v, causal=causal)
    a = kernel_matrix(q, k, feature_map, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
    return (a @ v.to(a.dtype)).to(v.dtype)
