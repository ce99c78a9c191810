"""The state of one slice of keys, without any prefix: sum_t phi(k_t) v_t^T and sum_t phi(k_t).

This is what a rank contributes to the ranks after it in sequence-parallel attention. As
everywhere in favor the sums are held as (kv, z, log_scale) with true sums kv * exp(log_scale);
log_scale is the maximum of the keys' log scales (-inf when every key is padding).

``rank_state`` is the fast path: chunked, with a hand-written backward that recomputes each
chunk's features, so no L x M' tensor is kept for backward. ``rank_state_reference`` is the
same sum in plain autograd, its reference (tests compare them at 1e-10 in float64).

The log scale is a detached shift: the represented sums are exact functions of k and v and
the shift cancels downstream, which is also how ``favor.attention`` treats a state's log scale.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..features.maps import Features
from ..ops.normalise import exp_diff, masked_keys
from ..ops.state import State

__all__ = ["rank_state", "rank_state_reference", "DEFAULT_STATE_CHUNK"]

#: rows per chunk when summing a slice's keys: large enough for efficient matmuls, small
#: enough that the (..., C, M') feature block stays a few MB
DEFAULT_STATE_CHUNK = 512

FeatFn = Callable[[torch.Tensor, "torch.Tensor | None"], Features]


def _mask_at(mask: torch.Tensor | None, sl: slice) -> torch.Tensor | None:
    return None if mask is None else mask[..., sl]


def rank_state_reference(
    k: torch.Tensor,
    v: torch.Tensor,
    feat: FeatFn,
    *,
    a: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    root: float = 1.0,
) -> State:
    """k (..., L, D), v (..., L, Dv) -> State of the whole slice of keys k * root, plain autograd."""
    kvals, lk = masked_keys(feat(k * root, a), key_padding_mask)
    c = lk.amax(-1).detach() if lk.shape[-1] else lk.new_full(lk.shape[:-1], float("-inf"))
    k_w = kvals * exp_diff(lk, c[..., None])[..., None]
    return State(k_w.mT @ v, k_w.sum(-2), c)


class _LocalState(torch.autograd.Function):
    @staticmethod
    def forward(ctx, k, v, a, mask, feat, chunk, root):
        kv = z = c = None
        with torch.no_grad():
            for start in range(0, k.shape[-2], chunk):
                sl = slice(start, start + chunk)
                kvals, lk = masked_keys(feat(k[..., sl, :] * root, a), _mask_at(mask, sl))
                new_c = lk.amax(-1) if c is None else torch.maximum(c, lk.amax(-1))
                k_w = kvals * exp_diff(lk, new_c[..., None])[..., None]
                add_kv, add_z = k_w.mT @ v[..., sl, :], k_w.sum(-2)
                if c is None:
                    kv, z = add_kv, add_z
                else:
                    decay = exp_diff(c, new_c)
                    kv = kv * decay[..., None, None] + add_kv
                    z = z * decay[..., None] + add_z
                c = new_c
        ctx.feat, ctx.chunk, ctx.root = feat, chunk, root
        ctx.save_for_backward(k, v, a, mask, c)
        ctx.mark_non_differentiable(c)
        return kv, z, c

    @staticmethod
    def backward(ctx, g_kv, g_z, _g_c):
        k, v, a, mask, c = ctx.saved_tensors
        feat, chunk, root = ctx.feat, ctx.chunk, ctx.root
        need_k, need_v = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.needs_input_grad[2]:
            raise RuntimeError(
                "rank_state: gradients with respect to FAVOR++'s A are not supported (A is a constant in causal attention)"
            )
        lead = c.shape
        g_kv = torch.zeros(*lead, *g_kv.shape[-2:], dtype=k.dtype, device=k.device) if g_kv is None else g_kv
        g_kv = g_kv.expand(*lead, *g_kv.shape[-2:])
        g_z = torch.zeros(*lead, g_kv.shape[-2], dtype=k.dtype, device=k.device) if g_z is None else g_z
        g_z = g_z.expand(*lead, g_z.shape[-1])
        dk = torch.zeros_like(k) if need_k else None
        dv = torch.zeros_like(v) if need_v else None
        for start in range(0, k.shape[-2], chunk):
            sl = slice(start, start + chunk)
            with torch.enable_grad():
                kc = k[..., sl, :].detach().requires_grad_(need_k)
                kvals, lk = masked_keys(feat(kc * root, a), _mask_at(mask, sl))
            e = exp_diff(lk.detach(), c[..., None])
            k_w = kvals.detach() * e[..., None]
            v_c = v[..., sl, :]
            if need_v:
                dv[..., sl, :] = k_w @ g_kv
            if need_k:
                dk_w = v_c @ g_kv.mT + g_z[..., None, :]  # d sum / d k_w, (..., C, M')
                outs, grads = [kvals], [dk_w * e[..., None]]
                if lk.requires_grad:  # kernels whose log scale depends on x (trig)
                    outs.append(lk)
                    grads.append((dk_w * k_w).sum(-1))
                if any(o.requires_grad for o in outs):
                    (gk,) = torch.autograd.grad(outs, [kc], grads, allow_unused=True)
                    if gk is not None:
                        dk[..., sl, :] = gk
        return dk, dv, None, None, None, None, None


def rank_state(
    k: torch.Tensor,
    v: torch.Tensor,
    feat: FeatFn,
    *,
    a: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_STATE_CHUNK,
    root: float = 1.0,
) -> State:
    """k (..., L, D), v (..., L, Dv), equal leading shapes -> State of the slice of keys
    k * root (``root`` = sqrt(scale): scaling chunk by chunk keeps no scaled copy of k).

    Memory for backward is k and v plus one (..., C, M') chunk; ``feat(x, a)`` gives
    row-wise Features (``FeatureMap.exact_features``)."""
    if k.shape[-2] == 0:
        return rank_state_reference(k, v, feat, a=a, key_padding_mask=key_padding_mask, root=root)
    kv, z, c = _LocalState.apply(k, v, a, key_padding_mask, feat, chunk_size, root)
    return State(kv, z, c)
