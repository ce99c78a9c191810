"""Rotary position embedding (RoPE, Su et al. 2021), applied to q and k before phi.

Rotating q and k by their absolute positions makes q_i . k_j depend on i - j only, and
because the rotation happens before the feature map it composes with every kernel. The
angles are computed in float64 from integer positions, elementwise, so a whole-sequence
pass and a token-by-token pass rotate each position by bit-identical angles.
"""

from __future__ import annotations

import torch

__all__ = ["apply_rotary"]


def apply_rotary(x: torch.Tensor, offset: int, *, base: float = 10000.0) -> torch.Tensor:
    """Rotate x (..., L, D) at positions offset .. offset+L-1; D must be even.

    Pairs (x[2i], x[2i+1]) rotate by angle pos * base^(-2i/D).
    """
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"rotary embeddings need an even head dim D, got D={d}")
    length = x.shape[-2]
    pos = torch.arange(offset, offset + length, dtype=torch.float64, device=x.device)
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)
    angles = pos[:, None] * inv_freq[None, :]  # (L, D/2)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2)
