"""Cross-attention (an encoder-decoder's decoder attending to the encoder): plain FAVOR.

The queries come from one sequence (the decoder's tokens) and the keys and values from
another (the encoder's), so there is no diagonal for exact local terms (favor.ops.local) to make
exact: cross-attention modules take plain FAVOR whatever ``exact_window``/``exact_sinks`` say.
No statistic of the queries is used either (FAVOR++'s rho is the calibrated one, else the
fixed default of causal layers; no per-sequence key shift): the queries are a causal
decoder's tokens, and a statistic over them would carry later tokens into earlier positions
and make cached decoding differ from teacher forcing.

Legend: B batch, H heads, Lq queries, Lk keys, D head dim, M' features.
"""

from __future__ import annotations

import torch

from .bidirectional import bidirectional
from .checks import check_scale, compute_dtype
from .local.window import pair_features

__all__ = ["cross_attention"]


def cross_attention(
    feature_map, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, pad: torch.Tensor | None
) -> torch.Tensor:
    """q (B, H, Lq, D), k (B, H, Lk, D), v (B, H, Lk, Dv) as the adapter hands them to FAVOR,
    ``pad`` bool (B, Lk), True for padding keys, or None -> (B, H, Lq, Dv)."""
    dtype = compute_dtype(q.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    root = check_scale(scale, q.shape[-1]) ** 0.5
    mask = None if pad is None else pad[:, None, :]  # (B, 1, Lk): broadcasts over heads
    # causal=True: features without any statistic of the query sequence (module docstring)
    fq, fk = pair_features(feature_map, q, k, root, mask, causal=True)
    return bidirectional(fq, fk, v, key_padding_mask=mask)
