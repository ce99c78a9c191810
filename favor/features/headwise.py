"""HeadwiseFeatureMap: FAVOR++ with one statistic rho per attention head (favor.hf's
performerized layers calibrate it per head)."""

from __future__ import annotations

import torch

from . import maps
from .buffer_flags import buffer_flag
from .feature_map import FeatureMap

__all__ = ["HeadwiseFeatureMap"]


class HeadwiseFeatureMap(FeatureMap):
    """A FeatureMap whose FAVOR++ statistic rho is one value per head, ``head_rho`` (H,).

    Heads of a pretrained layer have very different query/key norms; one rho per head lets
    each pick its own variance-optimal A*. While ``head_rho`` is unset (NaN) this is the
    parent exactly; once set, the parent's scalar ``rho`` holds their mean, so code that
    only asks "is rho fixed?" sees a fixed rho and asks ``oprf_a``, which answers per head."""

    def __init__(self, kernel: str, *, heads: int, **kwargs) -> None:
        super().__init__(kernel, **kwargs)
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise ValueError(f"heads must be a positive int, got {heads!r}")
        self.heads = heads
        self.register_buffer("head_rho", torch.full((heads,), float("nan"), dtype=torch.float64))

    def oprf_a(self, q, k, *, causal=False, q_mask=None, k_mask=None):
        if buffer_flag(self, "head_rho", self.head_rho, lambda r: torch.isnan(r).any()):
            return super().oprf_a(q, k, causal=causal, q_mask=q_mask, k_mask=k_mask)
        lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
        if len(lead) < 1 or lead[-1] != self.heads:
            raise ValueError(
                f"per-head rho needs q/k shaped (..., H={self.heads}, L, D), got leading shape {tuple(lead)}"
            )
        rho = self.head_rho.to(device=q.device, dtype=q.dtype).expand(lead)  # (H,) broadcasts on (B, H)
        return maps.oprf_a(rho)

    @torch.no_grad()
    def set_head_rho(self, rho: torch.Tensor) -> None:
        """Fix rho per head, (H,) (already-scaled statistics, see ``maps.oprf_rho``)."""
        if tuple(rho.shape) != (self.heads,):
            raise ValueError(f"rho must have shape ({self.heads},), got {tuple(rho.shape)}")
        self.head_rho.copy_(rho)
        self.rho.fill_(float(rho.double().mean()))  # host sync: calibration, once

    @torch.no_grad()
    def calibrate_rho(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """rho per head from already-scaled samples q (H, Nq, D), k (H, Nk, D); returns (H,)."""
        if q.ndim != 3 or k.ndim != 3 or q.shape[0] != self.heads or k.shape[0] != self.heads:
            raise ValueError(
                f"calibrate_rho needs q and k shaped (H={self.heads}, N, D), got {tuple(q.shape)} and {tuple(k.shape)}"
            )
        rho = maps.oprf_rho(q.double(), k.double())
        self.set_head_rho(rho)
        return rho
