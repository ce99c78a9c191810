"""Decoding with exact terms: one token at a time, state bytes independent of context.

The state is FAVOR's far state (kv, z, log scale: keys that left every later query's exact
set, sinks excluded), a ring of the last C + W positions (the keys each later query may
still take exactly: their logit inputs, values, features and feature log scales) and the
first S tokens. A new token first moves the ring's keys that fall out of its exact set
(positions before floor(t / C) C - W) into the far state, then takes its place in the ring,
then attends: the same sums as the chunked path (causal_fast.py), one row at a time.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .._chunking import inverse
from ..state import State
from .spec import ExactTerms

__all__ = ["ExactState", "exact_step", "exact_state_from_sequence", "absorb"]

NEG_INF = float("-inf")


class ExactState(NamedTuple):
    """Everything decoding with exact terms needs from the past, fixed size: far (State over
    keys that are far for every later query), ring_* (..., R = C + W, .) the recent keys
    (their feature inputs, logit inputs and values; ``ring_pos`` their positions, -1 empty),
    sink_* (..., S, .) the first S tokens (``sink_live`` False where absent or padding),
    ``length`` the tokens seen (a 0-d tensor)."""

    far: State
    ring_k: torch.Tensor  # (..., R, D') feature inputs of the keys (their features are made on leaving)
    ring_kx: torch.Tensor  # (..., R, D) logit inputs, already scaled
    ring_v: torch.Tensor  # (..., R, Dv)
    ring_pos: torch.Tensor  # (..., R) long, -1 empty
    sink_kx: torch.Tensor  # (..., S, D)
    sink_v: torch.Tensor  # (..., S, Dv)
    sink_live: torch.Tensor  # (..., S) bool
    length: torch.Tensor  # () long

    @classmethod
    def empty(cls, lead, terms: ExactTerms, d_in: int, d: int, m: int, dv: int, *, dtype, device) -> ExactState:
        r, s = terms.ring(), terms.sinks
        z = dict(dtype=dtype, device=device)
        return cls(
            State.empty(tuple(lead), m, dv, dtype=dtype, device=device),
            torch.zeros(*lead, r, d_in, **z),
            torch.zeros(*lead, r, d, **z),
            torch.zeros(*lead, r, dv, **z),
            torch.full((*lead, r), -1, dtype=torch.long, device=device),
            torch.zeros(*lead, s, d, **z),
            torch.zeros(*lead, s, dv, **z),
            torch.zeros(*lead, s, dtype=torch.bool, device=device),
            torch.zeros((), dtype=torch.long, device=device),
        )

    def to(self, *args, **kwargs) -> ExactState:
        """Float fields to a dtype/device; positions, flags and length keep their dtype."""
        moved = [self.far.to(*args, **kwargs)]
        for name in self._fields[1:]:
            t = getattr(self, name)
            if t.is_floating_point():
                moved.append(t.to(*args, **kwargs))
            else:
                dev = kwargs.get("device", next((x for x in args if isinstance(x, (str, torch.device))), t.device))
                moved.append(t.to(dev))
        return ExactState(*moved)


def absorb(far: State, f: torch.Tensor, l: torch.Tensor, v: torch.Tensor, take: torch.Tensor | None = None) -> State:
    """far plus keys: features f (..., n, M'), log scales l (..., n), values v (..., n, Dv);
    ``take`` (..., n) bool: only those (None: all)."""
    if l.shape[-1] == 0:
        return far
    if take is not None:
        l = l.masked_fill(~take, NEG_INF)
    kv, z, c = far
    new_c = torch.maximum(c, l.amax(-1))
    safe = torch.where(torch.isfinite(new_c), new_c, torch.zeros_like(new_c))
    w = torch.exp(l - safe[..., None])  # 0 for keys not taken
    decay = torch.exp(c - safe)  # 0 for an empty far state (c = -inf, safe finite)
    fw = f * w[..., None]
    kv = torch.addcmul(fw.mT @ v, kv, decay[..., None, None])
    z = torch.addcmul(fw.sum(-2), z, decay[..., None])
    return State(kv, z, new_c)


def _start(t: int, terms: ExactTerms) -> int:
    return (t // terms.block) * terms.block - terms.window


def _put(buffer: torch.Tensor, slot: int, row: torch.Tensor) -> torch.Tensor:
    """A copy of ``buffer`` (..., R, X) with row ``slot`` replaced by ``row`` (..., X): the
    caller's state is never written."""
    out = buffer.clone()
    out[..., slot, :] = row
    return out


def exact_step(
    state: ExactState,
    terms: ExactTerms,
    feat,
    a,
    q: torch.Tensor,
    k: torch.Tensor,
    qx: torch.Tensor,
    kx: torch.Tensor,
    v: torch.Tensor,
    log_const: torch.Tensor | float = 0.0,
    live: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ExactState]:
    """One token: its query and key q, k (..., D') as the features take them
    (``feat(x, a)``), their logit inputs qx, kx (..., D) (already scaled), v (..., Dv) ->
    (out (..., Dv), new state). The keys that leave the exact set go into the far state
    (their features made now, from ``ring_k``). ``live`` bool broadcasting against (...):
    False where the token is padding (its key is never attended)."""
    t = int(state.length)  # host sync: positions decide which slots move (one small read per token)
    r = state.ring_pos.shape[-1]
    far = state.far
    start, before = _start(t, terms), _start(t - 1, terms) if t else -terms.window
    leaving = [p for p in range(max(before, terms.sinks, 0), start) if p >= t - r]
    if leaving:
        slots = torch.tensor([p % r for p in leaving], device=q.device)
        fk = feat(state.ring_k.index_select(-2, slots), a)
        lk = fk.log_scale if fk.log_scale is not None else torch.zeros_like(fk.values[..., 0])
        real = state.ring_pos.index_select(-1, slots) >= 0  # padding never enters the far state
        far = absorb(far, fk.values, lk.expand(fk.values.shape[:-1]), state.ring_v.index_select(-2, slots), real)
    ring_k, ring_kx, ring_v, pos = state.ring_k, state.ring_kx, state.ring_v, state.ring_pos
    sink_kx, sink_v, sink_live = state.sink_kx, state.sink_v, state.sink_live
    s = terms.sinks
    if t < s:  # a sink: kept exactly for ever, never in the ring or the far state
        sink_kx, sink_v = _put(sink_kx, t, kx), _put(sink_v, t, v)
        sink_live = sink_live.clone()
        sink_live[..., t] = True if live is None else live
    else:
        slot = t % r
        ring_k, ring_kx, ring_v = _put(ring_k, slot, k), _put(ring_kx, slot, kx), _put(ring_v, slot, v)
        pos = pos.clone()
        pos[..., slot] = t if live is None else torch.where(live, t, -1)
    pos_live = (pos >= start) & (pos >= 0)
    fq = feat(q[..., None, :], a)
    fqv = fq.values[..., 0, :]
    lq = fq.log_scale[..., 0] if fq.log_scale is not None else torch.zeros_like(fqv[..., 0])
    if isinstance(log_const, torch.Tensor):
        log_const = log_const[..., 0]  # (..., 1, 1) -> (..., 1)
    # every term of the row relative to the query's feature scale, then to the row's max
    shift = log_const - lq[..., None]
    log_ring = ((ring_kx @ qx[..., :, None])[..., 0] + shift).masked_fill(~pos_live, NEG_INF)
    top = torch.maximum(log_ring.amax(-1), far.log_scale)
    if s:
        log_sink = ((sink_kx @ qx[..., :, None])[..., 0] + shift).masked_fill(~sink_live, NEG_INF)
        top = torch.maximum(top, log_sink.amax(-1))
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w_ring = torch.exp(log_ring - top[..., None])
    carry = torch.exp(far.log_scale - top)  # 0 for an empty far state
    nd = torch.cat([(w_ring[..., None, :] @ ring_v)[..., 0, :], w_ring.sum(-1, keepdim=True)], -1)
    state_kvz = torch.cat([far.kv, far.z[..., None]], -1)
    nd = torch.addcmul(nd, (fqv[..., None, :] @ state_kvz)[..., 0, :], carry[..., None])
    if s:
        w_sink = torch.exp(log_sink - top[..., None])
        nd = nd + torch.cat([(w_sink[..., None, :] @ sink_v)[..., 0, :], w_sink.sum(-1, keepdim=True)], -1)
    out = nd[..., :-1] * inverse(nd[..., -1])[..., None]
    new = ExactState(far, ring_k, ring_kx, ring_v, pos, sink_kx, sink_v, sink_live, state.length + 1)
    return out, new


def exact_state_from_sequence(
    terms: ExactTerms,
    k: torch.Tensor,
    kx: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor | None,
    far: State,
    *,
    length: int,
) -> ExactState:
    """The state after ``length`` tokens, given the far state of the keys before the next
    query's exact set and the sequence's keys k (..., L, D'), kx (..., L, D), v (..., L, Dv)
    (``valid`` bool broadcasting against (..., L): False for padding): the ring holds the
    keys from the next query's first exact position, the sinks the first S."""
    lead = far.log_scale.shape
    state = ExactState.empty(
        lead, terms, k.shape[-1], kx.shape[-1], far.kv.shape[-2], v.shape[-1], dtype=k.dtype, device=k.device
    )
    r, s = terms.ring(), terms.sinks
    live = torch.ones(length, dtype=torch.bool, device=k.device) if valid is None else valid
    live = live.expand(*lead, length)
    first = max(s, _start(length, terms), 0)
    ring_k, ring_kx, ring_v, pos = (x.clone() for x in (state.ring_k, state.ring_kx, state.ring_v, state.ring_pos))
    if first < length:
        idx = torch.arange(first, length, device=k.device)
        slots = idx % r
        ring_k[..., slots, :] = k.expand(*lead, *k.shape[-2:])[..., first:, :]
        ring_kx[..., slots, :] = kx.expand(*lead, *kx.shape[-2:])[..., first:, :]
        ring_v[..., slots, :] = v.expand(*lead, *v.shape[-2:])[..., first:, :]
        pos[..., slots] = torch.where(live[..., first:], idx, -1)
    sink_kx, sink_v, sink_live = state.sink_kx.clone(), state.sink_v.clone(), state.sink_live.clone()
    n_s = min(s, length)
    if n_s:
        sink_kx[..., :n_s, :] = kx.expand(*lead, *kx.shape[-2:])[..., :n_s, :]
        sink_v[..., :n_s, :] = v.expand(*lead, *v.shape[-2:])[..., :n_s, :]
        sink_live[..., :n_s] = live[..., :n_s]
    t = torch.tensor(length, dtype=torch.long, device=k.device)
    return ExactState(far, ring_k, ring_kx, ring_v, pos, sink_kx, sink_v, sink_live, t)
