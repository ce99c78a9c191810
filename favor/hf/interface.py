"""The attention function registered with transformers as "favor".

transformers calls ``fn(module, query, key, value, attention_mask, dropout=, scaling=, **kw)``
with query (B, H, Lq, D), key/value (B, Hkv, Lk, D) and a 4D mask or None, and expects
``(out (B, Lq, H, D), weights or None)``. The layer's FavorAdapter (``module.favor``, put
there by ``performerize``) holds its feature map and reparametrisation.
"""

from __future__ import annotations

import logging

import torch

from ..ops import attention as favor_attention
from ..ops.checks import check_scale, compute_dtype
from ..ops.cross import cross_attention
from ..ops.local.bidirectional_fast import fast_eligible, local_fast
from ..ops.local.block import block_exact_attention
from ..ops.local.dispatch import exact_attention
from ..ops.local.spec import ExactTerms
from ..ops.local.window import local_exact_attention, pair_features
from .adapter import ATTRIBUTE, adapter_of, repeat_kv
from .cache import claim
from .decode import cached_attention
from .masks import plan_from_mask
from .refusals import check_keywords

__all__ = ["favor_attention_forward", "ATTRIBUTE"]

log = logging.getLogger(__name__)

_warned_dropout = False
_warned_kv_cache = False


def _check_inputs(query, key, value) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 4D tensor (B, heads, L, head dim), got {got}")
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(
            f"key and value must share (B, key/value heads, Lk), got key {tuple(key.shape)}, value {tuple(value.shape)}"
        )


def _local_forward(adapter, query, key, q, k, v, scale, scaling, keep, pad, *, causal: bool) -> torch.Tensor:
    """FAVOR with exact local terms (local.py): the adapter's features of (q, k), and the
    logits they estimate from the raw query and key. Queries that sit at the end of the keys
    (decoding with a cache) get zero queries in front, as in the plain path."""
    offset = k.shape[-2] - q.shape[-2]
    if causal and offset > 0:
        query = torch.cat([query.new_zeros(*query.shape[:-2], offset, query.shape[-1]), query], dim=-2)
        q = torch.cat([q.new_zeros(*q.shape[:-2], offset, q.shape[-1]), q], dim=-2)
    dtype = compute_dtype(q.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    root = check_scale(scale, q.shape[-1]) ** 0.5
    mask = None if pad is None else pad[:, None, :]  # (B, 1, L): broadcasts over heads
    fm = adapter.feature_map
    # the logits the features estimate, from the raw query and shifted key: never through the
    # adapter's maps, which fitting may leave other than A, A^-T (FavorAdapter.inputs_and_logits)
    qx, kx = adapter.logit_inputs(query, key, scaling, keep=keep, sequence=not causal)
    qx, kx = qx.to(dtype), kx.to(dtype)
    exact = dict(
        window=adapter.exact_window,
        sinks=adapter.exact_sinks,
        log_const=adapter.log_const(dtype),
        key_padding_mask=pad,
    )
    if causal and fm.stabilizer == "exact" and adapter.exact_window >= 0:
        # the core causal path (favor.ops.local): chunks, far state, hand-written backward
        terms = ExactTerms(adapter.exact_window, adapter.exact_sinks, adapter.exact_block)
        out = exact_attention(
            q, k, v, fm, terms, causal=True, root=root, key_padding_mask=pad, qx=qx, kx=kx, log_const=exact["log_const"]
        )
        return out[..., offset:, :]
    if causal and adapter.exact_block > 1:
        raise ValueError(
            f"exact_block={adapter.exact_block} in a causal layer needs exact_window >= 0 and stabilizer='exact'"
        )
    if not causal and fm.stabilizer == "exact" and fm.kernel in ("positive", "oprf"):
        a = fm.oprf_a(q * root, k * root, q_mask=mask, k_mask=mask) if fm.kernel == "oprf" else None
        if fast_eligible(fm, a):  # the same numbers with a hand-written backward (local_fast.py)
            return local_fast(fm, q, k, qx, kx, v, root=root, a=a, exact_block=adapter.exact_block, **exact)
    fq, fk = pair_features(fm, q, k, root, mask, causal=causal)
    if adapter.exact_block > 1:  # the autograd path of the blocks (local_block.py)
        return block_exact_attention(fq, fk, qx, kx, v, block=adapter.exact_block, **exact)
    return local_exact_attention(fq, fk, qx, kx, v, causal=causal, **exact)[..., offset:, :]


def favor_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,  # model-specific extras: refusals.check_keywords passes those that leave the weights alone
) -> tuple[torch.Tensor, None]:
    global _warned_dropout, _warned_kv_cache
    _check_inputs(query, key, value)
    check_keywords(module, kwargs)
    layer = claim(key)  # the keys came from a FavorCache: continue its state (decode.py)
    if layer is not None:
        return cached_attention(layer, module, query, key, value, attention_mask, scaling, is_causal)
    adapter = adapter_of(module, query.shape[1], query.shape[-1], query.device)
    if dropout and not _warned_dropout:
        log.warning("attention dropout (p=%s) is not applied by FAVOR (it never forms the weights)", dropout)
        _warned_dropout = True
    b, h, lq, _ = query.shape
    lk = key.shape[-2]
    causal_module = bool(getattr(module, "is_causal", False)) if is_causal is None else bool(is_causal)
    plan = plan_from_mask(attention_mask, batch=b, q_length=lq, kv_length=lk, is_causal=causal_module)
    if plan.causal and plan.offset > 0 and not _warned_kv_cache:
        log.warning(
            "%s decodes with a key/value cache that is not a FavorCache (e.g. transformers' DynamicCache): "
            "FAVOR is recomputed over all %d cached keys for every new token (O(L) time and memory per "
            "token, same numbers). Pass cache=favor.hf.FavorCache(model) (model.generate does) for O(1)",
            type(module).__name__,
            lk,
        )
        _warned_kv_cache = True
    key, value = repeat_kv(key, h)[..., : plan.kv_length, :], repeat_kv(value, h)[..., : plan.kv_length, :]
    pad = plan.key_padding_mask
    if pad is not None:
        pad = pad[:, : plan.kv_length].expand(b, plan.kv_length)
    # a sequence mean would carry future tokens into a causal layer: it keeps the constant shift
    keep = None if pad is None else ~pad
    cross = bool(getattr(adapter, "cross_attention", False))  # set by performerize (cross.py)
    q, k, scale = adapter.inputs(query, key, scaling, keep=keep, sequence=not plan.causal and not cross)
    v = value.to(q.dtype)
    if cross:
        out = cross_attention(adapter.feature_map, q, k, v, scale, pad)
        if plan.dead_queries is not None:
            out = out.masked_fill(plan.dead_queries[:, None, :, None], 0.0)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None
    if adapter.local:
        if not plan.causal and lq != plan.kv_length:
            raise ValueError(
                f"exact local terms pair each query with the keys at nearby positions of its own sequence; "
                f"{type(module).__name__} has {lq} queries and {plan.kv_length} keys without a causal mask "
                "(cross-attention?), which has no such neighbours. performerize gives plain FAVOR to the "
                "cross-attention modules it sees run; this one was not seen as one"
            )
        out = _local_forward(adapter, query, key, q, k, v, scale, scaling, keep, pad, causal=plan.causal)
        if plan.dead_queries is not None:
            out = out.masked_fill(plan.dead_queries[:, None, :, None], 0.0)
        return out.to(query.dtype).transpose(1, 2).contiguous(), None
    if plan.causal and plan.offset > 0:
        # queries sit at the end of the keys (decoding with a cache): run the causal pass over
        # all keys with zero queries in front, so the numbers equal the teacher-forced pass
        q = torch.cat([q.new_zeros(b, h, plan.offset, q.shape[-1]), q], dim=-2)
    out = favor_attention(q, k, v, adapter.feature_map, causal=plan.causal, key_padding_mask=pad, scale=scale)
    out = out[..., out.shape[-2] - lq :, :]
    if plan.dead_queries is not None:
        out = out.masked_fill(plan.dead_queries[:, None, :, None], 0.0)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None
