"""Bidirectional FAVOR: out = phi(Q) (phi(K)^T V) / phi(Q) (phi(K)^T 1), linear in L."""

from __future__ import annotations

import torch

from ..features.maps import Features
from .normalise import exp_diff, masked_keys, max_log_scale, normalise

__all__ = ["bidirectional", "key_summary"]


def key_summary(fk: Features, v: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """phi(K)^T V (..., M', Dv) and phi(K)^T 1 (..., M'), both up to one common positive
    factor per (batch, head) that cancels in the output. Padded keys count in neither."""
    values, log_scale = masked_keys(fk, mask)
    ref = max_log_scale(log_scale)  # one shift per (batch, head): cancels exactly
    weighted = values * exp_diff(log_scale, ref)[..., None]
    return weighted.transpose(-1, -2) @ v, weighted.sum(-2)


def bidirectional(
    fq: Features,
    fk: Features,
    v: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    guard: float | None = None,
) -> torch.Tensor:
    """fq (..., Lq, M'), fk (..., Lk, M'), v (..., Lk, Dv) -> (..., Lq, Dv).

    The query log scale is one factor per row and cancels, so it is not used."""
    kv, z = key_summary(fk, v, key_padding_mask)
    num = fq.values @ kv
    den = (fq.values @ z[..., None])[..., 0]
    return normalise(num, den, guard)
