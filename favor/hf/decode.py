"""favor's attention function with a FavorCache (cache.py): the new tokens against the state.

The model hands over the new tokens' queries, keys and values and a mask over the new keys
only (``FavorLayer.get_mask_sizes``). Plain FAVOR continues the layer's recurrent state
with ``favor.attention(..., initial_state=, return_state=True)``: the chunked causal path
for a prompt, the recurrent step for one or a few tokens. With exact local terms the new
tokens are put behind the kept window E = [last W tokens] + [new tokens], and:

* the far sums of query t (position n + t) are the state plus the keys E[0 .. t - d] that
  are not sinks (d = 1 with a window, 0 without: local.py's delay of W + 1 positions), run
  by ``causal_sums``; the state then absorbs E[0 .. Lq - 1];
* the exact keys are E[t .. t + W] (its window) and the sinks further than W back, the
  same sets as ``window._causal``, combined by ``window.combine_parts``.

So the numbers are those of the teacher-forced pass over the whole sequence, to round-off.
Single tokens without padding take a step of a few dozen ops instead: favor.ops.local.fused
for FAVOR+ features in float32/64 from position S on (before the ring is full too; the layer
then keeps its state in that step's layout, a LeanState, and FavorLayer.state converts it
back for anything else), otherwise exact_step_lean in the steady state (past W + S and the
prompt's first step).

Legend: B batch, H query heads, Hkv key/value heads, Lq new tokens, W window, S sinks.
"""

from __future__ import annotations

import torch

from ..ops import attention as favor_attention
from ..ops.causal import causal_sums
from ..ops.checks import check_scale, compute_dtype
from ..ops.local.dispatch import exact_attention
from ..ops.local.fused import LeanState, fused_eligible, fused_step, ring_positions
from ..ops.local.recurrent import SINK_MARK, ExactState, exact_step_lean, lean_eligible
from ..ops.local.spec import ExactTerms
from ..ops.local.window import combine_parts, pair_features, parts_sum, query_log_scale
from ..ops.normalise import masked_keys
from ..ops.state import State
from ..ops.step_features import step_features
from .adapter import ATTRIBUTE, adapter_of, repeat_kv
from .cache import FavorLayer
from .masks import plan_from_mask

__all__ = ["cached_attention"]


def cached_attention(
    layer: FavorLayer,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    is_causal: bool | None,
) -> tuple[torch.Tensor, None]:
    """favor_attention_forward's result for the new tokens, continuing ``layer``'s state."""
    layer.pending = None
    if layer.lean is not None and attention_mask is None and query.shape[-2] == 1 == key.shape[-2]:
        out = _fused_token(layer, module, query, key, value, scaling, is_causal)
        if out is not None:
            return out, None
    adapter = adapter_of(module, query.shape[1], query.shape[-1], query.device)
    b, h, lq, _ = query.shape
    causal_module = bool(getattr(module, "is_causal", False)) if is_causal is None else bool(is_causal)
    if not causal_module:
        raise ValueError(
            f"a FavorCache holds a causal decoder's state, but {type(module).__name__} is not causal (is_causal=False)"
        )
    plan = plan_from_mask(attention_mask, batch=b, q_length=lq, kv_length=key.shape[-2], is_causal=True)
    if not plan.causal or plan.offset != 0 or plan.kv_length != lq:
        raise ValueError(
            "with a FavorCache the attention mask must be causal over the new tokens (with key padding); "
            f"got a plan {plan.causal=}, {plan.offset=}, {plan.kv_length=} for {lq} new tokens"
        )
    pad = plan.key_padding_mask
    if pad is not None:
        pad = pad.expand(b, lq)
    if adapter.local and adapter.exact_window >= 0 and adapter.feature_map.stabilizer == "exact":
        out = _exact(layer, adapter, query, key, value, pad, scaling)
        # the fused layout in use: the next tokens may take the short path (_fused_token)
        layer.fast = (module, adapter) if layer.lean is not None else None
    elif adapter.local:
        out = _local(layer, adapter, query, key, value, pad, scaling)
    else:
        out = _plain(layer, adapter, query, key, value, pad, scaling)
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def _plain(layer, adapter, query, key, value, pad, scaling) -> torch.Tensor:
    h = query.shape[1]
    k_r, v_r = repeat_kv(key, h), repeat_kv(value, h)
    q, k, scale = adapter.inputs(query, k_r, scaling, keep=None if pad is None else ~pad, sequence=False)
    v = v_r.to(q.dtype)
    out, layer.state = favor_attention(
        q,
        k,
        v,
        adapter.feature_map,
        causal=True,
        key_padding_mask=pad,
        scale=scale,
        initial_state=layer.state,
        return_state=True,
    )
    return out


def _exact(layer, adapter, query, key, value, pad, scaling) -> torch.Tensor:
    """Exact terms through the core op: the prompt by the chunked causal path (the same
    numbers as the teacher-forced pass), later tokens by its step loop, the layer holding an
    ExactState (FAVOR's far state, a ring of the last C + W keys, the sinks); single tokens
    of the steady state by the fused step (``_exact_fused``) or the lean step
    (``_exact_lean``), the same arithmetic to round-off."""
    terms = layer.terms
    if terms is None or (terms.window, terms.sinks, terms.block) != (
        adapter.exact_window,
        adapter.exact_sinks,
        adapter.exact_block,
    ):
        if layer.lean is not None:
            layer.state  # noqa: B018 (back to exact_step's layout: the fused one was made for the old terms)
        terms = layer.terms = ExactTerms(adapter.exact_window, adapter.exact_sinks, adapter.exact_block)
    if layer.lean is None and layer.state is not None and not isinstance(layer.state, ExactState):
        raise ValueError("this FavorCache layer holds a plain FAVOR state; its adapter now asks for exact terms")
    if pad is not None:
        layer.padded = True  # its slots may hold padding: the lean step never looks
    elif query.shape[-2] == 1 and layer.has_state and not layer.padded and not torch.is_grad_enabled():
        out = None
        if fused_eligible(terms, layer.start, layer.built):
            out = _exact_fused(layer, adapter, terms, query, key, value, scaling)
        if out is not None:
            return out
        if lean_eligible(terms, layer.start, layer.built):
            return _exact_lean(layer, adapter, terms, query, key, value, scaling)
    h = query.shape[1]
    k_r, v_r = repeat_kv(key, h), repeat_kv(value, h)
    q, k, scale, qx, kx = adapter.inputs_and_logits(query, k_r, scaling, keep=None, sequence=False)
    dtype = compute_dtype(q.dtype)
    q, k, v, qx, kx = q.to(dtype), k.to(dtype), v_r.to(dtype), qx.to(dtype), kx.to(dtype)
    root = check_scale(scale, q.shape[-1]) ** 0.5
    if layer.state is None:  # the prompt: its state is made from the whole sequence
        layer.built = layer.start + q.shape[-2]
    out, layer.state = exact_attention(
        q,
        k,
        v,
        adapter.feature_map,
        terms,
        causal=True,
        root=root,
        key_padding_mask=pad,
        initial_state=layer.state,
        return_state=True,
        qx=qx,
        kx=kx,
        log_const=adapter.log_const(dtype),
        # the cache owns its state and replaces it by the result (the prompt's state is new)
        inplace=not torch.is_grad_enabled(),
    )
    return out


def _fused_token(layer, module, query, key, value, scaling, is_causal) -> torch.Tensor | None:
    """The fused layout's next token by a short path: one token, no mask (causal over itself,
    no padding), a layer already in the fused layout (so past the sinks, the prompt's first
    step and any padding: ``_exact``'s other conditions hold for every later single token),
    and the module and adapter of the last fused step. What can change between two tokens is
    checked again: the adapter and its exact terms, causality, grad and inference mode, the
    dtype, the constants' buffers (lean_constants) and their layout. None where anything
    differs: the full path then decides, and raises where it must. In a model every layer
    runs this per token between weights that evict the caches, where each Python line costs
    several times what it costs warm: hence the short path."""
    fast, lean, terms = layer.fast, layer.lean, layer.terms
    if fast is None or fast[0] is not module:
        return None
    adapter = fast[1]
    dtype = lean.k.dtype
    if (
        module._modules.get(ATTRIBUTE) is not adapter
        or adapter.exact_window != terms.window
        or adapter.exact_sinks != terms.sinks
        or adapter.exact_block != terms.block
        or not (module.is_causal if is_causal is None else is_causal)
        or query.dtype != dtype
        or key.dtype != dtype
        or value.dtype != dtype
        or torch.is_grad_enabled()
        or torch.is_inference_mode_enabled()
    ):
        return None
    consts = adapter.lean_constants(scaling, dtype, query.device, graph_free=True)  # both modes checked off
    if consts is None or consts.shared(key.shape[1]) != lean.shared:
        return None
    out = fused_step(lean, consts, query, key, value, layer.start)
    lean.length = layer.start + 1
    return out.transpose(1, 2)  # (B, 1, H, Dv): contiguous as it is (one token), no copy op


def _exact_fused(layer, adapter, terms, query, key, value, scaling) -> torch.Tensor | None:
    """One token of the steady state by favor.ops.local.fused (FAVOR+ features, float32 or
    float64 rows): the layer's state kept in the fused layout (a LeanState) from the first
    such token on, and converted back to an ExactState whenever anything else reads it
    (FavorLayer.state). None where it does not apply: then ``_exact_lean`` runs."""
    dtype = query.dtype
    if (
        dtype not in (torch.float32, torch.float64)
        or key.dtype != dtype
        or value.dtype != dtype
        or torch.is_inference_mode_enabled()  # the constants would be remade every token
    ):
        return None
    # grad mode checked off by _exact, inference mode above: no graph is recorded
    consts = adapter.lean_constants(scaling, dtype, query.device, graph_free=True)
    if consts is None:
        return None
    shared = consts.shared(key.shape[1])
    lean = layer.lean
    if lean is not None and lean.shared != shared:  # the buffers changed: the layout follows
        layer.state  # noqa: B018 (back to exact_step's layout, entered again below)
        lean = None
    if lean is None:
        state = layer.state
        if state.keys_x.dtype != dtype:
            return None
        lean = _enter(layer, adapter, terms, state, key.shape[1], scaling, shared)
    out = fused_step(lean, consts, query, key, value, layer.start)
    lean.length = layer.start + 1
    return out


def _enter(layer, adapter, terms, state: ExactState, kv_heads: int, scaling, shared: bool) -> LeanState:
    """The fused layout of ``state`` (no padding; before the ring is full some slots are
    empty): raw keys back from the logit inputs k* = (k - c) root of each group's first
    head (the same key for the whole group, to round-off), values of each group's first
    head, the far state as it is (with ``shared``, each group's first head's:
    LeanConstants.shared)."""
    h = state.keys_x.shape[1]
    g = h // kv_heads
    root = (adapter.dim**-0.5 if scaling is None else scaling) ** 0.5
    kx = state.keys_x[:, ::g]
    k = kx / root
    if adapter._calibrated():
        k = k + adapter.key_shift.to(kx.dtype)[::g, None, :]
    live = state.pos[0, 0] >= 0  # no padding: every row and head alike
    live = None if bool(live.all()) else live  # host sync: once, entering
    lean = LeanState.enter(state.far, k, state.values[:, ::g], ring=terms.ring(), shared=shared, live=live)
    lean.length = int(state.length)  # host sync: once, entering

    def leave(lean: LeanState) -> ExactState:
        """exact_step's ExactState of the fused layout, its key inputs made by the adapter
        from the raw keys as the general step makes them."""
        raw_k, raw_v = lean.raw()
        k_r = repeat_kv(raw_k, lean.heads)
        _, keys, _, _, keys_x = adapter.inputs_and_logits(k_r, k_r, scaling, keep=None, sequence=False)
        t = lean.length
        dtype = raw_v.dtype
        pos = ring_positions(t, terms.ring(), terms.sinks, SINK_MARK, device=raw_v.device)
        pos = pos.expand(*keys_x.shape[:2], -1).clone()
        length = torch.tensor(t, dtype=torch.long, device=raw_v.device)
        values = repeat_kv(raw_v, lean.heads).clone()
        keys, keys_x = keys.to(dtype), keys_x.to(dtype)
        if t < lean.steady:  # empty slots hold zeros, as exact_step's state (never read)
            empty = (pos < 0)[..., None]
            keys, keys_x, values = (x.masked_fill(empty, 0.0) for x in (keys, keys_x, values))
        return ExactState(lean.far_state(), keys, keys_x, values, pos, length)

    layer.state = None
    layer.lean, layer.lean_exit = lean, leave
    return lean


def _exact_lean(layer, adapter, terms, query, key, value, scaling) -> torch.Tensor:
    """One token of the steady state (``lean_eligible``, no padding): ``_exact``'s numbers
    with a few dozen ops fewer: GQA's repeat as one index_select per tensor, both rows'
    reparametrisation in one pass (``FavorAdapter.step_inputs``), the position the layer's
    Python int, and ``exact_step_lean`` (no checks, masks or host reads)."""
    h, hkv = query.shape[1], key.shape[1]
    if hkv != h:
        made = layer.head_index
        if made is None or made[:2] != (h, hkv) or made[2].device != key.device:
            if h % hkv:
                raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hkv})")
            index = torch.arange(hkv, device=key.device).repeat_interleave(h // hkv)
            made = layer.head_index = (h, hkv, index)
        key, value = key.index_select(1, made[2]), value.index_select(1, made[2])
    q, k, scale, qx, kx = adapter.step_inputs(query, key, scaling)
    dtype = compute_dtype(q.dtype)
    v = value
    if not (q.dtype == k.dtype == v.dtype == qx.dtype == kx.dtype == dtype):
        q, k, v, qx, kx = q.to(dtype), k.to(dtype), v.to(dtype), qx.to(dtype), kx.to(dtype)
    root = check_scale(scale, q.shape[-1]) ** 0.5
    feat, a = step_features(adapter.feature_map, root, q, k)
    return exact_step_lean(layer.state, terms, feat, a, q, k, qx, kx, v, adapter.log_const(dtype), t=layer.start)


def _empty(b: int, heads: int, n: int, like: torch.Tensor):
    """n dead slots: zero keys and values (B, Hkv, n, D) and "real token" flags False (B, n)."""
    zeros = like.new_zeros(b, heads, n, like.shape[-1])
    return zeros, zeros.clone(), torch.zeros(b, n, dtype=torch.bool, device=like.device)


def _local(layer, adapter, query, key, value, pad, scaling) -> torch.Tensor:
    """Exact sinks without a window (exact_window = -1) or the official stabiliser: the
    window-and-sinks arithmetic of favor.ops.local.window, step by step."""
    if adapter.exact_block > 1:
        raise ValueError(
            f"decoding with a FavorCache keeps a window of keys, not blocks: this layer has exact_block="
            f"{adapter.exact_block}; generate without a cache (use_cache=False) or performerize with exact_block=1"
        )
    b, h, lq, _ = query.shape
    hkv = key.shape[1]
    window, sinks = max(adapter.exact_window, -1), adapter.exact_sinks
    kept = max(window, 0)  # tokens kept behind the new ones
    n = layer.start
    live = torch.ones(b, lq, dtype=torch.bool, device=query.device) if pad is None else ~pad
    if layer.window is None:
        layer.window = _empty(b, hkv, kept, key)
        layer.sinks = _empty(b, hkv, sinks, key)
    # the sinks are the first S positions of the sequence (padding included, flagged dead)
    sk, sv, s_live = layer.sinks
    fill = min(sinks, n + lq) - n
    if fill > 0:
        sk, sv, s_live = sk.clone(), sv.clone(), s_live.clone()
        sk[:, :, n : n + fill], sv[:, :, n : n + fill], s_live[:, n : n + fill] = (
            key[:, :, :fill],
            value[:, :, :fill],
            live[:, :fill],
        )
        layer.sinks = (sk, sv, s_live)
    wk, wv, w_live = layer.window
    ek, ev, e_live = torch.cat([wk, key], -2), torch.cat([wv, value], -2), torch.cat([w_live, live], -1)
    # E's positions n - kept .. n + lq - 1; slots before position 0 are dead already

    # reparametrised inputs of [sinks, E] in one call (causal: per token, no sequence statistic)
    all_k, all_v = repeat_kv(torch.cat([sk, ek], -2), h), repeat_kv(torch.cat([sv, ev], -2), h)
    # the logits never pass through the adapter's maps (FavorAdapter.inputs_and_logits)
    q, k, scale, qx, kx = adapter.inputs_and_logits(query, all_k, scaling, keep=None, sequence=False)
    dtype = compute_dtype(q.dtype)
    q, k, v = q.to(dtype), k.to(dtype), all_v.to(dtype)
    root = check_scale(scale, q.shape[-1]) ** 0.5
    qx, kx = qx.to(dtype), kx.to(dtype)
    s_kx, e_kx, e_v = kx[..., :sinks, :], kx[..., sinks:, :], v[..., sinks:, :]
    s_v = v[..., :sinks, :]
    fm = adapter.feature_map
    if fm.stabilizer == "exact":  # the step's row features and A, kept on the map between tokens
        feat, a = step_features(fm, root, q, k)
        fq, fk = feat(q, a), feat(k[..., sinks:, :], a)
    else:
        fq, fk = pair_features(fm, q, k[..., sinks:, :], root, None, causal=True)

    # far sums: query t sees the state and E[0 .. t - d] that are real and not sinks
    d = 1 if window >= 0 else 0
    positions = torch.arange(n - kept, n - kept + lq, device=query.device)
    far_key = e_live[:, :lq] & (positions >= sinks)[None, :]  # (B, Lq)
    fk_vals, fk_log = masked_keys(
        type(fk)(fk.values[..., :lq, :], None if fk.log_scale is None else fk.log_scale[..., :lq]),
        ~far_key[:, None, :],
    )
    pad_rows = torch.nn.functional.pad
    qv = pad_rows(fq.values, (0, 0, 0, d))  # d dummy queries after the last
    kvals = pad_rows(fk_vals, (0, 0, d, 0))  # d dead keys in front
    klog = pad_rows(fk_log, (d, 0), value=float("-inf"))
    kv_in = pad_rows(e_v[..., :lq, :], (0, 0, d, 0))
    state = layer.state
    if state is None:
        state = State.empty(qv.shape[:-2], kvals.shape[-1], kv_in.shape[-1], dtype=dtype, device=query.device)
    far_num, far_den, run, layer.state = causal_sums(qv, kvals, klog, kv_in, state)
    far_num, far_den, run = far_num[..., :lq, :], far_den[..., :lq], run[..., :lq]
    run = torch.where(torch.isfinite(run), run, torch.zeros_like(run))  # no far key yet: sums are 0

    # exact keys: the window E[t .. t + W] and the sinks further than W back
    logits, parts = [], []
    if window >= 0:
        wx = e_kx.unfold(-2, window + 1, 1)  # (B, H, Lq, D, W + 1)
        w_ok = e_live.unfold(-1, window + 1, 1)[:, None]  # (B, 1, Lq, W + 1)
        logits.append(torch.einsum("bhtd,bhtdw->bhtw", qx, wx).masked_fill(~w_ok, float("-inf")))
        wvals = e_v.unfold(-2, window + 1, 1)  # (B, H, Lq, Dv, W + 1)
        parts.append((window + 1, lambda c: torch.einsum("bhtw,bhtdw->bhtd", c, wvals)))
    if sinks:
        at = torch.arange(n, n + lq, device=query.device)[:, None]
        far = (at - torch.arange(sinks, device=query.device)[None, :]) > window  # (Lq, S)
        ok = far[None, None] & layer.sinks[2][:, None, None, :]
        logits.append((qx @ s_kx.transpose(-1, -2)).masked_fill(~ok, float("-inf")))
        parts.append((sinks, lambda c: c @ s_v))

    q_scale = query_log_scale(fq, far_den)
    out = combine_parts(
        far_num, far_den, run, torch.cat(logits, -1), adapter.log_const(dtype), q_scale, parts_sum(parts)
    )
    # keep the last W tokens of E for the next call
    # (copies: a view would keep the whole prompt's keys alive)
    layer.window = tuple(
        t.narrow(dim, t.shape[dim] - kept, kept).clone() for t, dim in ((ek, -2), (ev, -2), (e_live, -1))
    )
    return out
