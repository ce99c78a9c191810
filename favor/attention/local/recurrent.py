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
    (``ring_pos`` their positions, -1 empty), sink_* (..., S, .) the first S tokens
    (``sink_live`` False where absent or padding), ``length`` the tokens seen (a 0-d tensor)."""

    far: State
    ring_kx: torch.Tensor  # (..., R, D) logit inputs of the keys, already scaled
    ring_v: torch.Tensor  # (..., R, Dv)
    ring_f: torch.Tensor  # (..., R, M') feature values
    ring_l: torch.Tensor  # (..., R) feature log scales
    ring_pos: torch.Tensor  # (..., R) long, -1 empty
    sink_kx: torch.Tensor  # (..., S, D)
    sink_v: torch.Tensor  # (..., S, Dv)
    sink_live: torch.Tensor  # (..., S) bool
    length: torch.Tensor  # () long

    @classmethod
    def empty(cls, lead, terms: ExactTerms, d: int, m: int, dv: int, *, dtype, device) -> ExactState:
        r, s = terms.ring(), terms.sinks
        z = dict(dtype=dtype, device=device)
        return cls(
            State.empty(tuple(lead), m, dv, dtype=dtype, device=device),
            torch.zeros(*lead, r, d, **z),
            torch.zeros(*lead, r, dv, **z),
            torch.zeros(*lead, r, m, **z),
            torch.full((*lead, r), NEG_INF, **z),
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


def absorb(far: State, f: torch.Tensor, l: torch.Tensor, v: torch.Tensor, take: torch.Tensor) -> State:
    """far plus the keys where ``take`` (..., R): features f (..., R, M'), log scales l, values v."""
    if l.shape[-1] == 0:
        return far
    l = l.masked_fill(~take, NEG_INF)
    kv, z, c = far
    new_c = torch.maximum(c, l.amax(-1))
    safe = torch.where(torch.isfinite(new_c), new_c, torch.zeros_like(new_c))
    w = torch.exp(l - safe[..., None]) * take  # 0 for keys not taken
    decay = torch.where(torch.isfinite(c), torch.exp(c - safe), torch.zeros_like(c))
    fw = f * w[..., None]
    kv = kv * decay[..., None, None] + fw.mT @ v
    z = z * decay[..., None] + fw.sum(-2)
    return State(kv, z, new_c)


def exact_step(
    state: ExactState,
    terms: ExactTerms,
    fq: torch.Tensor,
    lq: torch.Tensor,
    fk: torch.Tensor,
    lk: torch.Tensor,
    qx: torch.Tensor,
    kx: torch.Tensor,
    v: torch.Tensor,
    log_const: torch.Tensor | float = 0.0,
) -> tuple[torch.Tensor, ExactState]:
    """One token: its query's features fq (..., M') with log scale lq (...), its key's fk, lk,
    logit inputs qx, kx (..., D) (already scaled), v (..., Dv) -> (out (..., Dv), new state)."""
    t = state.length
    start = torch.div(t, terms.block, rounding_mode="floor") * terms.block - terms.window
    pos = state.ring_pos
    leaving = (pos >= 0) & (pos < start)
    far = absorb(state.far, state.ring_f, state.ring_l, state.ring_v, leaving)
    pos = pos.masked_fill(leaving, -1)
    ring = [state.ring_kx, state.ring_v, state.ring_f, state.ring_l]
    sink_kx, sink_v, sink_live = state.sink_kx, state.sink_v, state.sink_live
    s = terms.sinks
    if int(t) < s:  # a sink: kept exactly for ever, never in the far state
        hot = torch.arange(s, device=t.device) == t
        sink_kx = torch.where(hot[:, None], kx[..., None, :], sink_kx)
        sink_v = torch.where(hot[:, None], v[..., None, :], sink_v)
        sink_live = sink_live | hot
    else:
        hot = torch.arange(pos.shape[-1], device=t.device) == t % pos.shape[-1]
        ring = [
            torch.where(hot[:, None], new[..., None, :], old) for new, old in zip((kx, v, fk), ring[:3], strict=True)
        ] + [torch.where(hot, lk[..., None], ring[3])]
        pos = torch.where(hot, t, pos)
    ring_kx, ring_v, ring_f, ring_l = ring
    if isinstance(log_const, torch.Tensor):
        log_const = log_const[..., 0]  # (..., 1, 1) -> (..., 1)
    # every term of the row relative to the query's feature scale, then to the row's max
    log_ring = ((ring_kx @ qx[..., :, None])[..., 0] + log_const - lq[..., None]).masked_fill(pos < 0, NEG_INF)
    top = torch.maximum(log_ring.amax(-1), far.log_scale)
    if s:
        log_sink = ((sink_kx @ qx[..., :, None])[..., 0] + log_const - lq[..., None]).masked_fill(~sink_live, NEG_INF)
        top = torch.maximum(top, log_sink.amax(-1))
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w_ring = torch.exp(log_ring - top[..., None])
    carry = torch.exp(far.log_scale - top)  # 0 for an empty far state
    num = (w_ring[..., None, :] @ ring_v)[..., 0, :] + (fq[..., None, :] @ far.kv)[..., 0, :] * carry[..., None]
    den = w_ring.sum(-1) + (fq * far.z).sum(-1) * carry
    if s:
        w_sink = torch.exp(log_sink - top[..., None])
        num = num + (w_sink[..., None, :] @ sink_v)[..., 0, :]
        den = den + w_sink.sum(-1)
    out = num * inverse(den)[..., None]
    new = ExactState(far, ring_kx, ring_v, ring_f, ring_l, pos, sink_kx, sink_v, sink_live, t + 1)
    return out, new


def exact_state_from_sequence(
    terms: ExactTerms,
    fk: torch.Tensor,
    lk: torch.Tensor,
    kx: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    offset: int = 0,
) -> ExactState:
    """The state after a sequence whose last rows (positions offset .. offset + n - 1) are
    given: the keys' features fk (..., n, M'), log scales lk (..., n), logit inputs kx
    (..., n, D), values v (..., n, Dv), ``valid`` bool broadcasting against (..., n) (False:
    padding). Keys of those rows that are far for the next query go into the far state, the
    rest into the ring or the sinks; rows before ``offset`` are the caller's (far, sinks)."""
    n = fk.shape[-2]
    length = offset + n
    lead = torch.broadcast_shapes(fk.shape[:-2], kx.shape[:-2], v.shape[:-2])
    state = ExactState.empty(lead, terms, kx.shape[-1], fk.shape[-1], v.shape[-1], dtype=fk.dtype, device=fk.device)

    def full(x, *tail):
        return x.expand(*lead, *tail)

    fk, lk, kx, v = full(fk, n, fk.shape[-1]), full(lk, n), full(kx, n, kx.shape[-1]), full(v, n, v.shape[-1])
    pos = torch.arange(offset, length, device=fk.device)
    live = torch.ones(n, dtype=torch.bool, device=fk.device) if valid is None else valid
    live = full(live, n)
    start = (length // terms.block) * terms.block - terms.window  # the next query's first neighbour
    s, r = terms.sinks, terms.ring()
    far = absorb(state.far, fk, lk, v, (pos >= s) & (pos < start) & live)
    ring = (pos >= max(s, start)) & live
    slots = pos % r
    ring_kx, ring_v, ring_f = (x.clone() for x in (state.ring_kx, state.ring_v, state.ring_f))
    ring_l, ring_pos = state.ring_l.clone(), state.ring_pos.clone()
    idx = (pos >= max(s, start)).nonzero()[:, 0]  # the same rows for every sequence of the batch
    if idx.numel():
        sl = slots[idx]
        ring_kx[..., sl, :], ring_v[..., sl, :], ring_f[..., sl, :] = kx[..., idx, :], v[..., idx, :], fk[..., idx, :]
        ring_l[..., sl] = lk[..., idx]
        ring_pos[..., sl] = torch.where(ring[..., idx], pos[idx], -1)
    sink_kx, sink_v, sink_live = state.sink_kx.clone(), state.sink_v.clone(), state.sink_live.clone()
    idx = (pos < s).nonzero()[:, 0]
    if idx.numel():
        sp = pos[idx]
        sink_kx[..., sp, :], sink_v[..., sp, :] = kx[..., idx, :], v[..., idx, :]
        sink_live[..., sp] = live[..., idx]
    t = torch.tensor(length, dtype=torch.long, device=fk.device)
    return ExactState(far, ring_kx, ring_v, ring_f, ring_l, ring_pos, sink_kx, sink_v, sink_live, t)
