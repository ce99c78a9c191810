"""favor.attention: one entry point over the bidirectional and causal paths."""

from __future__ import annotations

import torch

from ..features.feature_map import FeatureMap
from ._checks import check_chunk_size, check_feature_map, check_qkv, check_scale, compute_dtype, key_mask
from .bidirectional import bidirectional
from .causal import DEFAULT_CHUNK, causal_chunked
from .state import State

__all__ = ["attention"]


def _check_state(state, lead, m: int, dv: int) -> None:
    if not isinstance(state, State):
        raise TypeError(f"initial_state must be a favor.State, got {type(state).__name__}")
    want = (tuple(lead) + (m, dv), tuple(lead) + (m,), tuple(lead))
    got = tuple(tuple(t.shape) for t in state)
    if got != want:
        raise ValueError(f"initial_state has shapes kv {got[0]}, z {got[1]}, log_scale {got[2]}; expected {want}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: FeatureMap,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    chunk_size: int | None = None,
    initial_state: State | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, State]:
    """FAVOR attention, linear in length. Layout as scaled_dot_product_attention:
    q (..., Lq, D), k (..., Lk, D), v (..., Lk, Dv) -> (..., Lq, Dv).

    ``scale`` (default 1/sqrt(D)) is applied as sqrt(scale) to q and to k before phi.
    ``key_padding_mask`` is bool (B, Lk), True for padding: padded keys count in neither
    numerator nor normaliser. ``causal`` attends to positions <= t, in chunks of
    ``chunk_size``; with ``initial_state``/``return_state`` a sequence can be fed in pieces
    (returns ``(out, state)``). float16/bfloat16 inputs are computed in float32.
    """
    check_feature_map(feature_map)
    check_qkv(q, k, v, causal=causal)
    s = check_scale(scale, q.shape[-1])
    mask = key_mask(key_padding_mask, k)
    chunk = check_chunk_size(chunk_size, DEFAULT_CHUNK)
    streaming = initial_state is not None or return_state
    if streaming and not causal:
        raise ValueError("initial_state / return_state apply to causal attention only (causal=True)")
    if streaming and feature_map.stabilizer == "official":
        raise ValueError(
            "stabilizer='official' shifts keys by a max over the whole key sequence, so a sequence "
            "cannot be continued from a state; use stabilizer='exact'"
        )
    dtype = compute_dtype(q.dtype)
    root = s**0.5
    qs, ks, vs = q.to(dtype) * root, k.to(dtype) * root, v.to(dtype)
    # self-attention convention: with Lq == Lk, padded positions are padded queries too,
    # so they stay out of sequence statistics (FAVOR++'s rho)
    q_mask = mask if (mask is not None and q.shape[-2] == k.shape[-2]) else None
    guard = feature_map.eps if feature_map.stabilizer == "official" else None
    fq, fk = feature_map.pair(qs, ks, causal=causal, q_mask=q_mask, k_mask=mask)
    if not causal:
        out = bidirectional(fq, fk, vs, key_padding_mask=mask, guard=guard)
        return out.to(v.dtype)
    if initial_state is not None:
        lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        _check_state(initial_state, lead, fk.values.shape[-1], v.shape[-1])
        initial_state = initial_state.to(dtype=dtype)
    out, state = causal_chunked(
        fq, fk, vs, chunk_size=chunk, key_padding_mask=mask, state=initial_state, guard=guard
    )
    out = out.to(v.dtype)
    return (out, state) if return_state else out
