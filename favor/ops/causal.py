"""Causal FAVOR, chunked: inside a chunk of C positions a masked C x C product, across
chunks a running state. Linear in L for a fixed C.

The keys' log scales are combined with a running maximum (the state is rescaled when it
grows), taken over the prefix only: position t never looks at a key after t, so changing
later tokens leaves output t bit-for-bit unchanged (masked entries are exact zeros).
"""

from __future__ import annotations

import torch

from ..features.maps import Features
from .normalise import exp_diff, masked_keys, normalise
from .state import State

__all__ = ["causal_chunked", "causal_sums", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 64


def causal_sums(
    qv: torch.Tensor,
    kvals: torch.Tensor,
    klog: torch.Tensor,
    v: torch.Tensor,
    state: State,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, State]:
    """The unnormalised causal sums: query values qv (..., L, M'), key values and log scales
    (already masked), v (..., L, Dv), continuing ``state`` -> (num (..., L, Dv), den (..., L),
    run (..., L), state after position L-1). num_t and den_t are in units of exp(run_t), the
    running maximum of the log scales of the state and the keys up to t."""
    kv, z, c = state
    nums, dens, runs = [], [], []
    # split, not sliced in the loop: a slice's backward fills a full-length zero gradient per
    # chunk (quadratic in L); split's backward joins them once
    pieces = (
        zip(
            qv.split(chunk_size, -2),
            kvals.split(chunk_size, -2),
            klog.split(chunk_size, -1),
            v.split(chunk_size, -2),
            strict=True,
        )
        if qv.shape[-2]
        else ()
    )
    for q_c, k_c, lk_c, v_c in pieces:
        n = q_c.shape[-2]
        # run[t] = max(log scale of the state, keys up to t): the prefix maximum
        run = torch.maximum(torch.cummax(lk_c, dim=-1).values, c[..., None])
        causal_mask = torch.ones(n, n, dtype=torch.bool, device=qv.device).tril()
        weights = exp_diff(lk_c[..., None, :], run[..., :, None])  # (..., C, C): exp(lk_i - run_t)
        weights = torch.where(causal_mask, weights, torch.zeros_like(weights))
        scores = (q_c @ k_c.transpose(-1, -2)) * weights
        carry = exp_diff(c[..., None], run)  # (..., C): the state's weight at each t
        nums.append(scores @ v_c + (q_c @ kv) * carry[..., None])
        dens.append(scores.sum(-1) + (q_c @ z[..., None])[..., 0] * carry)
        runs.append(run)
        new_c = run[..., -1]
        k_w = k_c * exp_diff(lk_c, new_c[..., None])[..., None]
        decay = exp_diff(c, new_c)
        kv = kv * decay[..., None, None] + k_w.transpose(-1, -2) @ v_c
        z = z * decay[..., None] + k_w.sum(-2)
        c = new_c
    if not nums:
        # an empty sequence: zero-length outputs that are still part of the graph of every
        # input (a backward through an empty batch must not fail); ``link`` is an exact 0
        lead = torch.broadcast_shapes(qv.shape[:-2], kvals.shape[:-2], v.shape[:-2])
        link = (qv.sum() + kvals.sum() + v.sum()) * 0
        num = (qv @ kv).expand(*lead, 0, v.shape[-1]) + link
        den = (qv @ z[..., None])[..., 0].expand(*lead, 0) + link
        return num, den, qv.new_zeros(*lead, 0), State(kv, z, c)
    return torch.cat(nums, -2), torch.cat(dens, -1), torch.cat(runs, -1), State(kv, z, c)


def causal_chunked(
    fq: Features,
    fk: Features,
    v: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    key_padding_mask: torch.Tensor | None = None,
    state: State | None = None,
    guard: float | None = None,
) -> tuple[torch.Tensor, State]:
    """fq, fk (..., L, M'), v (..., L, Dv) -> (out (..., L, Dv), state after position L-1)."""
    qv = fq.values
    kvals, klog = masked_keys(fk, key_padding_mask)
    lead = torch.broadcast_shapes(qv.shape[:-2], kvals.shape[:-2], v.shape[:-2])
    if state is None:
        state = State.empty(lead, kvals.shape[-1], v.shape[-1], dtype=qv.dtype, device=qv.device)
    num, den, _, state = causal_sums(qv, kvals, klog, v, state, chunk_size)
    return normalise(num, den, guard), state
