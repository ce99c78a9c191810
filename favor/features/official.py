"""The official Google Research FAVOR+ numerics (performer/fast_attention/jax), restated
so that numbers from the paper's code can be reproduced side by side with favor's own.

Differences from favor's default ("exact") numerics, all deliberate here:
- positive keys share one shift c_K = max over *all* key positions and features of Wx,
  and eps is added after the exp: causal outputs then depend on future keys, and eps
  adds uniform attention whose weight grows with c_K (see shared/reference/README.md);
- trig features are scaled by exp(h - max_l h) over the sequence, ratio 1/sqrt(M) on 2M
  features;
- the normaliser gets the guard R + 2 eps [|R| <= eps] (applied by the attention paths).
Returns ``Features(values, None)``: these features are explicit, no log scale.
"""

from __future__ import annotations

import math

import torch

from .maps import Features

__all__ = ["positive_official", "trig_official"]


def _masked_max(t: torch.Tensor, row_mask: torch.Tensor | None, dims: tuple[int, ...]) -> torch.Tensor:
    if row_mask is not None:
        t = t.masked_fill(row_mask[..., None], float("-inf"))
    if any(t.shape[d] == 0 for d in dims):  # an empty sequence: nothing to shift by
        return t.new_zeros([1 if (d - t.ndim in dims or d in dims) else n for d, n in enumerate(t.shape)])
    out = t.amax(dim=dims, keepdim=True)
    return torch.where(torch.isfinite(out), out, torch.zeros_like(out))


def positive_official(
    x: torch.Tensor, w: torch.Tensor, *, is_query: bool, eps: float, mask: torch.Tensor | None = None
) -> Features:
    s = x @ w.T  # (..., L, M)
    h = 0.5 * (x * x).sum(-1, keepdim=True)
    # query: per-row max (no leak); keys: one max over the whole (unpadded) key sequence
    shift = s.amax(-1, keepdim=True) if is_query else _masked_max(s, mask, (-2, -1))
    return Features((torch.exp(s - h - shift) + eps) / math.sqrt(w.shape[0]), None)


def trig_official(x: torch.Tensor, w: torch.Tensor, *, mask: torch.Tensor | None = None) -> Features:
    s = x @ w.T
    h = 0.5 * (x * x).sum(-1, keepdim=True)
    g = torch.exp(h - _masked_max(h, mask, (-2,)))
    return Features(torch.cat([torch.cos(s), torch.sin(s)], dim=-1) * g / math.sqrt(w.shape[0]), None)
