"""Decoding with exact terms: one token at a time, state bytes independent of context.

The state is FAVOR's far state (kv, z, log scale: keys that left every later query's exact
set, sinks excluded) and R + S slots of keys kept exactly: a ring of the last R = C + W
positions (the keys a later query may still take exactly) and the first S tokens (the sinks),
each slot with its feature input, logit input, value and position. A new token first moves the ring's keys that fall out of its exact set
(positions before floor(t / C) C - W) into the far state, then takes its place in the ring,
then attends: the same sums as the chunked path (causal_fast.py), one row at a time.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..chunking import inverse
from ..state import State
from .spec import ExactTerms

__all__ = ["ExactState", "exact_step", "exact_step_lean", "lean_eligible", "exact_state_from_sequence", "absorb"]

NEG_INF = float("-inf")
#: sink slots hold their position plus SINK_MARK, so that one comparison with the first
#: exact position of the query selects every live slot (ring keys in the window, all sinks)
SINK_MARK = 1 << 40
#: shifts are clamped to at least this (finite in float32), so that exp(-inf - shift) = 0
FLOOR = -1e30


class ExactState(NamedTuple):
    """Everything decoding with exact terms needs from the past, fixed size: ``far`` (a State
    over the keys that are far for every later query) and R + S slots of keys kept exactly,
    slots 0 .. R - 1 a ring of the last R = C + W positions, R .. R + S - 1 the first S
    tokens: their feature inputs ``keys`` (..., R + S, D') (features are made when a key
    leaves for the far state), logit inputs ``keys_x`` (..., R + S, D), ``values`` and
    positions ``pos`` (..., R + S) (-1: empty or padding); ``length`` the tokens seen (0-d)."""

    far: State
    keys: torch.Tensor
    keys_x: torch.Tensor
    values: torch.Tensor
    pos: torch.Tensor
    length: torch.Tensor

    @classmethod
    def empty(cls, lead, terms: ExactTerms, d_in: int, d: int, m: int, dv: int, *, dtype, device) -> ExactState:
        n = terms.ring() + terms.sinks
        z = dict(dtype=dtype, device=device)
        return cls(
            State.empty(tuple(lead), m, dv, dtype=dtype, device=device),
            torch.zeros(*lead, n, d_in, **z),
            torch.zeros(*lead, n, d, **z),
            torch.zeros(*lead, n, dv, **z),
            torch.full((*lead, n), -1, dtype=torch.long, device=device),
            torch.zeros((), dtype=torch.long, device=device),
        )

    def to(self, *args, **kwargs) -> ExactState:
        """Float fields to a dtype/device; positions and the length keep their dtype."""
        moved = [self.far.to(*args, **kwargs)]
        for name in self._fields[1:]:
            t = getattr(self, name)
            if t.is_floating_point():
                moved.append(t.to(*args, **kwargs))
            else:
                dev = kwargs.get("device", next((x for x in args if isinstance(x, (str, torch.device))), t.device))
                moved.append(t.to(dev))
        return ExactState(*moved)


def absorb(
    far: State,
    f: torch.Tensor,
    l: torch.Tensor,
    v: torch.Tensor,
    take: torch.Tensor | None = None,
    *,
    inplace: bool = False,
) -> State:
    """far plus keys: features f (..., n, M'), log scales l (..., n), values v (..., n, Dv);
    ``take`` (..., n) bool: only those (None: all). ``inplace``: far's tensors are
    updated where they are (the caller owns them), sparing a copy of kv (M' x Dv per head)."""
    n = l.shape[-1]
    if n == 0:
        return far
    if take is not None:
        l = torch.where(take, l, NEG_INF)
    kv, z, c = far
    if n == 1:  # one key (a decoding step): an outer product, as favor.step's update
        l1 = l.squeeze(-1)
        new_c = torch.maximum(c, l1)
        safe = new_c.clamp(min=FLOOR)  # finite, so that exp(-inf - safe) = 0 (isfinite is slow)
        fw = f.squeeze(-2) * torch.exp(l1 - safe).unsqueeze(-1)
        decay = torch.exp(c - safe).unsqueeze(-1)
        if inplace:
            kv.mul_(decay.unsqueeze(-1)).addcmul_(fw.unsqueeze(-1), v.squeeze(-2).unsqueeze(-2))
            return State(kv, torch.addcmul(fw, z, decay, out=z), c.copy_(new_c))
        kv = torch.addcmul(kv * decay.unsqueeze(-1), fw.unsqueeze(-1), v.squeeze(-2).unsqueeze(-2))
        return State(kv, torch.addcmul(fw, z, decay), new_c)
    new_c = torch.maximum(c, l.amax(-1))
    safe = new_c.clamp(min=FLOOR)
    fw = f * torch.exp(l - safe[..., None])[..., None]  # 0 for keys not taken
    decay = torch.exp(c - safe)[..., None]  # 0 for an empty far state (c = -inf, safe finite)
    if inplace:
        kv = torch.addcmul(fw.mT @ v, kv, decay[..., None], out=kv)
        return State(kv, torch.addcmul(fw.sum(-2), z, decay, out=z), c.copy_(new_c))
    return State(torch.addcmul(fw.mT @ v, kv, decay[..., None]), torch.addcmul(fw.sum(-2), z, decay), new_c)


def _start(t: int, terms: ExactTerms) -> int:
    return (t // terms.block) * terms.block - terms.window


def _put(buffer: torch.Tensor, slot: int, row: torch.Tensor, inplace: bool) -> torch.Tensor:
    """``buffer`` (..., n, X) with row ``slot`` replaced by ``row`` (..., X): a copy, so that
    the caller's state is never written, unless ``inplace``."""
    out = buffer if inplace else buffer.clone()
    out.select(-2, slot).copy_(row)  # select/copy_: a tenth of the cost of ``out[..., slot, :] = row``
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
    *,
    inplace: bool = False,
) -> tuple[torch.Tensor, ExactState]:
    """One token: its query and key q, k (..., D') as the features take them
    (``feat(x, a)``), their logit inputs qx, kx (..., D) (already scaled), v (..., Dv) ->
    (out (..., Dv), new state). The keys that leave the exact set go into the far state
    (their features made now). ``live`` bool broadcasting against (...): False where the
    token is padding (its key is never attended). ``inplace``: the caller owns ``state``
    (a cache that replaces it by the result): its tensors are updated, not copied."""
    t = int(state.length)  # host sync: positions decide which slots move (one small read per token)
    r, s = terms.ring(), terms.sinks
    far, keys, keys_x, values, pos = state.far, state.keys, state.keys_x, state.values, state.pos
    start = _start(t, terms)
    first = max(_start(t - 1, terms) if t else start, s, 0)  # the ring's first key before this token
    q1 = q.unsqueeze(-2)
    if first < start:  # keys leave the ring for the far state (C = 1: one per token)
        if start - first == 1:
            i = first % r
            k_out, v_out, real = keys.narrow(-2, i, 1), values.narrow(-2, i, 1), pos.narrow(-1, i, 1) >= 0
        else:
            slots = torch.tensor([p % r for p in range(first, start)], device=q.device)
            k_out, v_out = keys.index_select(-2, slots), values.index_select(-2, slots)
            real = pos.index_select(-1, slots) >= 0
        # the query's and the leaving keys' features in one call
        f = feat(torch.cat([q1.expand(*k_out.shape[:-2], 1, q.shape[-1]), k_out], -2), a)
        values_f, log_f = f.values, f.log_scale if f.log_scale is not None else f.values.new_zeros(f.values.shape[:-1])
        fqv, lq = values_f[..., 0, :], log_f[..., 0]
        far = absorb(far, values_f[..., 1:, :], log_f[..., 1:], v_out, real, inplace=inplace)  # padding never enters
    else:
        f = feat(q1, a)
        fqv = f.values.squeeze(-2)
        lq = f.log_scale.squeeze(-1) if f.log_scale is not None else fqv.new_zeros(fqv.shape[:-1])
    slot = r + t if t < s else t % r  # sinks: slots R .. R + S - 1, kept for ever
    keys, keys_x, values = _put(keys, slot, k, inplace), _put(keys_x, slot, kx, inplace), _put(values, slot, v, inplace)
    pos = pos if inplace else pos.clone()
    at = t + SINK_MARK if t < s else t
    if live is None:
        pos.select(-1, slot).fill_(at)
    else:
        pos.select(-1, slot).copy_(torch.where(live, at, -1))
    if isinstance(log_const, torch.Tensor):
        log_const = log_const[..., 0, 0]  # (..., 1, 1) -> (...), as lq
    # every term of the row relative to the query's feature scale, then to the row's max; a
    # slot counts if it holds a real key in the query's exact set or a sink (SINK_MARK)
    logits = (keys_x @ qx.unsqueeze(-1)).squeeze(-1).add((log_const - lq).unsqueeze(-1))
    logits = logits.masked_fill_(pos < max(start, 0), NEG_INF)  # empty and padding slots hold -1
    top = torch.maximum(logits.amax(-1), far.log_scale).clamp_(min=FLOOR)  # finite: no key at all gives 0
    w = logits.sub_(top[..., None]).exp_()
    carry = torch.exp(far.log_scale - top)  # 0 for an empty far state
    num = torch.addcmul(
        (w[..., None, :] @ values)[..., 0, :], (fqv[..., None, :] @ far.kv)[..., 0, :], carry[..., None]
    )
    den = torch.addcmul(w.sum(-1), (fqv * far.z).sum(-1), carry)
    out = num * inverse(den)[..., None]
    return out, ExactState(far, keys, keys_x, values, pos, state.length + 1)


def lean_eligible(terms: ExactTerms, t: int, built: int) -> bool:
    """Whether ``exact_step_lean`` may take the token at position ``t`` of a state with no
    padding that was last made from a whole sequence of ``built`` tokens
    (``exact_state_from_sequence``: its ring starts at position built - W, so the key that
    the step at ``built`` would move to the far state is already there; 0 for a state that
    only ever stepped): one position per exact set (C = 1), past the sinks and that first
    step, so that every slot is live (the ring holds t - W - 1 .. t - 1, all past the
    sinks) and exactly one key leaves per token."""
    return terms.block == 1 and t > terms.window + terms.sinks and t > built


def exact_step_lean(
    state: ExactState,
    terms: ExactTerms,
    feat,
    a,
    q: torch.Tensor,
    k: torch.Tensor,
    qx: torch.Tensor,
    kx: torch.Tensor,
    v: torch.Tensor,
    log_const: torch.Tensor | float,
    *,
    t: int,
) -> torch.Tensor:
    """``exact_step(..., inplace=True)``'s arithmetic for the steady state of decoding, the
    state updated where it is, with the rows' length kept: q, k (..., 1, D'), qx, kx
    (..., 1, D), v (..., 1, Dv), their leading dims those of the state; returns out
    (..., 1, Dv). The caller vouches, so nothing is
    checked here (a decoding token is ~50 small ops, and every check or host read was a
    visible share of it): ``t`` is the state's length, known on the host (no read of
    ``state.length``); ``lean_eligible(terms, t, built)``; the state holds no padding. Then the one
    leaving key, position t - W - 1, sits in the slot the new key takes (t mod (W + 1)),
    every slot is live (no mask) and no key is padding (no ``take``)."""
    r = terms.ring()
    far, keys, keys_x, values, pos = state.far, state.keys, state.keys_x, state.values, state.pos
    kv, z, c = far
    i = t % r
    # the query's and the leaving key's features in one call, as exact_step
    f = feat(torch.cat([q, keys.narrow(-2, i, 1)], -2), a)
    values_f = f.values
    log_f = f.log_scale if f.log_scale is not None else values_f.new_zeros(values_f.shape[:-1])
    fqv, lq, l1 = values_f.select(-2, 0), log_f.select(-1, 0), log_f.select(-1, 1)
    # absorb's one-key update, in place
    new_c = torch.maximum(c, l1)
    safe = new_c.clamp(min=FLOOR)
    fw = values_f.select(-2, 1) * torch.exp(l1 - safe).unsqueeze(-1)
    decay = torch.exp(c - safe).unsqueeze(-1)
    # decay is exactly 1 unless the far state's log scale grows (rarely, once keys have
    # come: a running max), and kv * 1 is kv: on CPU reading B x H flags is cheaper than a
    # pass over kv (M x Dv per head, from memory, as the model's weights evict it);
    # elsewhere the read would stall the device
    if kv.device.type != "cpu" or bool((decay != 1.0).any()):  # host sync: CPU only
        kv.mul_(decay.unsqueeze(-1))
    kv.addcmul_(fw.unsqueeze(-1), values.narrow(-2, i, 1))
    torch.addcmul(fw, z, decay, out=z)
    c.copy_(new_c)
    keys.narrow(-2, i, 1).copy_(k)
    keys_x.narrow(-2, i, 1).copy_(kx)
    values.narrow(-2, i, 1).copy_(v)
    pos.select(-1, i).fill_(t)
    state.length.add_(1)
    if isinstance(log_const, torch.Tensor):
        log_const = log_const[..., 0, 0]
    # 3-D products (batch x heads folded; 4-D matmul adds a handful of view ops), the
    # logits as a row times K^T: on CPU a third of the time of K times a column
    n, d, m, dv = keys_x.shape[-2], keys_x.shape[-1], kv.shape[-2], kv.shape[-1]
    logits = torch.bmm(qx.reshape(-1, 1, d), keys_x.reshape(-1, n, d).transpose(1, 2)).view(lq.shape + (n,))
    logits.add_((log_const - lq).unsqueeze(-1))
    top = torch.maximum(logits.amax(-1), c).clamp_(min=FLOOR)
    w = logits.sub_(top.unsqueeze(-1)).exp_()
    carry = torch.exp(c - top)
    near = torch.bmm(w.view(-1, 1, n), values.reshape(-1, n, dv))
    far_part = torch.bmm(fqv.reshape(-1, 1, m), kv.reshape(-1, m, dv))
    num = torch.addcmul(near, far_part, carry.view(-1, 1, 1))
    den = torch.addcmul(w.sum(-1), (fqv * z).sum(-1), carry)
    return num.mul_(inverse(den).view(-1, 1, 1)).view(*lq.shape, 1, dv)


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
    keys from the next query's first exact position, the sink slots the first S."""
    lead = far.log_scale.shape
    state = ExactState.empty(
        lead, terms, k.shape[-1], kx.shape[-1], far.kv.shape[-2], v.shape[-1], dtype=k.dtype, device=k.device
    )
    r, s = terms.ring(), terms.sinks
    live = torch.ones(length, dtype=torch.bool, device=k.device) if valid is None else valid
    live = live.expand(*lead, length)
    keys, keys_x, values, pos = (x.clone() for x in state[1:5])
    idx = torch.arange(length, device=k.device)
    first = max(s, _start(length, terms), 0)
    sinks = idx[: min(s, length)]
    for rows, slots, mark in ((idx[first:], idx[first:] % r, 0), (sinks, r + sinks, SINK_MARK)):
        if rows.numel():
            keys[..., slots, :] = k.expand(*lead, *k.shape[-2:])[..., rows, :]
            keys_x[..., slots, :] = kx.expand(*lead, *kx.shape[-2:])[..., rows, :]
            values[..., slots, :] = v.expand(*lead, *v.shape[-2:])[..., rows, :]
            pos[..., slots] = torch.where(live[..., rows], rows + mark, -1)
    t = torch.tensor(length, dtype=torch.long, device=k.device)
    return ExactState(far, keys, keys_x, values, pos, t)
