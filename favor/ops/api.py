"""``attention`` (``favor.attention``): one entry point over the bidirectional and causal paths."""

from __future__ import annotations

import torch

from ..features.feature_map import FeatureMap
from ..features.maps import oprf_a, oprf_rho
from .bidirectional import bidirectional
from .bidirectional_fast import bidirectional_fast
from .causal import DEFAULT_CHUNK, causal_chunked
from .causal_fast import DEFAULT_CAUSAL_CHUNK, causal_fast
from .checks import (
    check_chunk_size,
    check_feature_map,
    check_qkv,
    check_scale,
    check_state,
    compute_dtype,
    key_mask,
)
from .local.dispatch import exact_attention
from .local.gain import far_log_const
from .local.spec import ExactTerms
from .recurrent import STEP_MAX_QUERIES, steps
from .row_features import row_features
from .state import State

__all__ = ["attention"]


def _check_state(state, lead, m: int, dv: int, device) -> None:
    check_state(state, "initial_state", lead, m, dv, device)


def _map_needs_grad(feature_map: FeatureMap) -> bool:
    """A buffer of the map (its projection, rho) is being trained: the fast and step paths'
    hand-written gradients cover q, k, v and FAVOR++'s A only, so such a call takes the
    autograd reference paths (else the buffer's gradient would be silently dropped)."""
    return torch.is_grad_enabled() and any(b.requires_grad for b in feature_map.buffers())


def _fast_eligible(feature_map: FeatureMap, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """The chunked custom-autograd paths take row-wise features (favor's exact numerics:
    the official key max is a statistic of the whole sequence) and equal (batch, head) shapes;
    everything else goes to the simple reference paths."""
    return (
        feature_map.stabilizer == "exact"
        and q.shape[:-2] == k.shape[:-2] == v.shape[:-2]
        and q.shape[-2] > 0
        and k.shape[-2] > 0
    )


def _attention_fast(
    qs, ks, vs, feature_map, *, root, causal, mask, q_mask, chunk_size, initial_state, return_state, out_dtype
):
    """``qs``, ``ks`` are q and k in the compute dtype, not yet scaled: the fast paths scale
    them chunk by chunk (``root`` = sqrt(scale)), so no scaled L x D copies are held."""
    feature_map.check_dim(qs, "q")
    feature_map.check_dim(ks, "k")
    a = None
    if feature_map.kernel == "oprf":
        if not causal and not feature_map.has_fixed_rho():
            # rho is homogeneous of degree 2 in (q, k): take it from the unscaled inputs, so
            # that no scaled copies are kept for its gradient
            rho = oprf_rho(qs, ks, x_mask=q_mask, y_mask=mask) * root**2
            a = oprf_a(rho.expand(torch.broadcast_shapes(qs.shape[:-2], ks.shape[:-2])))
        else:  # a constant: only shapes, dtype and device of q, k are used
            a = feature_map.oprf_a(qs, ks, causal=causal, q_mask=q_mask, k_mask=mask)
    feat = row_features(feature_map, root)
    if not causal:
        # chunk_size is validated by the caller; None: bidirectional_fast's default_chunk
        return bidirectional_fast(qs, ks, vs, feat, a=a, key_padding_mask=mask, chunk_size=chunk_size).to(out_dtype)
    chunk = check_chunk_size(chunk_size, DEFAULT_CAUSAL_CHUNK)
    if initial_state is not None:
        m = feature_map.num_outputs
        m = qs.shape[-1] if m is None else m  # a deterministic map built without dim: M' = D
        _check_state(initial_state, qs.shape[:-2], m, vs.shape[-1], qs.device)
        initial_state = initial_state.to(dtype=qs.dtype)
    out, state = causal_fast(qs, ks, vs, feat, a=a, key_padding_mask=mask, state=initial_state, chunk_size=chunk)
    out = out.to(out_dtype)
    return (out, state) if return_state else out


def _attention_steps(qs, ks, vs, feature_map, root, mask, initial_state, return_state, out_dtype):
    """A continued causal pass over a few queries, position by position (recurrent.steps)."""
    if initial_state is not None:
        lead = qs.shape[:-2]
        if not lead == ks.shape[:-2] == vs.shape[:-2]:
            lead = torch.broadcast_shapes(lead, ks.shape[:-2], vs.shape[:-2])
        m = feature_map.num_outputs
        _check_state(initial_state, lead, initial_state.kv.shape[-2] if m is None else m, vs.shape[-1], qs.device)
        initial_state = initial_state.to(dtype=qs.dtype)
    out, state = steps(initial_state, qs, ks, vs, feature_map, root=root, mask=mask)
    out = out.to(out_dtype)
    return (out, state) if return_state else out


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
    exact: ExactTerms | None = None,
    far_log_gain: torch.Tensor | float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, State]:
    """FAVOR attention, linear in length. Layout as scaled_dot_product_attention:
    q (..., Lq, D), k (..., Lk, D), v (..., Lk, Dv) -> (..., Lq, Dv).

    ``scale`` (default 1/sqrt(D)) is applied as sqrt(scale) to q and to k before phi.
    ``key_padding_mask`` is bool (B, Lk), True for padding: padded keys count in neither
    numerator nor normaliser. ``causal`` attends to positions <= t, in chunks of
    ``chunk_size``; with ``initial_state``/``return_state`` a sequence can be fed in pieces
    (returns ``(out, state)``); such a continued pass over at most ``STEP_MAX_QUERIES``
    (4) queries, as in decoding, takes the recurrent path (``favor.step``'s arithmetic, one
    position at a time, equal to the chunked path to round-off). float16/bfloat16 inputs
    are computed in float32.

    ``exact`` (a ``favor.ExactTerms``): each query's window, sinks and block get their exact
    softmax weight, FAVOR's estimate the rest (one normaliser); causal states are then
    ``favor.ExactState`` (FAVOR's far state, a ring of the last C + W keys, the sinks).
    ``far_log_gain`` g (with ``exact`` only; a float or a tensor broadcasting against the
    (batch, head) dims, e.g. a learnable (H,) parameter): the far keys' estimate weighs
    exp(g) times as much against the exact terms (0: unchanged).
    """
    check_feature_map(feature_map)
    check_qkv(q, k, v, causal=causal)
    s = check_scale(scale, q.shape[-1])
    mask = key_mask(key_padding_mask, k)
    check_chunk_size(chunk_size, DEFAULT_CHUNK)
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
    exact = ExactTerms.coerce(exact)
    if exact is None and far_log_gain is not None:
        raise ValueError("far_log_gain weighs FAVOR's far keys against exact terms: it needs exact=ExactTerms(...)")
    if exact is not None:
        lead = q.shape[:-2]
        if not lead == k.shape[:-2] == v.shape[:-2]:
            lead = torch.broadcast_shapes(lead, k.shape[:-2], v.shape[:-2])
        log_const = far_log_const(far_log_gain, lead, dtype=dtype, device=q.device)
        got = exact_attention(
            q.to(dtype),
            k.to(dtype),
            v.to(dtype),
            feature_map,
            exact,
            causal=causal,
            root=root,
            key_padding_mask=mask if key_padding_mask is None else key_padding_mask,
            chunk_size=chunk_size,
            initial_state=initial_state,
            return_state=return_state,
            log_const=log_const,
        )
        if return_state:
            return got[0].to(v.dtype), got[1]
        return got.to(v.dtype)
    vs = v.to(dtype)
    # self-attention convention: with Lq == Lk, padded positions are padded queries too,
    # so they stay out of sequence statistics (FAVOR++'s rho)
    q_mask = mask if (mask is not None and q.shape[-2] == k.shape[-2]) else None
    map_grad = _map_needs_grad(feature_map)
    if streaming and 0 < q.shape[-2] <= STEP_MAX_QUERIES and not map_grad:
        return _attention_steps(
            q.to(dtype), k.to(dtype), vs, feature_map, root, mask, initial_state, return_state, v.dtype
        )
    if not map_grad and _fast_eligible(feature_map, q, k, v):
        return _attention_fast(
            q.to(dtype),
            k.to(dtype),
            vs,
            feature_map,
            root=root,
            causal=causal,
            mask=mask,
            q_mask=q_mask,
            chunk_size=chunk_size,
            initial_state=initial_state,
            return_state=return_state,
            out_dtype=v.dtype,
        )
    qs, ks = q.to(dtype) * root, k.to(dtype) * root
    chunk = check_chunk_size(chunk_size, DEFAULT_CHUNK)
    guard = feature_map.eps if feature_map.stabilizer == "official" else None
    fq, fk = feature_map.pair(qs, ks, causal=causal, q_mask=q_mask, k_mask=mask)
    if not causal:
        out = bidirectional(fq, fk, vs, key_padding_mask=mask, guard=guard)
        return out.to(v.dtype)
    if initial_state is not None:
        lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        _check_state(initial_state, lead, fk.values.shape[-1], v.shape[-1], q.device)
        initial_state = initial_state.to(dtype=dtype)
    out, state = causal_chunked(fq, fk, vs, chunk_size=chunk, key_padding_mask=mask, state=initial_state, guard=guard)
    out = out.to(v.dtype)
    return (out, state) if return_state else out
