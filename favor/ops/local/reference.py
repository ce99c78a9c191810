"""The quadratic reference of exact terms: the explicit (L, L) weights, exact where
``exact_mask`` says so, the features' estimate elsewhere. For tests: O(L^2)."""

from __future__ import annotations

import torch

from ...features.feature_map import FeatureMap
from ..checks import check_scale
from .spec import ExactTerms, exact_mask
from .window import explicit_reference

__all__ = ["exact_terms_reference"]


def exact_terms_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: FeatureMap,
    terms: ExactTerms,
    *,
    causal: bool,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    qx: torch.Tensor | None = None,
    kx: torch.Tensor | None = None,
    log_const: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """q, k, v (B, H, L, .) -> (B, H, L, Dv): weights exp(qx.kx + log_const) on the exact set,
    phi(q root).phi(k root) elsewhere (qx, kx default to q root, k root), one normaliser;
    ``key_padding_mask`` (B, L), True for padding."""
    root = check_scale(scale, q.shape[-1]) ** 0.5
    qs, ks = q * root, k * root
    fq, fk = feature_map.pair(qs, ks, causal=causal)
    lq = fq.log_scale if fq.log_scale is not None else torch.zeros_like(qs[..., 0])
    lk = fk.log_scale if fk.log_scale is not None else torch.zeros_like(ks[..., 0])
    kernel = (fq.values @ fk.values.mT) * torch.exp(lq[..., :, None] + lk[..., None, :])
    logits = (qs if qx is None else qx) @ (ks if kx is None else kx).mT
    near = exact_mask(q.shape[-2], terms, causal=causal, device=q.device)
    return explicit_reference(near, kernel, logits, v, log_const, key_padding_mask, causal=causal)
