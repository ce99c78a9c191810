"""A fused decoding step for exact terms with FAVOR+ ("positive") features: exact_step_lean's
numbers (recurrent.py) in ~30 ops instead of ~100.

A decoding token costs a few dozen tiny ops per layer, each ~2-4 us of dispatch on CPU,
against ~6 for attention that returns V; so this step keeps the arithmetic and removes ops:

* the feature inputs are affine in the raw rows: x = q M_q (+ b_q) for the query and
  x = k M_k + b_k for the leaving key, one GEMM each, with the scale, the key shift and,
  in an extra column, the per-row constants folded in (``LeanConstants``); the features
  are then s = (x g) P^T log2(e) + bias (dense-exponential features: g = kappa b, bias =
  a w^2 log2(e), and |x'|^2 = |x|^2 + |a|^2, so the augmented input [kappa b x, a, e] is
  never built);
* keys are kept raw, once per key/value head (GQA): the exact logits are
  root^2 (q.k - q.c) = q*.k* of exact_step (raw query, shifted key, never the maps), the
  q.c term one more column of the query's GEMM;
* values carry a ones column and the far state is kv and z in one buffer (kvz): one GEMM
  gives numerator and normaliser;
* the near logits and the query's features share one row buffer [near | far]: one max,
  one subtraction, one exp2 for both (every term is relative to the query's own feature
  scale, so the query's shift cancels and is never computed).

The state here (``LeanState``) is a different layout of exact_step's ExactState (ring and
sink slots, far state); ``LeanState.enter`` and ``LeanState.far_state`` convert, and the
caller (favor.hf's cache) keeps one or the other. The step does the reference's sums in
another order: tested against exact_step in float64 to 1e-10 and float32 to 1e-5
(tests/ops/local/test_fused_step.py).

Legend: B batch, H query heads, K key/value heads (G = H / K per group), D head dim, Dv
value dim, M features, n ring + sink slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..row_features import HEADROOM, LN2, LOG2E
from ..state import State

__all__ = ["LeanConstants", "LeanState", "fused_step", "ring_positions"]


@dataclass
class LeanConstants:
    """Per-layer constants of the fused step, (H, ...) per query head, built once per
    version of the layer's buffers (favor.hf.FavorAdapter.lean_constants):

    ``mq`` (H, D, D+1), ``bq`` (H, 1, D+1): x_q = [q A root, Cq - log2(e) root^2 q.c] (None
    for identity maps: then x_q = q root and the last column is Cq); ``mk`` (H, D, D+1),
    ``bk`` (H, 1, D+1): x_k = [(k - c) B root, Ck] (None: k root, Ck); ``gain`` (H, D) or
    None (all ones); ``proj_t`` (D, M) the projection times log2(e), transposed; ``bias_s``
    (H, M) or None; ``cq`` (H,) log2(e) (log_const + |a|^2/2 + log(M)/2); ``ck`` (H,)
    -|a|^2/2 - log(M)/2 (natural log); ``root`` the logits' sqrt(scale)."""

    mq: torch.Tensor | None
    bq: torch.Tensor | None
    mk: torch.Tensor | None
    bk: torch.Tensor | None
    gain: torch.Tensor | None
    proj_t: torch.Tensor
    bias_s: torch.Tensor | None
    cq: torch.Tensor
    ck: torch.Tensor
    root: float

    def __post_init__(self) -> None:
        self._scratch: dict = {}

    def scratch(self, b: int, kv_heads: int, n: int, dv: int) -> _Scratch:
        """Buffers and batch-expanded constants for batch b (made once per shape)."""
        key = (b, kv_heads, n, dv)
        hit = self._scratch.get(key)
        if hit is None:
            hit = self._scratch[key] = _Scratch(self, b, kv_heads, n, dv)
        return hit


class _Scratch:
    """Work buffers of one layer's step and their views, reused from token to token (the
    step's output is always a new tensor: callers may keep it)."""

    def __init__(self, c: LeanConstants, b: int, kv_heads: int, n: int, dv: int) -> None:
        h, d = c.cq.shape[0], c.proj_t.shape[0]
        m = c.proj_t.shape[1]
        bh, bk, g = b * h, b * kv_heads, h // kv_heads
        z = dict(dtype=c.proj_t.dtype, device=c.proj_t.device)

        def per_batch(t):  # (H, ...) -> (B H, ...), contiguous
            return None if t is None else t.expand(b, *t.shape).reshape(bh, *t.shape[1:]).contiguous()

        self.x = torch.zeros(2, bh, 1, d + 1, **z)  # [query rows; leaving-key rows]
        self.x[0, :, 0, d] = per_batch(c.cq)
        self.x[1, :, 0, d] = per_batch(c.ck)
        # the key's -|x|^2/2 plus [ck - HEADROOM ln 2, ck]: its log scale's constant and
        # its weight's (their HEADROOM apart), both from one GEMM against x twice
        ck = per_batch(c.ck).view(bh, 1, 1)
        self.ck2 = torch.cat([ck - HEADROOM * LN2, ck], -1)
        self.nk2 = torch.empty(bh, 1, 2, **z)
        self.nk_log, self.nk_weight = self.nk2[..., :1], self.nk2[..., 1:]
        self.xq, self.xk = self.x[0], self.x[1]
        self.xq_d, self.xk_d = self.xq[..., :d], self.xk[..., :d]
        self.xq_dt = self.xq_d.mT
        self.xk_dt2 = self.xk_d.mT.expand(bh, d, 2)
        self.xq_last, self.xk_last = self.xq[..., d:], self.xk[..., d:]
        self.xq4 = self.xq_d.view(b, h, 1, d)
        self.xk_g = self.xk_d.view(bk, g, 1, d)  # identity maps: the key's G copies
        self.xk_flat = self.xk.view(bk, 1, g * (d + 1))  # the key's GEMM writes all G heads
        self.x2d = self.x[..., :d].view(2 * bh, d)
        self.mq, self.bq = per_batch(c.mq), per_batch(c.bq)
        if c.mk is not None:  # per key/value head: the G heads' maps side by side
            mk = c.mk.view(kv_heads, g, d, d + 1).permute(0, 2, 1, 3).reshape(kv_heads, d, g * (d + 1))
            self.mk = mk.expand(b, *mk.shape).reshape(bk, d, g * (d + 1)).contiguous()
            self.bk = c.bk.reshape(kv_heads, 1, g * (d + 1)).expand(b, kv_heads, 1, g * (d + 1)).reshape(bk, 1, -1)
            self.bk = self.bk.contiguous()
        gain = per_batch(c.gain)
        self.gain = None if gain is None else torch.cat([gain, gain]).view(2 * bh, d)
        self.xb = None if gain is None else torch.empty(2 * bh, d, **z)
        bias = per_batch(c.bias_s)
        self.bias_s = None if bias is None else torch.cat([bias, bias]).view(2 * bh, m)
        self.s = torch.empty(2 * bh, m, **z)
        self.sq = self.s[:bh].view(bh, 1, m)
        self.sk = self.s[bh:].view(bh, 1, m)
        self.fw_g = self.s[bh:].view(bk, g, m, 1)
        self.off = torch.empty(bh, 1, 1, **z)
        self.off_g = self.off.view(bk, g, 1)
        self.row = torch.empty(bh, 1, n + m, **z)  # [near logits | far features], then weights
        self.near_g = self.row[..., :n].view(bk, g, n)
        self.far = self.row[..., n:]
        self.acc = torch.empty(bh, 1, dv + 1, **z)
        self.acc_g = self.acc.view(bk, g, dv + 1)
        acc4 = self.acc.view(b, h, 1, dv + 1)
        self.num, self.den = acc4[..., :dv], acc4[..., dv:]
        self.shape = (b, h, kv_heads, g, bh, bk)


class LeanState:
    """The fused step's state: raw keys ``k`` (B K, n, D) and values with a ones column
    ``v1`` (B K, n, Dv+1), one per key/value head, slots 0 .. R-1 the ring (position p in
    slot p mod R), R .. R+S-1 the sinks; the far state as ``kvz`` (B H, M, Dv+1) = [kv, z]
    and ``c`` (B H, 1, 1) its log scale. Every slot is live (no padding)."""

    def __init__(self, kvz, c, k, v1, *, heads: int, ring: int) -> None:
        self.kvz, self.c, self.k, self.v1 = kvz, c, k, v1
        self.heads, self.ring = heads, ring
        self.length = 0  # tokens seen (kept by the caller, a host int)
        # the leaving key's constants less c (the GEMM's input), for the scratch ``ck2_of``
        self.ck2, self.ck2_of = None, None
        bk, n, d = k.shape
        self.batch = kvz.shape[0] // heads
        kv_heads = bk // self.batch
        self.kv_heads, self.groups = kv_heads, heads // kv_heads
        self.kt = k.mT
        self.kvz_g = kvz.view(bk, self.groups, *kvz.shape[1:])
        k4, v4 = k.view(self.batch, kv_heads, n, d), v1.view(self.batch, kv_heads, n, -1)
        dv = v1.shape[-1] - 1
        # per slot: the leaving key for the GEMM, its value row, and where a new key/value goes
        self.k_in = [k[:, i : i + 1, :] for i in range(ring)]
        self.k_in_g = [k[:, None, i : i + 1, :].expand(bk, self.groups, 1, d) for i in range(ring)]
        self.v_out = [v1[:, None, i : i + 1, :] for i in range(ring)]
        self.k_put = [k4[:, :, i : i + 1, :] for i in range(ring)]
        self.v_put = [v4[:, :, i : i + 1, :dv] for i in range(ring)]

    @classmethod
    def enter(cls, far: State, k: torch.Tensor, v: torch.Tensor, *, ring: int) -> LeanState:
        """From exact_step's far state (B, H, ...) and the raw keys and values of the slots
        k (B, K, n, D), v (B, K, n, Dv) (copies: the caller's tensors are not kept)."""
        b, h, m, dv = far.kv.shape
        kvz = torch.cat([far.kv, far.z.unsqueeze(-1)], -1).view(b * h, m, dv + 1)
        c = far.log_scale.reshape(b * h, 1, 1).clone()
        v1 = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], -1)
        return cls(kvz, c, k.reshape(-1, *k.shape[2:]).clone(), v1.view(-1, *v1.shape[2:]), heads=h, ring=ring)

    def far_state(self) -> State:
        """The far state as exact_step keeps it, (B, H, M, Dv), (B, H, M), (B, H) (copies)."""
        b, h = self.batch, self.heads
        kv = self.kvz[..., :-1].reshape(b, h, *self.kvz.shape[1:2], -1).clone()
        z = self.kvz[..., -1].reshape(b, h, -1).clone()
        return State(kv, z, self.c.view(b, h).clone())

    def raw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The slots' raw keys and values, (B, K, n, D) and (B, K, n, Dv) (views)."""
        b, k = self.batch, self.kv_heads
        return self.k.view(b, k, *self.k.shape[1:]), self.v1[..., :-1].view(b, k, self.v1.shape[1], -1)

    def tensors(self) -> list[torch.Tensor]:
        return [self.kvz, self.c, self.k, self.v1]


def fused_step(
    state: LeanState, consts: LeanConstants, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, t: int
) -> torch.Tensor:
    """One token at position ``t``: query (B, H, 1, D), key (B, K, 1, D), value (B, K, 1, Dv)
    in the constants' dtype -> out (B, H, 1, Dv); the state is updated where it is. As
    exact_step_lean, the caller vouches for ``lean_eligible(terms, t, built)`` and a state
    without padding: the key at position t - R leaves slot t mod R for the far state and the
    new key takes the slot; every slot is live."""
    n, dv = state.v1.shape[1], state.v1.shape[2] - 1
    sc = consts.scratch(state.batch, state.kv_heads, n, dv)
    b, h, kv_heads, g, bh, bk = sc.shape
    i = t % state.ring
    root = consts.root
    # feature inputs of the query and of the leaving key (its G query heads' maps at once)
    if sc.mq is None:
        torch.mul(query, root, out=sc.xq4)
    else:
        torch.baddbmm(sc.bq, query.reshape(bh, 1, -1), sc.mq, out=sc.xq)
    if consts.mk is None:
        torch.mul(state.k_in_g[i], root, out=sc.xk_g)
    else:
        torch.baddbmm(sc.bk, state.k_in[i], sc.mk, out=sc.xk_flat)
    # both rows' features s = (x g) P^T log2(e) + bias, in one GEMM
    x2 = sc.x2d
    if sc.gain is not None:
        x2 = torch.mul(x2, sc.gain, out=sc.xb)
    if sc.bias_s is None:
        torch.mm(x2, consts.proj_t, out=sc.s)
    else:
        torch.addmm(sc.bias_s, x2, consts.proj_t, out=sc.s)
    # the query's offset of the near logits (log2 units): Cq - log2(e) root^2 q.c + log2(e) |x_q|^2 / 2
    torch.baddbmm(sc.xq_last, sc.xq_d, sc.xq_dt, alpha=0.5 * LOG2E, out=sc.off)
    # the leaving key's log scale: (max s - HEADROOM) ln 2 - |x'|^2 / 2 - log(M) / 2 (row_features)
    c = state.c
    if state.ck2 is None or state.ck2_of is not sc:  # [ck - HEADROOM ln 2, ck - c]: remade with the constants
        state.ck2, state.ck2_of = torch.cat([sc.ck2[..., :1], sc.ck2[..., 1:] - c], -1), sc
    torch.baddbmm(state.ck2, sc.xk_d, sc.xk_dt2, alpha=-0.5, out=sc.nk2)
    lk = torch.add(sc.nk_log, sc.sk.amax(-1, keepdim=True), alpha=LN2)
    new_c = torch.maximum(c, lk)
    # the far state's scale grows rarely (a running max): rescaling kvz is a pass over
    # M x (Dv + 1) per head, reading B x H flags is cheaper on CPU
    if not torch.equal(new_c, c):  # host sync
        state.kvz.mul_(torch.exp(c - new_c))
        # this key's weight and the next keys' constant follow c (made from the first
        # column, c-free: c may have been -inf, an empty far state)
        shift = new_c - HEADROOM * LN2
        torch.sub(sc.nk_log, shift, out=sc.nk_weight)
        torch.sub(state.ck2[..., :1], shift, out=state.ck2[..., 1:])
        c.copy_(new_c)
    # its features times exp(l - c) (the shift cancels) into kvz, with its value
    sc.sk.add_(sc.nk_weight, alpha=LOG2E).exp2_()  # in place: sc.fw_g views it per key/value head
    state.kvz_g.addcmul_(sc.fw_g, state.v_out[i])
    state.k_put[i].copy_(key)
    state.v_put[i].copy_(value)
    # one row per query head: [near logits + offset | far features + c log2(e)], base 2
    q_g = query.reshape(bk, g, -1)
    torch.baddbmm(sc.off_g, q_g, state.kt, alpha=root * root * LOG2E, out=sc.near_g)
    torch.add(sc.sq, c, alpha=LOG2E, out=sc.far)
    top = sc.row.amax(-1, keepdim=True).sub_(HEADROOM)  # the largest term 2^HEADROOM (row_features)
    sc.row.sub_(top).exp2_()
    torch.bmm(sc.near_g, state.v1, out=sc.acc_g)
    sc.acc.baddbmm_(sc.far, state.kvz)
    return torch.div(sc.num, sc.den)


def ring_positions(t: int, ring: int, sinks: int, mark: int, *, device) -> torch.Tensor:
    """exact_step's ``pos`` for a state of length t with every slot live: ring slot j holds
    the position p in [t - R, t - 1] with p = j mod R, sink slot R + s holds s + ``mark``."""
    j = torch.arange(ring, device=device)
    first = t - ring
    ring_pos = first + (j - first) % ring
    return torch.cat([ring_pos, torch.arange(sinks, device=device) + mark])
