"""Exact blocks: FAVOR for the far keys, exact weights for each query's whole block of keys.

A generalisation of the exact window of local.py. Queries are cut into blocks of ``block``
consecutive positions; every query of a block takes exactly the block's keys widened by
``window`` keys on either side (so each key within ``window`` positions of the query is among
them, as in local.py), and the first ``sinks`` tokens; FAVOR estimates the rest with the far
sums' overcount taken out, as in local.py:

    num_i = phi(q_i).(sum_j phi(k_j) v_j) - sum_{j in E(b)} phi(q_i).phi(k_j) v_j + sum_{j in E(b)} exp(s_ij) v_j

With ``block=1`` the exact set is local.py's window (tested equal). Because every query of a
block shares its exact keys, the exact terms are dense (C, C + 2W) products per block: no
band is extracted, and autograd's backward is the GEMMs' own. The extra work is about
(C + 2W) / D GEMMs the size of the core's per head (C=32, W=8, D=64: 0.75), and time and
memory stay linear in length.

Why blocks: at 128 tokens MiniLM's queries keep 26-72 % of their weight outside a 17-key
window, at 512 tokens 48-87 %; blocks of 32 (favor's CLI default) or 64 make much of a short
input's attention exact at a fixed cost per query (benchmarks/results/hf_fidelity_512.md).
Bidirectional attention only: a causal block would show its later keys to its earlier queries.

Legend: B batch, H heads, L positions, C block, W window, S sinks, M' features.
"""

from __future__ import annotations

import torch

from ...features.maps import Features
from .window import combine_parts, explicit_reference, far_sums, parts_sum, query_log_scale

__all__ = ["block_exact_attention", "block_exact_positions", "block_exact_reference", "check_block"]


def check_block(block) -> None:
    """``block`` an int >= 1, or ValueError."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"exact_block must be an int >= 1, got {block!r}")


def block_exact_positions(length: int, window: int, sinks: int, block: int, device=None) -> torch.Tensor:
    """(L, L) bool: True where key j's weight for query i is exact (the reference's set)."""
    i = torch.arange(length, device=device)
    start = (i // block) * block - max(window, 0)
    stop = (i // block) * block + block + max(window, 0)  # exclusive
    near = (i[None, :] >= start[:, None]) & (i[None, :] < stop[:, None])
    if window < 0 and block == 1:
        near = torch.zeros_like(near)
    return near | (i[None, :] < sinks)


def _blocks(x: torch.Tensor, block: int, padded: int) -> torch.Tensor:
    """(..., L, C') -> (..., nb, block, C'), zero rows past L."""
    x = torch.nn.functional.pad(x, (0, 0, 0, padded - x.shape[-2]))
    return x.reshape(*x.shape[:-2], padded // block, block, x.shape[-1])


def _extents(x: torch.Tensor, block: int, wide: int, padded: int) -> torch.Tensor:
    """(..., L, C') -> (..., nb, block + 2 wide, C'): each block's keys widened by ``wide``."""
    x = torch.nn.functional.pad(x, (0, 0, wide, padded - x.shape[-2] + wide))
    return x.unfold(-2, block + 2 * wide, block).transpose(-1, -2)


def block_exact_attention(
    fq: Features,
    fk: Features,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    sinks: int,
    block: int,
    log_const: torch.Tensor | float = 0.0,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """FAVOR with exact blocks (module docstring), bidirectional, linear in L.

    fq, fk: features of the queries and keys (..., L, M'); q, k (..., L, D): the inputs whose
    dot products the features estimate (already scaled); v (..., L, Dv); ``log_const`` as in
    local.py; ``key_padding_mask`` bool (B, L), True for padding. Returns (..., L, Dv)."""
    check_block(block)
    if window < 0 and block == 1 and sinks <= 0:
        raise ValueError(f"exact blocks need window >= 0, block > 1 or sinks > 0, got {window}, {block}, {sinks}")
    length = q.shape[-2]
    if k.shape[-2] != length:
        raise ValueError(f"exact blocks need as many queries as keys, got {length} and {k.shape[-2]}")
    wide = max(window, 0)
    block = min(block, length)
    padded = -(-length // block) * block
    mask = None if key_padding_mask is None else key_padding_mask[:, None, :]  # (B, 1, L) over heads
    fq_values = torch.nn.functional.pad(fq.values, (0, 0, 0, padded - length))
    num_rf, den_rf, ref, weighted = far_sums(fq_values, fk, v, key_padding_mask)  # (..., Lp, ...)

    rf_near, logits, parts = [], [], []
    if window >= 0 or block > 1:  # block 1 without a window: no neighbours, as in local.py
        # the block's keys: real (inside the sequence, not padding) or not
        live = torch.ones(1, length, dtype=torch.bool, device=q.device) if mask is None else ~mask
        live = torch.nn.functional.pad(live, (wide, padded - length + wide))
        live = live.unfold(-1, block + 2 * wide, block)[..., None, :]  # (B or 1, 1, nb, 1, C + 2W)
        qb = _blocks(fq_values, block, padded)  # (..., nb, C, M')
        rf = qb @ _extents(weighted, block, wide, padded).transpose(-1, -2)  # (..., nb, C, C + 2W)
        logit = _blocks(q, block, padded) @ _extents(k, block, wide, padded).transpose(-1, -2)
        logit = logit.masked_fill(~live, float("-inf"))
        rf_near.append(rf.flatten(-3, -2))  # (..., Lp, C + 2W)
        logits.append(logit.flatten(-3, -2))
        v_ext = _extents(v, block, wide, padded)  # (..., nb, C + 2W, Dv)
        parts.append((block + 2 * wide, lambda c: (_blocks(c, block, padded) @ v_ext).flatten(-3, -2)))
        first = torch.arange(padded, device=q.device) // block * block - wide  # each query's first exact key
    else:
        first = torch.full((padded,), length, device=q.device)
    n_sinks = min(sinks, length)
    if n_sinks:
        sink_live = torch.arange(n_sinks, device=q.device)[None, :] < first[:, None]  # not in its block already
        if mask is not None:
            sink_live = sink_live & ~mask[..., None, :n_sinks]
        rf_near.append(fq_values @ weighted[..., :n_sinks, :].transpose(-1, -2))
        q_pad = torch.nn.functional.pad(q, (0, 0, 0, padded - length))
        logits.append((q_pad @ k[..., :n_sinks, :].transpose(-1, -2)).masked_fill(~sink_live, float("-inf")))
        parts.append((n_sinks, lambda c: c @ v[..., :n_sinks, :]))
    logits = torch.cat(logits, -1)
    rf_near = torch.cat(rf_near, -1).masked_fill(~torch.isfinite(logits), 0.0)
    q_scale = query_log_scale(fq, den_rf[..., :length])
    q_scale = torch.nn.functional.pad(q_scale, (0, padded - length))
    out = combine_parts(num_rf, den_rf, ref, logits, log_const, q_scale, parts_sum(parts), rf_near)
    return out[..., :length, :]


def block_exact_reference(
    kernel: torch.Tensor,
    logits: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    sinks: int,
    block: int,
    log_const: torch.Tensor | float = 0.0,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same, quadratic and explicit: ``kernel`` (..., L, L) the features' estimate of
    exp(s_ij) * exp(log_const), ``logits`` s (..., L, L). For tests."""
    near = block_exact_positions(logits.shape[-1], window, sinks, block, device=logits.device)
    return explicit_reference(near, kernel, logits, v, log_const, key_padding_mask)
