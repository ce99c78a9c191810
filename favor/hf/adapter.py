"""FavorAdapter: what one attention layer needs to run FAVOR, as buffers saved in state_dict.

An exact reparametrisation comes first. Softmax attention depends on the logits q.k only,
and two changes leave every attention weight unchanged:

* keys may be shifted by a constant vector c: q.(k - c) = q.k - q.c, a per-query constant,
  and softmax is invariant to adding a constant to a row of logits;
* queries may be mapped by an invertible A and keys by A^-T: (qA).(kA^-T) = q.k.

FAVOR's estimator is not invariant: the relative variance of its estimate of exp(q.k) is
exp(|q + k|^2) - 1 (scaled inputs), so the adapter picks c and A from the layer's query/key
statistics to make that small: c = mean(q) + mean(k) minimises E|q + k - c|^2 (shifting by
the mean key alone can make it larger: in MiniLM mean(q).mean(k) < 0), and A balances the
second moments of queries and keys (``balancing_map``; the cross term q.k is fixed). The
random features then see smaller inputs. Identity when uncalibrated.

Legend: H heads, D head dim, M features.
"""

from __future__ import annotations

import torch
from torch import nn

from ..features import maps
from ..features.feature_map import FeatureMap

__all__ = ["FavorAdapter", "HeadwiseFeatureMap", "balancing_map"]


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
        if bool(torch.isnan(self.head_rho).any()):
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
        self.rho.fill_(float(rho.double().mean()))

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


def balancing_map(sq: torch.Tensor, sk: torch.Tensor, *, ridge: float = 1e-4) -> torch.Tensor:
    """A minimising E|qA|^2 + E|kA^-T|^2 for second-moment matrices sq = E[q^T q], sk = E[k^T k]
    (..., D, D). With P = AA^T the objective is tr(P sq) + tr(P^-1 sk), minimised by the
    geometric mean P = sq^-1/2 (sq^1/2 sk sq^1/2)^1/2 sq^-1/2; A = P^1/2 (symmetric)."""
    d = sq.shape[-1]
    eye = torch.eye(d, dtype=sq.dtype, device=sq.device)

    def reg(s):
        return s + ridge * (torch.diagonal(s, dim1=-2, dim2=-1).mean(-1)[..., None, None] + 1e-12) * eye

    def powm(s, p):
        w, v = torch.linalg.eigh(s)
        return (v * w.clamp_min(1e-30).pow(p)[..., None, :]) @ v.transpose(-1, -2)

    sq, sk = reg(sq), reg(sk)
    rq, irq = powm(sq, 0.5), powm(sq, -0.5)
    p = irq @ powm(rq @ sk @ rq, 0.5) @ irq
    return powm(0.5 * (p + p.transpose(-1, -2)), 0.5)


class FavorAdapter(nn.Module):
    """Per-layer FAVOR state: the feature map, a key shift (H, D), and the query map A (H, D, D)
    with the key map A^-T (H, D, D), stored both so the forward pass needs no inverse."""

    def __init__(self, feature_map: FeatureMap, *, heads: int, dim: int) -> None:
        super().__init__()
        self.feature_map = feature_map
        self.heads, self.dim = heads, dim
        eye = torch.eye(dim).expand(heads, dim, dim).clone()
        self.register_buffer("key_shift", torch.zeros(heads, dim))
        self.register_buffer("query_map", eye.clone())
        self.register_buffer("key_map", eye.clone())
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, dim={self.dim}"

    def transform(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k (B, H, L, D) -> (qA, (k - c)A^-T), in float32 (float64 for float64 inputs); the
        logits q.k change by a per-query constant only."""
        if not bool(self.calibrated):
            return q, k
        dt = torch.float64 if q.dtype == torch.float64 else torch.float32
        qa = q.to(dt) @ self.query_map.to(dt)
        kb = (k.to(dt) - self.key_shift.to(dt)[:, None, :]) @ self.key_map.to(dt)
        return qa, kb

    @torch.no_grad()
    def set_reparametrisation(self, key_shift: torch.Tensor, query_map: torch.Tensor) -> None:
        """Install c (H, D) and A (H, D, D); A^-T is computed here in float64."""
        self.key_shift.copy_(key_shift)
        self.query_map.copy_(query_map)
        self.key_map.copy_(torch.linalg.inv(query_map.double()).transpose(-1, -2).to(self.key_map.dtype))
        self.calibrated.fill_(True)
