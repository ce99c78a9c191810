"""One token at a time: O(M' Dv) per token whatever the context length (decoding)."""

from __future__ import annotations

import torch

from ..features.feature_map import FeatureMap
from ._checks import check_feature_map, check_scale, compute_dtype
from ._normalise import exp_diff, normalise
from .state import State

__all__ = ["step"]


def step(
    state: State | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: FeatureMap,
    *,
    scale: float | None = None,
) -> tuple[torch.Tensor, State]:
    """Attend from one new token: q, k (..., D), v (..., Dv) -> (out (..., Dv), new state).

    ``state=None`` starts an empty context. Equal (to round-off) to causal attention over
    the whole sequence, one position at a time.
    """
    check_feature_map(feature_map)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.ndim < 1:
            raise TypeError(f"{name} must be a floating-point tensor of shape (..., D), got {type(t).__name__}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share the head dim D, got {q.shape[-1]} and {k.shape[-1]}")
    if feature_map.stabilizer == "official":
        raise ValueError(
            "stabilizer='official' shifts keys by a max over the whole key sequence, so it cannot "
            "run token by token; use stabilizer='exact'"
        )
    out_dtype, dtype = v.dtype, compute_dtype(q.dtype)
    root = check_scale(scale, q.shape[-1]) ** 0.5
    q1 = (q.to(dtype) * root).unsqueeze(-2)
    k1 = (k.to(dtype) * root).unsqueeze(-2)
    v1 = v.to(dtype)
    fq, fk = feature_map.pair(q1, k1, causal=True)
    f_q, f_k = fq.values[..., 0, :], fk.values[..., 0, :]
    l_k = (
        fk.log_scale[..., 0] if fk.log_scale is not None else torch.zeros(f_k.shape[:-1], dtype=dtype, device=q.device)
    )
    if state is None:
        lead = torch.broadcast_shapes(f_q.shape[:-1], f_k.shape[:-1], v1.shape[:-1])
        state = State.empty(lead, f_k.shape[-1], v1.shape[-1], dtype=dtype, device=q.device)
    kv, z, c = state
    new_c = torch.maximum(c, l_k)
    decay, w = exp_diff(c, new_c), exp_diff(l_k, new_c)
    kv = kv * decay[..., None, None] + (f_k * w[..., None])[..., :, None] * v1[..., None, :]
    z = z * decay[..., None] + f_k * w[..., None]
    num = (f_q[..., None, :] @ kv)[..., 0, :]
    den = (f_q * z).sum(-1)
    out = normalise(num[..., None, :], den[..., None], None)[..., 0, :]
    return out.to(out_dtype), State(kv, z, new_c)
