"""Sequence-parallel causal FAVOR attention (LASP-2 style: one all-gather of states per call).

Rank r of a group holds a contiguous slice of one causal sequence (rank order = sequence
order). Causal linear attention only needs, from everything before the slice, the prefix
sums sum_{t<start} phi(k_t) v_t^T and sum_{t<start} phi(k_t): O(M' Dv) numbers per (batch,
head), whatever the length. So each rank

1. sums its own keys into a state (kv, z, log_scale) with no prefix (``rank_state``),
2. all-gathers the W states (one collective of W * (M' Dv + M' + 1) numbers per (B, H)),
3. combines the states of ranks < r exactly (log scales merged with a max and rescaling),
4. runs ``favor.attention(causal=True)`` on its slice with that prefix as ``initial_state``.

Outputs and gradients equal single-process causal attention over the whole sequence up to
float round-off. Gradients reach earlier ranks through the adjoint of the all-gather (a
reduce-scatter), so every rank must run backward when any does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..features.feature_map import FeatureMap
from ..ops.api import attention
from ..ops.checks import check_feature_map, check_qkv, check_scale, compute_dtype, key_mask
from ..ops.normalise import exp_diff
from ..ops.state import State
from .collectives import all_gather_rows, group_rank_size
from .rank_state import DEFAULT_STATE_CHUNK, rank_state

__all__ = ["sequence_parallel_attention", "combine_states", "prefix_state", "state_numel", "state_bytes"]


def state_numel(lead: tuple[int, ...], num_outputs: int, dv: int) -> int:
    """Numbers one rank contributes per call: kv (M' Dv), z (M') and log_scale (1) per lead index."""
    n = 1
    for s in lead:
        n *= s
    return n * (num_outputs * dv + num_outputs + 1)


def state_bytes(lead: tuple[int, ...], num_outputs: int, dv: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one rank's payload in the all-gather (independent of the sequence length)."""
    return state_numel(lead, num_outputs, dv) * torch.empty((), dtype=dtype).element_size()


def combine_states(kv: torch.Tensor, z: torch.Tensor, log_scale: torch.Tensor, *, keep: torch.Tensor) -> State:
    """Sum the states kv (W, ..., M', Dv), z (W, ..., M'), log_scale (W, ...) over the W rows
    where ``keep`` (W,) is True, exactly: the result's log scale is the max of the kept ones
    (a detached shift, -inf if none is kept) and each kept state is rescaled to it."""
    shape = (-1,) + (1,) * (log_scale.ndim - 1)
    c = log_scale.detach().masked_fill(~keep.reshape(shape), float("-inf"))
    top = c.amax(0)
    w = exp_diff(c, top)  # (W, ...): 0 for rows not kept
    return State((kv * w[..., None, None]).sum(0), (z * w[..., None]).sum(0), top)


def _pack(state: State) -> torch.Tensor:
    return torch.cat([state.kv.reshape(-1), state.z.reshape(-1), state.log_scale.reshape(-1)])


def _unpack(rows: torch.Tensor, lead: tuple[int, ...], m: int, dv: int) -> tuple[torch.Tensor, ...]:
    w, n_lead = rows.shape[0], rows.shape[1] // (m * dv + m + 1)
    kv, z, c = rows.split([n_lead * m * dv, n_lead * m, n_lead], dim=1)
    return kv.reshape(w, *lead, m, dv), z.reshape(w, *lead, m), c.reshape(w, *lead)


def prefix_state(local: State, *, group: dist.ProcessGroup | None = None) -> State:
    """All-gather every rank's local State and return the exact sum of those of lower ranks
    (an empty state, log scale -inf, on rank 0). Differentiable; one collective."""
    rank, world = group_rank_size(group)
    lead, (m, dv) = tuple(local.z.shape[:-1]), local.kv.shape[-2:]
    if world == 1:
        rows = _pack(local)[None]
    else:
        rows = all_gather_rows(_pack(local), group=group)
    kv, z, c = _unpack(rows, lead, m, dv)
    keep = torch.arange(rows.shape[0], device=rows.device) < rank
    return combine_states(kv, z, c, keep=keep)


def sequence_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: FeatureMap,
    *,
    group: dist.ProcessGroup | None = None,
    scale: float | None = None,
    chunk_size: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal FAVOR attention over a sequence split across the ranks of ``group``.

    q, k (..., L_r, D), v (..., L_r, Dv) are rank r's contiguous slice (rank order is
    sequence order; slices may differ in length, leading shapes must agree across ranks);
    ``key_padding_mask`` (B, L_r) is the slice's mask. Returns this slice's output
    (..., L_r, Dv), equal to the matching rows of ``favor.attention(causal=True)`` on the
    whole sequence. Communication: one all-gather of ``state_bytes`` per rank, independent
    of L; with gradients, one reduce-scatter (all-reduce on gloo) of the same size in backward.
    Every rank must call this with the same feature map (same projection), and run backward
    when any rank does. Without an initialised process group (or a group of one) this is
    ``favor.attention(..., causal=True)``.
    """
    check_feature_map(feature_map)
    check_qkv(q, k, v, causal=True)
    if feature_map.stabilizer != "exact":
        raise ValueError(
            f"sequence_parallel_attention needs stabilizer='exact' (row-wise features), got {feature_map.stabilizer!r}: "
            "the official stabilizer shifts keys by a max over the whole sequence"
        )
    _, world = group_rank_size(group)
    if world == 1:
        return attention(
            q, k, v, feature_map, causal=True, key_padding_mask=key_padding_mask, scale=scale, chunk_size=chunk_size
        )
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    q, k, v = (t.expand(*lead, *t.shape[-2:]) for t in (q, k, v))
    s = check_scale(scale, q.shape[-1])
    mask = key_mask(key_padding_mask, k)
    dtype = compute_dtype(q.dtype)
    kc, vc, root = k.to(dtype), v.to(dtype), s**0.5  # no copies for float32/float64 inputs
    # causal A* depends only on D and the rho buffer, never on the data (see FeatureMap.oprf_a)
    a = feature_map.oprf_a(kc, kc, causal=True) if feature_map.kernel == "oprf" else None
    local = rank_state(
        kc, vc, feature_map.exact_features, a=a, key_padding_mask=mask, chunk_size=DEFAULT_STATE_CHUNK, root=root
    )
    prefix = prefix_state(local, group=group)
    out = attention(
        q,
        k,
        v,
        feature_map,
        causal=True,
        key_padding_mask=key_padding_mask,
        scale=scale,
        chunk_size=chunk_size,
        initial_state=prefix,
    )
    if out.shape[-2] == 0 and prefix.kv.requires_grad:
        # a rank without tokens still has to take part in the backward collective
        out = out + 0.0 * prefix.kv.sum().to(out.dtype)
    return out
