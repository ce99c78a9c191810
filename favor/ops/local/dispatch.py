"""One entry for exact terms: the fast paths where the map allows, the autograd paths
where it does not (a trained projection, maps without hand-written gradients), the step
loop for a continued causal pass. ``favor.attention(..., exact=)`` and ``favor.hf`` call it."""

from __future__ import annotations

import torch

from ...features.feature_map import FeatureMap
from ..row_features import row_features
from ..state import State
from ..step_features import step_features
from .bidirectional_fast import fast_eligible, local_fast
from .block import block_exact_attention
from .causal_fast import DEFAULT_CHUNK, causal_exact_autograd, causal_exact_fast
from .recurrent import ExactState, absorb, exact_state_from_sequence, exact_step
from .spec import ExactTerms
from .window import pair_features

__all__ = ["exact_attention", "exact_steps", "feature_rows"]

#: rows whose key features are alive at a time when a state is built from a whole sequence
STATE_ROWS = 4096


def _a(feature_map: FeatureMap, q, k, root, mask, *, causal: bool):
    if feature_map.kernel != "oprf":
        return None
    return feature_map.oprf_a(q * root, k * root, causal=causal, q_mask=mask, k_mask=mask)


def feature_rows(feat, x: torch.Tensor, a) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (..., L, M'), log scales (..., L); zeros for maps without one)."""
    f = feat(x, a)
    log = f.log_scale if f.log_scale is not None else torch.zeros_like(x[..., 0])
    return f.values, log.expand(x.shape[:-1])


def exact_steps(
    state, terms, feature_map, q, k, v, *, root, qx=None, kx=None, log_const=0.0, valid=None, inplace=False
):
    """A continued causal pass, position by position (the recurrent arithmetic):
    q, k (..., Lq, D), v (..., Lq, Dv) after ``state`` (an ExactState or None); ``valid``
    bool broadcasting against (..., Lq): False for padding. ``inplace``: the caller owns
    ``state`` and replaces it by the result, so its tensors are updated where they are."""
    feat, a = step_features(feature_map, root, q[..., :1, :], k[..., :1, :])
    qx = q * root if qx is None else qx
    kx = k * root if kx is None else kx
    if state is None:
        lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        m = getattr(feat, "width", None) or feat(k[..., :1, :], a).values.shape[-1]
        state = ExactState.empty(lead, terms, k.shape[-1], kx.shape[-1], m, v.shape[-1], dtype=q.dtype, device=q.device)
    outs = []
    for t in range(q.shape[-2]):
        live = None if valid is None else valid.select(-1, t)
        row = (x.select(-2, t) for x in (q, k, qx, kx, v))  # select: cheaper than [..., t, :]
        o, state = exact_step(state, terms, feat, a, *row, log_const, live, inplace=inplace)
        outs.append(o)
    return (outs[0][..., None, :] if len(outs) == 1 else torch.stack(outs, -2)), state


def _state_after(terms, feat, a, k, kx, v, valid) -> ExactState:
    """The ExactState after the whole sequence: the far state over the keys before the next
    query's exact set (sinks excluded), key features STATE_ROWS rows at a time, then the
    ring and the sinks (exact_state_from_sequence)."""
    length = k.shape[-2]
    keep = max(0, min(length, (length // terms.block) * terms.block - terms.window))
    lead = torch.broadcast_shapes(k.shape[:-2], v.shape[:-2])
    m = getattr(feat, "width", None) or feat(k[..., :1, :], a).values.shape[-1]
    far = State.empty(lead, m, v.shape[-1], dtype=k.dtype, device=k.device)
    for s in range(terms.sinks, keep, STATE_ROWS):
        e = min(s + STATE_ROWS, keep)
        f, l = feature_rows(feat, k[..., s:e, :], a)
        rows = (e - s,)
        take = None if valid is None else valid[..., s:e].expand(*lead, *rows)
        far = absorb(
            far,
            f.expand(*lead, *rows, f.shape[-1]),
            l.expand(*lead, *rows),
            v[..., s:e, :].expand(*lead, *rows, v.shape[-1]),
            take,
        )
    return exact_state_from_sequence(terms, k, kx, v, valid, far, length=length)


def exact_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: FeatureMap,
    terms: ExactTerms,
    *,
    causal: bool,
    root: float,
    key_padding_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    initial_state: ExactState | None = None,
    return_state: bool = False,
    qx: torch.Tensor | None = None,
    kx: torch.Tensor | None = None,
    log_const: torch.Tensor | float = 0.0,
    inplace: bool = False,
):
    """FAVOR with exact terms; q, k (..., L, D) in the compute dtype, not yet scaled
    (``root`` = sqrt(scale)), v (..., L, Dv); ``key_padding_mask`` bool (B, L) or broadcasting
    against (..., L), True for padding; qx, kx: the inputs whose dot products the features
    estimate, already scaled (default q root, k root); ``log_const`` log E[phi.phi] - q.k.
    ``inplace``: the caller owns ``initial_state`` and replaces it by the returned state
    (a cache), so a continued pass updates its tensors instead of copying them."""
    if not isinstance(terms, ExactTerms):
        raise TypeError(f"exact must be a favor.ExactTerms, got {type(terms).__name__}")
    if feature_map.stabilizer != "exact":
        raise ValueError("exact terms need stabilizer='exact' (the official key max looks at the whole sequence)")
    if initial_state is not None and not isinstance(initial_state, ExactState):
        raise TypeError(
            f"with exact terms initial_state must be a favor.ExactState, got {type(initial_state).__name__}"
        )
    if not causal and (initial_state is not None or return_state):
        raise ValueError("initial_state / return_state apply to causal attention only (causal=True)")
    if initial_state is None and q.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"exact terms pair each query with keys at nearby positions of its own sequence: q has {q.shape[-2]} "
            f"positions and k {k.shape[-2]} (use initial_state to continue a causal sequence)"
        )
    mask = key_padding_mask
    valid = None
    if mask is not None:
        m = (
            mask
            if mask.ndim == 1 or mask.shape == q.shape[:-1]
            else mask.reshape(mask.shape[0], *([1] * (q.ndim - 3)), mask.shape[-1])
        )
        valid = ~m
    if causal:
        if initial_state is not None:
            out, state = exact_steps(
                initial_state,
                terms,
                feature_map,
                q,
                k,
                v,
                root=root,
                qx=qx,
                kx=kx,
                log_const=log_const,
                valid=valid,
                inplace=inplace,
            )
            return (out, state) if return_state else out
        feat = row_features(feature_map, root)
        a = _a(feature_map, q, k, root, None, causal=True)
        trained = torch.is_grad_enabled() and any(b.requires_grad for b in feature_map.buffers())
        run = causal_exact_autograd if trained else causal_exact_fast
        out = run(
            q,
            k,
            v,
            feat,
            terms,
            root=root,
            qx=qx,
            kx=kx,
            a=a,
            log_const=log_const,
            key_padding_mask=None if valid is None else ~valid,
            chunk_size=chunk_size or DEFAULT_CHUNK,
        )
        if not return_state:
            return out
        with torch.no_grad():
            state = _state_after(terms, feat, a, k, k * root if kx is None else kx, v, valid)
        return out, state
    # bidirectional: local_fast (hand-written backward) or the autograd block path
    four = q.ndim == 3
    if four:
        q, k, v = q[:, None], k[:, None], v[:, None]
        qx = None if qx is None else qx[:, None]
        kx = None if kx is None else kx[:, None]
        if isinstance(log_const, torch.Tensor) and log_const.ndim >= 3:  # (B, 1, 1): the new head axis too
            log_const = log_const.unsqueeze(-3)
    pad = None if mask is None else (mask if mask.ndim == 2 else mask.reshape(mask.shape[0], mask.shape[-1]))
    qx = q * root if qx is None else qx
    kx = k * root if kx is None else kx
    pm = None if pad is None else pad[:, None, :]
    a = _a(feature_map, q, k, root, pm, causal=False)
    trained = torch.is_grad_enabled() and any(b.requires_grad for b in feature_map.buffers())
    if not trained and fast_eligible(feature_map, a):
        out = local_fast(
            feature_map,
            q,
            k,
            qx,
            kx,
            v,
            root=root,
            window=terms.window,
            sinks=terms.sinks,
            a=a,
            log_const=log_const,
            key_padding_mask=pad,
            exact_block=terms.block,
        )
    else:
        fq, fk = pair_features(feature_map, q, k, root, pm)
        out = block_exact_attention(
            fq,
            fk,
            qx,
            kx,
            v,
            window=terms.window,
            sinks=terms.sinks,
            block=terms.block,
            log_const=log_const,
            key_padding_mask=pad,
        )
    return out[:, 0] if four else out
