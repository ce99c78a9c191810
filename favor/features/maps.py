"""Feature maps phi, as pure functions of already-scaled inputs x (..., L, D) and a
projection W (M, D).

Each returns ``Features(values, log_scale)`` with phi(x) = values * exp(log_scale[..., None]).
For the exponential (softmax) kernels ``values`` is shifted so that its largest entry in
each row is 1 and the shift goes to ``log_scale``: nothing overflows, and attention can
combine rows of very different magnitude exactly (the shift cancels in numerator / normaliser).
The shifts are detached: the represented phi(x) is the same function of x, so gradients
are exact and cheaper. Deterministic-range kernels (relu, elu) have ``log_scale=None``.

Legend: L length, D head dim, M random features, M' = feature count out (M or 2M).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["Features", "positive", "hyperbolic", "trig", "oprf", "relu", "elu", "oprf_a", "oprf_rho"]


class Features(NamedTuple):
    values: torch.Tensor  # (..., L, M')
    log_scale: torch.Tensor | None  # (..., L) or None (== 0)

    def explicit(self) -> torch.Tensor:
        """phi(x) itself; may overflow for large inputs, for inspection and tests."""
        if self.log_scale is None:
            return self.values
        return self.values * torch.exp(self.log_scale)[..., None]


def _half_sq_norm(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (x * x).sum(-1)


def _exp_features(exponent: torch.Tensor, log_const: float | torch.Tensor) -> Features:
    shift = exponent.amax(-1).detach()
    return Features(torch.exp(exponent - shift[..., None]), shift + log_const)


def positive(x: torch.Tensor, w: torch.Tensor) -> Features:
    """FAVOR+ (paper Lemma 1): exp(Wx - |x|^2/2) / sqrt(M)."""
    exponent = x @ w.T - _half_sq_norm(x)[..., None]
    return _exp_features(exponent, -0.5 * math.log(w.shape[0]))


def hyperbolic(x: torch.Tensor, w: torch.Tensor) -> Features:
    """exp(-|x|^2/2) / sqrt(2M) * [exp(Wx), exp(-Wx)]."""
    s = x @ w.T
    exponent = torch.cat([s, -s], dim=-1) - _half_sq_norm(x)[..., None]
    return _exp_features(exponent, -0.5 * math.log(2 * w.shape[0]))


def trig(x: torch.Tensor, w: torch.Tensor) -> Features:
    """FAVOR (sin/cos): exp(|x|^2/2) / sqrt(M) * [cos(Wx), sin(Wx)]."""
    s = x @ w.T
    return Features(torch.cat([torch.cos(s), torch.sin(s)], dim=-1), _half_sq_norm(x) - 0.5 * math.log(w.shape[0]))


def oprf_rho(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    x_mask: torch.Tensor | None = None,
    y_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """rho = (mean|x|^2 + mean|y|^2 + 2 mean(x).mean(y)) / D per leading index: the mean of
    |x_i + y_j|^2 / D over all pairs, which the FAVOR++ variance depends on.

    Masks (..., L) are True where a row is padding and must not count. Returns (...,).
    """

    def moments(t, mask):
        # reductions without (..., L, D) temporaries: rho is taken over whole sequences
        if mask is None:
            n = max(t.shape[-2], 1)  # an empty sequence has zero moments
            return torch.linalg.vector_norm(t, dim=(-2, -1)).square() / n, t.sum(-2) / n
        keep = (~mask).to(t.dtype).expand(t.shape[:-1])
        n = keep.sum(-1).clamp_min(1.0)
        mean_sq = (keep * torch.linalg.vector_norm(t, dim=-1).square()).sum(-1) / n
        mean = (keep[..., None, :] @ t)[..., 0, :] / n[..., None]
        return mean_sq, mean

    xs, xm = moments(x, x_mask)
    ys, ym = moments(y, y_mask)
    return (xs + ys + 2.0 * (xm * ym).sum(-1)) / x.shape[-1]


def oprf_a(rho: torch.Tensor) -> torch.Tensor:
    """The variance-optimal A* = (1 - 2rho - sqrt((2rho+1)^2 + 8rho)) / 16 (<= 0 for rho >= 0)."""
    return (1.0 - 2.0 * rho - torch.sqrt((2.0 * rho + 1.0) ** 2 + 8.0 * rho)) / 16.0


def oprf(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor) -> Features:
    """FAVOR++ optimal positive random features (Likhosherstov et al., NeurIPS 2022):
    (1-4A)^{D/4} exp(A|w|^2 + sqrt(1-4A) w.x - |x|^2/2) / sqrt(M), unbiased for exp(x.y)
    for any A < 1/4 when the rows of W are N(0, I). ``a`` has x's leading shape (...,)."""
    a = a.to(x.dtype)
    one_minus_4a = 1.0 - 4.0 * a
    a_, b_ = a[..., None, None], torch.sqrt(one_minus_4a)[..., None, None]
    w_sq = (w * w).sum(-1)  # (M,)
    exponent = a_ * w_sq + b_ * (x @ w.T) - _half_sq_norm(x)[..., None]
    log_const = 0.25 * x.shape[-1] * torch.log(one_minus_4a)[..., None] - 0.5 * math.log(w.shape[0])
    return _exp_features(exponent, log_const)


def relu(x: torch.Tensor, w: torch.Tensor, eps: float) -> Features:
    """Generalized attention (paper section 2.3): ReLU(Wx) + eps."""
    return Features(F.relu(x @ w.T) + eps, None)


def elu(x: torch.Tensor) -> Features:
    """Linear-transformer features elu(x) + 1 (Katharopoulos et al., 2020); deterministic."""
    return Features(F.elu(x) + 1.0, None)
