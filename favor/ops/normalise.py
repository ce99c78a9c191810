"""The last step of every path: out = numerator / normaliser."""

from __future__ import annotations

import torch

from ..features.maps import Features

__all__ = ["normalise", "masked_keys", "exp_diff", "max_log_scale", "NEG_INF"]

NEG_INF = float("-inf")


def normalise(num: torch.Tensor, den: torch.Tensor, guard: float | None) -> torch.Tensor:
    """num (..., L, Dv) / den (..., L). ``guard`` reproduces the official R + 2 eps [|R| <= eps];
    without it a row with a zero normaliser (no visible key) returns 0, not NaN."""
    if guard is not None and guard > 0:
        den = den + 2.0 * guard * (den.abs() <= guard).to(den.dtype)
    empty = den == 0
    out = num / torch.where(empty, torch.ones_like(den), den)[..., None]
    return torch.where(empty[..., None], torch.zeros_like(out), out)


def masked_keys(fk: Features, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Key feature values and log scales with padded keys removed: values 0, log scale -inf.
    Kernels without a log scale get 0 (they need no rescaling)."""
    values = fk.values
    log_scale = (
        fk.log_scale
        if fk.log_scale is not None
        else torch.zeros(values.shape[:-1], dtype=values.dtype, device=values.device)
    )
    if mask is not None:
        values = values.masked_fill(mask[..., None], 0.0)
        log_scale = log_scale.masked_fill(mask, NEG_INF)
    return values, log_scale.expand(values.shape[:-1])


def max_log_scale(log_scale: torch.Tensor) -> torch.Tensor:
    """Max over the last dim, keepdim; -inf (nothing there) for an empty dim."""
    if log_scale.shape[-1] == 0:
        return torch.full((*log_scale.shape[:-1], 1), NEG_INF, dtype=log_scale.dtype, device=log_scale.device)
    return log_scale.amax(-1, keepdim=True)


def exp_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """exp(a - b) for log scales with b >= a, where a = -inf (nothing there) gives 0 even if
    b is -inf too."""
    finite = torch.isfinite(a)
    safe_b = torch.where(torch.isfinite(b), b, torch.zeros_like(b))
    return torch.where(finite, torch.exp(torch.where(finite, a, torch.zeros_like(a)) - safe_b), torch.zeros_like(a))
