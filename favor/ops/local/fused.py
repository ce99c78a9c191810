"""A fused decoding step for exact terms with FAVOR+ ("positive") features: exact_step_lean's
numbers (recurrent.py) in ~20 ops instead of ~100.

A decoding token costs a few dozen tiny ops per layer, each ~2-4 us of dispatch on CPU,
against ~6 for attention that returns V; so this step keeps the arithmetic and removes ops:

* the feature inputs are affine in the raw rows: x = q M_q (+ b_q) for the query and
  x = k M_k + b_k for the leaving key, one GEMM each, with the scale, the key shift and,
  in an extra column, the per-row constants folded in (``LeanConstants``); the features
  are then s = (x g) P^T log2(e) + bias (dense-exponential features: g = kappa b, bias =
  a w^2 log2(e), and |x'|^2 = |x|^2 + |a|^2, so the augmented input [kappa b x, a, e] is
  never built; where the projection's e column is not zero, as distillation leaves it,
  e = sqrt(|x r|^2), r = sqrt(1 - g^2), is one more column of x g against that column);
* keys are kept raw, once per key/value head (GQA): the exact logits are
  root^2 (q.k - q.c) = q*.k* of exact_step (raw query, shifted key, never the maps), the
  q.c term one more column of the query's GEMM;
* values carry a ones column and the far state is kv and z in one buffer (kvz): one GEMM
  gives numerator and normaliser;
* the near logits and the query's features share one row buffer [near | far]: one max,
  one subtraction, one exp2 for both (every term is relative to the query's own feature
  scale, so the query's shift cancels and is never computed);
* in a model, the weights stream through the caches between two calls of a layer, so the
  far state comes from memory every token: the keys leaving the window wait in P pending
  slots (their weighted features and values) and are folded into kvz P at a time (one
  rank-P GEMM), so kvz is read once per token and written once per P tokens; until then
  the query's far features weigh them explicitly (one (M x P) GEMM);
* where a key's features do not depend on the query head (identity maps, no gain or
  bias, one constant per group: ``LeanConstants.shared``), every head of a group holds
  the same far state: it is kept once per key/value head, a third of the bytes for
  SmolLM2, and sits below the slot values, so [pending | near | far] weights times
  [pending values | slot values | kvz] is one GEMM.

Before the ring is full (positions S .. W + S, the unwrapped phase) no key leaves and the
far state is empty: a token is then exact softmax attention over the live slots (a short
branch, ``_unwrapped``); dead slots hold a copy of a live key (the row's max is unchanged)
and a zero value row, ones column included (their weights add nothing).

On CPU both branches run as one compiled call per layer where favor.ops.local.native
builds (fused_native.cpp: the same arithmetic as these ops, each byte of the state read
once, no op dispatched per term; ``LeanState.stepper``); these ops are its reference and
its fallback (``NATIVE = False``, no compiler, a NaN the compiled step hands back).

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
from . import native

__all__ = ["LeanConstants", "LeanState", "fused_eligible", "fused_step", "ring_positions"]


@dataclass
class LeanConstants:
    """Per-layer constants of the fused step, (H, ...) per query head, built once per
    version of the layer's buffers (favor.hf.FavorAdapter.lean_constants):

    ``mq`` (H, D, D+1), ``bq`` (H, 1, D+1): x_q = [q A root, Cq - log2(e) root^2 q.c] (None
    for identity maps: then x_q = q root and the last column is Cq); ``mk`` (H, D, D+1),
    ``bk`` (H, 1, D+1): x_k = [(k - c) B root, Ck] (None: k root, Ck); ``gain`` (H, D) or
    None (all ones); ``proj_t`` (D, M) the projection times log2(e), transposed; ``bias_s``
    (H, M) or None; ``cq`` (H,) log2(e) (log_const + |a|^2/2 + log(M)/2); ``ck`` (H,)
    -|a|^2/2 - log(M)/2 (natural log); ``root`` the logits' sqrt(scale); ``proj_e`` (M,)
    the projection's e column times log2(e) and ``rest`` (H, D) sqrt(1 - gain^2), or None
    (a zero column: dense_projection's, before training moves it): then the features'
    input has a last entry e = sqrt(|x rest|^2) (clamped as the adapter clamps it)."""

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
    proj_e: torch.Tensor | None = None
    rest: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self._scratch: dict = {}
        self._shared: dict = {}

    def shared(self, kv_heads: int) -> bool:
        """Whether a key's features and log scale are the same for every query head of its
        group: its map, shift, gain, feature bias, e weights and ``ck`` tied per group
        (identity maps and plain features, or a key side distilled tied: favor.hf.distill's
        ``tie_keys``); the query's side may differ per head. Then
        every head of a group holds the same far state (the same keys, features and running
        max), and the fused step keeps it once per key/value head (``LeanState``)."""
        hit = self._shared.get(kv_heads)
        if hit is None:

            def tied(t):  # (H, ...): the same within each group (None: nothing per head)
                v = None if t is None else t.reshape(kv_heads, -1, *t.shape[1:])
                return v is None or bool((v == v[:, :1]).all())  # host sync: once per version and K

            hit = self._shared[kv_heads] = all(
                map(tied, (self.mk, self.bk, self.gain, self.bias_s, self.rest, self.ck))
            )
        return hit

    def scratch(self, state: LeanState) -> _Scratch:
        """Buffers and batch-expanded constants for the state's shape (made once per shape)."""
        key = (state.batch, state.kv_heads, state.slots, state.dv, state.fold_every, state.shared)
        hit = self._scratch.get(key)
        if hit is None:
            hit = self._scratch[key] = _Scratch(self, *key)
            hit.native = _native_constants(self, hit)
        return hit


class _Scratch:
    """Work buffers of one layer's step and their views, reused from token to token (the
    step's output is always a new tensor: callers may keep it).

    ``rows`` holds one row per query head, [pending keys' weights (P) | near logits (n) |
    far features (M)], and below them the leaving key's feature rows (their far columns):
    one max, one subtraction and one exp2 for near and far, and with a state kept per
    key/value head, one GEMM against [pending values | slot values | kvz] for the output."""

    def __init__(self, c: LeanConstants, b: int, kv_heads: int, n: int, dv: int, p: int, shared: bool) -> None:
        h, d = c.cq.shape[0], c.proj_t.shape[0]
        m = c.proj_t.shape[1]
        bh, bk, g = b * h, b * kv_heads, h // kv_heads
        f, gf = (bk, g) if shared else (bh, 1)  # far groups, query heads per far group
        z = dict(dtype=c.proj_t.dtype, device=c.proj_t.device)

        def per_batch(t):  # (H, ...) -> (B H, ...), contiguous
            return None if t is None else t.expand(b, *t.shape).reshape(bh, *t.shape[1:]).contiguous()

        width = p + n + m
        self.rows = torch.zeros(bh + (bk if shared else bh), width, **z)
        q_rows = self.rows[:bh]
        self.row_g = q_rows.view(bk, g, width)
        self.live = q_rows[:, p:]  # near and far: max, shift, exp2
        self.near_g = q_rows[:, p : p + n].view(bk, g, n)
        self.near = q_rows[:, p : p + n]
        self.far_f = q_rows[:, p + n :].view(f, gf, m)
        self.pend_f = q_rows[:, :p].view(f, gf, p)
        self.sq = q_rows[:, p + n :]  # (B H, M): the query's features
        self.sk = self.rows[bh:, p + n :]  # (F, M): the leaving key's
        self.sk_f = self.sk.view(f, 1, m)
        self.near_v = self.row_g[..., : p + n]  # per-head far state: near and pending only
        ck = per_batch(c.ck).view(bh, 1, 1)
        if shared:
            ck = ck.view(bk, g, 1)[:, :1]  # one per group (LeanConstants.shared)
        # the key's -|x|^2/2 plus [ck - HEADROOM ln 2, ck]: its log scale's constant and
        # its weight's (their HEADROOM apart), both from one GEMM against x twice
        self.ck2 = torch.cat([ck - HEADROOM * LN2, ck], -1)
        self.nk2 = torch.empty(f, 1, 2, **z)
        self.nk_log, self.nk_weight = self.nk2[..., :1], self.nk2[..., 1:]
        # the query's offset constant, less c log2(e) per state (LeanState.qoff)
        self.qoff_base = per_batch(c.cq).view(bh, 1, 1) if c.mq is None else per_batch(c.bq)
        self.off = torch.empty(bh, 1, 1, **z)
        self.off_g = self.off.view(bk, g, 1)
        self.acc = torch.empty(bh, 1, dv + 1, **z)
        self.acc_g = self.acc.view(bk, g, dv + 1)
        acc4 = self.acc.view(b, h, 1, dv + 1)
        self.num, self.den = acc4[..., :dv], acc4[..., dv:]
        self.bh, self.bk, self.g = bh, bk, g
        r2 = c.root * c.root
        self.a_nk, self.a_off, self.a_near = -0.5 * r2, 0.5 * LOG2E * r2, LOG2E * r2
        self.native_f = [c.root, self.a_nk, self.a_off, self.a_near, HEADROOM]  # fused_native.cpp's scalars
        self.mq = self.bias_s = self.gain = self.rest = None
        # a state per key/value head with identity maps and plain features: raw rows
        # against the projection times root, no scaled copies
        self.simple = shared and all(t is None for t in (c.mq, c.mk, c.bk, c.gain, c.bias_s, c.proj_e))
        if self.simple:
            self.proj_root = c.proj_t * c.root
            return
        gk, r = (1, bh + bk) if shared else (g, 2 * bh)  # key rows per key/value head; all rows

        def per_key(t):  # (H, ...) -> (F, ...): per query head, or each group's first (shared)
            t = per_batch(t)
            return t if t is None or not shared else t.view(bk, g, *t.shape[1:])[:, 0].contiguous()

        def both(t):  # (H, ...) -> (R, ...): the query rows' then the key rows'
            return None if t is None else torch.cat([per_batch(t), per_key(t)])

        self.x = torch.zeros(r, 1, d + 1, **z)  # [query rows; leaving-key rows]
        self.x[bh:, 0, d] = per_key(c.ck)
        self.xq, self.xk = self.x[:bh], self.x[bh:]
        self.xq_d, self.xk_d = self.xq[..., :d], self.xk[..., :d]
        self.xq_dt = self.xq_d.mT
        self.xk_dt2 = self.xk_d.mT.expand(f, d, 2)
        self.xq_last = self.xq[..., d:]
        self.xq4 = self.xq_d.view(b, h, 1, d)
        self.xk_g = self.xk_d if shared else self.xk_d.view(bk, g, 1, d)  # identity maps: the key's G copies
        self.xk_flat = self.xk.view(bk, 1, gk * (d + 1))  # the key's GEMM writes all its rows
        self.x2d = self.x[..., :d].view(r, d)
        self.s = self.rows[:, p + n :]  # both rows' features, one GEMM
        self.mq = per_batch(c.mq)
        if c.mk is not None:  # per key/value head: the G heads' maps side by side (shared: one)
            mk = c.mk.view(kv_heads, g, d, d + 1)[:, :gk].permute(0, 2, 1, 3).reshape(kv_heads, d, gk * (d + 1))
            self.mk = mk.expand(b, *mk.shape).reshape(bk, d, gk * (d + 1)).contiguous()
            bmap = c.bk.view(kv_heads, g, 1, d + 1)[:, :gk].reshape(kv_heads, 1, gk * (d + 1))
            self.bk_map = bmap.expand(b, kv_heads, 1, gk * (d + 1)).reshape(bk, 1, -1).contiguous()
        self.gain = both(c.gain)
        # x g, and with an e column (c.proj_e) e in one more column against it (``proj``)
        e = c.proj_e is not None
        self.xb = None if c.gain is None else torch.empty(r, d + e, **z)
        self.proj = c.proj_t
        if e:
            self.proj = torch.cat([c.proj_t, c.proj_e[None]]).contiguous()
            self.rest = both(c.rest)
            self.xr = torch.empty(r, d, **z)
            self.xr_row, self.xr_col = self.xr.view(r, 1, d), self.xr.view(r, d, 1)
            self.e2 = torch.empty(r, 1, 1, **z)
            self.xb_d, self.e_col = self.xb[:, :d], self.xb[:, d:]
        self.bias_s = both(c.bias_s)


def _native_constants(c: LeanConstants, sc: _Scratch) -> list[torch.Tensor] | None:
    """fused_native.cpp's constants of ``sc`` (empty tensors for absent ones): [projection,
    query maps, key maps, key map rows, gain, rest, feature bias, row buffer]; None off the
    CPU."""
    if c.proj_t.device.type != "cpu":
        return None
    none = c.proj_t.new_empty(0)

    def pack(t):
        return none if t is None else t.contiguous()

    if sc.simple:
        return [pack(sc.proj_root), none, none, none, none, none, none, sc.rows]
    maps = [getattr(sc, name, None) for name in ("mq", "mk", "bk_map", "gain", "rest", "bias_s")]
    return [pack(sc.proj), *map(pack, maps), sc.rows]


#: keys leaving the window wait in the state's pending slots and are folded into kvz this
#: many at a time (one rank-P GEMM): kvz is then read once per token and written once per
#: P tokens, not read and written every token (in a model the weights evict it between
#: tokens, so that pass costs memory bandwidth); the P pending rows cost a (P x M) GEMM
FOLD_EVERY = 16

#: the steady state's tokens by the compiled step (favor.ops.local.native) where it builds;
#: False: PyTorch ops only (tests hold the two to each other)
NATIVE = True


class LeanState:
    """The fused step's state. Raw keys ``k`` (B K, n, D), once per key/value head: slots
    0 .. R-1 the ring (position p in slot p mod R), R .. R+S-1 the sinks. ``vals`` (B K,
    P + n [+ M], Dv+1) per key/value head: the P pending keys' values, the n slots' values
    (a ones column last: numerator and normaliser from one GEMM) and, when the far state is
    kept once per key/value head (``shared``, LeanConstants.shared), the far state kvz =
    [kv, z] in the last M rows (``kvz`` views them); otherwise ``kvz`` is (B H, M, Dv+1),
    per query head. ``c`` (F, 1, 1) is the far state's log scale, F = B K (shared) or B H.
    ``pend`` (F, M, P) holds the features (times exp(l - c)) of the ``count`` keys that left
    the window since the last fold (the rest are zero), their values in vals[:, :P]: the
    far state of exact_step is kvz + pend vals[:, :P] (``fold``). Every slot is live from
    position W + S + 1 on (``steady``); before, dead slots hold a live slot's key and a
    zero value row (``enter``)."""

    def __init__(self, kvz, c, k, vals, pend, *, batch: int, heads: int, ring: int, shared: bool) -> None:
        self.kvz, self.c, self.k, self.vals, self.pend = kvz, c, k, vals, pend
        self.batch, self.heads, self.ring, self.shared = batch, heads, ring, shared
        self.length = 0  # tokens seen (kept by the caller, a host int)
        self.count = 0  # keys in the pending slots (a host int)
        # the leaving key's constants less c (its GEMM's input) and the query's offset
        # constant less c log2(e), made for the scratch ``sc`` of the constants ``of``
        # (``retarget``): kept here, not looked up per token
        self.ck2, self.qoff, self.sc, self.of = None, None, None, None
        self.stepper = None  # the compiled step for these constants (``retarget``)
        bk, n, d = k.shape
        p = pend.shape[-1]
        self.kv_heads, self.groups = bk // batch, heads // (bk // batch)
        self.slots, self.fold_every, self.dv = n, p, vals.shape[-1] - 1
        self.kt = k.mT
        self.v1 = vals[:, p : p + n]
        self.vp = vals[:, :p]
        # the first position of the steady state: every slot live, one key leaving per token
        self.steady = n
        # per pending slot: where the leaving key's weighted features and value go
        self.p_put = [pend[:, None, :, j] for j in range(p)]  # (F, 1, M), strided
        self.vp_put = [vals[:, j : j + 1] for j in range(p)]
        # the step's views of slot i in one tuple (one lookup per token): the leaving key
        # (raw, as a row, a 1-row matrix, its transpose twice, G copies), its value row, and
        # where a new key and value go; each kind for all slots from one op (unbind, split:
        # R x 7 views one by one cost ~20 ms per layer for W = 512, as many ops per token
        # when made on first use)
        g, k4 = self.groups, k.view(batch, self.kv_heads, n, d)
        off = k.storage_offset()
        self.slot = list(
            zip(
                k.unbind(1),
                k.split(1, 1),
                k.as_strided((n, bk, d, 2), (d, n * d, 1, 0), off).unbind(0),
                k.as_strided((n, bk, g, 1, d), (d, n * d, 0, d, 1), off).unbind(0),
                self.v1.split(1, 1),
                k4.split(1, 2),
                self.v1.unflatten(0, (batch, self.kv_heads))[..., : self.dv].split(1, 2),
                strict=True,
            )
        )[:ring]

    @classmethod
    def enter(
        cls,
        far: State,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        ring: int,
        shared: bool = False,
        fold_every: int = 0,
        live: torch.Tensor | None = None,
    ) -> LeanState:
        """From exact_step's far state (B, H, ...) and the raw keys and values of the slots
        k (B, K, n, D), v (B, K, n, Dv) (copies: the caller's tensors are not kept). With
        ``shared`` the far state of each group's first head is kept (the group's heads hold
        the same one: LeanConstants.shared). ``fold_every`` P pending slots (default
        FOLD_EVERY). ``live`` (n,) bool, None for all: before the ring is full, the slots
        that hold a key (at least one); the others get the first live slot's key and a zero
        value row (the unwrapped branch of ``fused_step``)."""
        b, h, m, dv = far.kv.shape
        kv_heads, n = k.shape[1], k.shape[2]
        g = h // kv_heads
        p = fold_every or FOLD_EVERY
        kvz = torch.cat([far.kv, far.z.unsqueeze(-1)], -1)  # (B, H, M, Dv+1)
        c = far.log_scale
        if shared:
            kvz, c = kvz[:, ::g], c[:, ::g]
        vals = v.new_zeros(b * kv_heads, p + n + (m if shared else 0), dv + 1)
        vals[:, p : p + n, :dv] = v.reshape(b * kv_heads, n, dv)
        vals[:, p : p + n, dv] = 1.0
        if live is not None:  # dead slots: a live key (the near max stands), zero values
            first = int(live.nonzero()[0, 0])  # host sync: once, entering
            k = torch.where(live[:, None], k, k[:, :, first : first + 1])
            vals[:, p : p + n].mul_(live[:, None].to(vals.dtype))
        if shared:
            vals[:, p + n :] = kvz.reshape(b * kv_heads, m, dv + 1)
            kvz = vals[:, p + n :]
        else:
            kvz = kvz.reshape(b * h, m, dv + 1).clone()
        f = kvz.shape[0]
        pend = v.new_zeros(f, m, p)
        k = k.reshape(b * kv_heads, n, -1).clone()
        return cls(kvz, c.reshape(f, 1, 1).clone(), k, vals, pend, batch=b, heads=h, ring=ring, shared=shared)

    def fold(self) -> None:
        """The pending keys into kvz, one GEMM (the same far state: sums in another order)."""
        if self.count:
            f = self.kv_heads * self.batch
            self.kvz.view(f, -1, self.dv + 1).baddbmm_(self.pend.view(f, -1, self.fold_every), self.vp)
            self.pend.zero_()
            self.count = 0

    def far_state(self) -> State:
        """The far state as exact_step keeps it, (B, H, M, Dv), (B, H, M), (B, H) (copies;
        the pending keys are folded first)."""
        self.fold()
        b, h = self.batch, self.heads
        g = self.groups if self.shared else 1
        m = self.kvz.shape[1]
        kvz = self.kvz.reshape(b, h // g, 1, m, -1).expand(b, h // g, g, m, self.dv + 1).reshape(b, h, m, -1)
        c = self.c.reshape(b, h // g, 1).expand(b, h // g, g).reshape(b, h)
        return State(kvz[..., :-1].clone(), kvz[..., -1].clone(), c.clone())

    def raw(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The slots' raw keys and values, (B, K, n, D) and (B, K, n, Dv) (views)."""
        b, k = self.batch, self.kv_heads
        return self.k.view(b, k, *self.k.shape[1:]), self.v1[..., :-1].unflatten(0, (b, k))

    def tensors(self) -> list[torch.Tensor]:
        out = [self.c, self.k, self.vals, self.pend]
        return out if self.shared else out + [self.kvz]

    def retarget(self, sc: _Scratch) -> None:
        """The constants that carry c: the leaving key's [ck - HEADROOM ln 2, ck - c] and the
        query's offset constant less c log2(e) (the near logits are shifted by -c log2(e)
        instead of the far features by +c log2(e): one add fewer per token). A c of -inf
        (an empty far state) shifts by 0: its terms are all zero anyway."""
        c = self.c
        self.ck2 = torch.cat([sc.ck2[..., :1], sc.ck2[..., 1:] - c], -1)
        finite = torch.where(torch.isfinite(c), c, torch.zeros_like(c))
        if self.shared:
            finite = finite.expand(-1, self.groups, 1).reshape(-1, 1, 1)
        if sc.mq is None:
            self.qoff = sc.qoff_base - LOG2E * finite
        else:
            self.qoff = sc.qoff_base.clone()
            self.qoff[..., -1:] -= LOG2E * finite
        self.sc = sc
        # the compiled step (fused_native.cpp) holds the constants that carry c: made again
        nat = native.load() if NATIVE and sc.native is not None else None
        self.stepper = None
        if nat is not None:
            tensors = [self.k, self.vals, self.kvz, self.pend, self.ck2, self.qoff, self.c]
            tensors += [sc.ck2.contiguous(), sc.qoff_base.expand_as(self.qoff).contiguous()]
            self.stepper = nat.Stepper(sc.native, tensors, self.batch, self.shared, sc.simple, sc.native_f)


def fused_step(
    state: LeanState, consts: LeanConstants, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, t: int
) -> torch.Tensor:
    """One token at position ``t``: query (B, H, 1, D), key (B, K, 1, D), value (B, K, 1, Dv)
    in the constants' dtype -> out (B, H, 1, Dv); the state is updated where it is. The
    caller vouches for ``fused_eligible(terms, t, built)`` and a state without padding. From
    position W + S + 1 on (``state.steady``) the key at position t - R leaves slot t mod R
    for the far state (a pending slot, folded every P keys) and the new key takes the slot;
    before, no key leaves (``_unwrapped``). A state kept per key/value head needs
    ``consts.shared(K)``."""
    sc = state.sc
    if state.of is not consts:  # new constants (or a new state): their buffers, and c in them
        sc = consts.scratch(state)
        state.retarget(sc)
        state.of = consts
    i = t % state.ring
    if t < state.steady:
        stepper = state.stepper
        if stepper is not None:
            return stepper.unwrapped(query, key, value, i)
        return _unwrapped(state, sc, query, key, value, i)
    if state.count == state.fold_every:
        state.fold()
    stepper = state.stepper
    if stepper is not None:
        out = stepper.step(query, key, value, i, state.count)
        if out is not None:  # None: a NaN in the leaving key's features, left to the ops below
            state.count += 1
            return out
    k_row, k_in, k_in_t2, k_in_g, v_out, k_put, v_put = state.slot[i]
    j = state.count
    shared = state.shared
    q_rows = query.reshape(sc.bh, 1, -1)
    # the leaving key's features s = (x g) P^T log2(e) + bias and the query's, x = k root
    if sc.simple:  # once per key/value head, root folded into the projection
        torch.mm(k_row, sc.proj_root, out=sc.sk)
        torch.mm(q_rows.view(sc.bh, -1), sc.proj_root, out=sc.sq)
        torch.baddbmm(state.ck2, k_in, k_in_t2, alpha=sc.a_nk, out=sc.nk2)
    else:  # per query head (its maps), the key per head or per group (shared), one GEMM
        if sc.mq is None:
            torch.mul(query, consts.root, out=sc.xq4)
        else:
            torch.baddbmm(state.qoff, q_rows, sc.mq, out=sc.xq)
        if consts.mk is None:
            torch.mul(k_in if shared else k_in_g, consts.root, out=sc.xk_g)
        else:
            torch.baddbmm(sc.bk_map, k_in, sc.mk, out=sc.xk_flat)
        x2 = _gained(sc)
        if sc.bias_s is None:
            torch.mm(x2, sc.proj, out=sc.s)
        else:
            torch.addmm(sc.bias_s, x2, sc.proj, out=sc.s)
        torch.baddbmm(state.ck2, sc.xk_d, sc.xk_dt2, alpha=-0.5, out=sc.nk2)
    # its features times exp(l - c), l its log scale (max s - HEADROOM) ln 2 - |x'|^2 / 2 -
    # log(M) / 2 (row_features): s + log2(e) (ck - c - |x'|^2 / 2), the shift cancels. The
    # far state's scale c is the running max of l, so it grows iff one of these exceeds
    # 2^HEADROOM: one max over all rows and one host read instead of the rows' l and c's
    # max per token (it grows rarely; then kvz and the pending keys are rescaled)
    sc.sk_f.add_(sc.nk_weight, alpha=LOG2E)
    if sc.sk.amax().item() > HEADROOM:  # host sync; c = -inf (an empty far state) gives inf
        _grow(state, sc, consts, k_row, q_rows)
    torch.exp2(sc.sk_f, out=state.p_put[j])
    state.count = j + 1
    state.vp_put[j].copy_(v_out)
    k_put.copy_(key)
    v_put.copy_(value)
    # the query's offset of the near logits (log2 units), less c log2(e):
    # Cq - log2(e) root^2 q.c + log2(e) |x_q|^2 / 2 - c log2(e)
    if sc.simple:
        torch.baddbmm(state.qoff, q_rows, q_rows.mT, alpha=sc.a_off, out=sc.off)
    else:
        off_in = state.qoff if sc.mq is None else sc.xq_last
        torch.baddbmm(off_in, sc.xq_d, sc.xq_dt, alpha=0.5 * LOG2E, out=sc.off)
    # one row per query head: [pending | near logits + offset | far features], base 2
    torch.baddbmm(sc.off_g, q_rows.view(sc.bk, sc.g, -1), state.kt, alpha=sc.a_near, out=sc.near_g)
    top = sc.live.amax(-1, keepdim=True).sub_(HEADROOM)  # the largest term 2^HEADROOM (row_features)
    sc.live.sub_(top).exp2_()
    # the pending keys' weights: the query's far features against theirs
    torch.bmm(sc.far_f, state.pend, out=sc.pend_f)
    if shared:  # [pending values | slot values | kvz]: one GEMM
        torch.bmm(sc.row_g, state.vals, out=sc.acc_g)
    else:
        torch.bmm(sc.near_v, state.vals, out=sc.acc_g)
        sc.acc.baddbmm_(sc.far_f, state.kvz)
    return torch.div(sc.num, sc.den)


def _unwrapped(state: LeanState, sc: _Scratch, query, key, value, i: int) -> torch.Tensor:
    """A token before the ring is full (positions S .. W + S): no key leaves, the far state
    is empty, so the output is softmax over the live slots of the logits root^2 q.k (the
    reference's root^2 q.(k - c) + log_const - l_q less per-row constants, which cancel).
    The new key takes ring slot i, its value row gets its ones column; dead slots weigh
    nothing (``LeanState.enter``)."""
    k_put, v_put = state.slot[i][5:]
    k_put.copy_(key)
    v_put.copy_(value)
    state.v1[:, i, state.dv].fill_(1.0)
    # beta = 0: the input is ignored (no offset: per-row constants cancel)
    torch.baddbmm(sc.off_g, query.reshape(sc.bk, sc.g, -1), state.kt, beta=0.0, alpha=sc.a_near, out=sc.near_g)
    near = sc.near
    near.sub_(near.amax(-1, keepdim=True)).exp2_()
    torch.bmm(sc.near_g, state.v1, out=sc.acc_g)
    return torch.div(sc.num, sc.den)


def _gained(sc: _Scratch) -> torch.Tensor:
    """Both rows' feature inputs x g (2 B H, D), with an e column (LeanConstants.proj_e)
    [x g, e] (2 B H, D + 1), e = sqrt(max(|x rest|^2, 1e-20)) as the adapter's augmented
    input (|x|^2 - |x g|^2 there, the same sum)."""
    x2 = sc.x2d
    if sc.gain is None:
        return x2
    if sc.rest is None:
        return torch.mul(x2, sc.gain, out=sc.xb)
    torch.mul(x2, sc.gain, out=sc.xb_d)
    torch.mul(x2, sc.rest, out=sc.xr)
    torch.bmm(sc.xr_row, sc.xr_col, out=sc.e2)
    torch.sqrt(sc.e2.view_as(sc.e_col).clamp_min_(1e-20), out=sc.e_col)
    return sc.xb


def _grow(state: LeanState, sc: _Scratch, consts: LeanConstants, k_row: torch.Tensor, q_rows: torch.Tensor) -> None:
    """The far scale follows a leaving key with a larger log scale l: c = max(c, l) per row
    (as exact_step), kvz and the pending keys times exp(c_old - c), the constants that carry
    c remade, and the key's row s + log2(e) (ck - c - |x'|^2 / 2) made again from s."""
    # s again (its row now holds s + log2(e) w, and w may be inf: c = -inf)
    if sc.simple:
        s = torch.mm(k_row, sc.proj_root).view_as(sc.sk_f)
    else:
        s = (sc.x2d if sc.gain is None else sc.xb)[sc.bh :] @ sc.proj
        s = (s if sc.bias_s is None else s + sc.bias_s[sc.bh :]).view_as(sc.sk_f)
    c = state.c
    lk = torch.add(sc.nk_log, s.amax(-1, keepdim=True), alpha=LN2)
    new_c = torch.maximum(c, lk)
    factor = torch.exp(c - new_c)
    state.kvz.mul_(factor)
    state.pend.mul_(factor)
    # this key's weight and the next keys' constant follow c (made from the first column,
    # c-free: c may have been -inf)
    torch.sub(sc.nk_log, new_c - HEADROOM * LN2, out=sc.nk_weight)
    c.copy_(new_c)
    state.retarget(sc)
    if sc.mq is not None:  # x_q's last column carries c
        torch.baddbmm(state.qoff, q_rows, sc.mq, out=sc.xq)
    torch.add(s, sc.nk_weight, alpha=LOG2E, out=sc.sk_f)


def ring_positions(t: int, ring: int, sinks: int, mark: int, *, device) -> torch.Tensor:
    """exact_step's ``pos`` for a state of length t with every slot live: ring slot j holds
    the position p in [t - R, t - 1] with p = j mod R, sink slot R + s holds s + ``mark``."""
    j = torch.arange(ring, device=device)
    first = t - ring
    ring_pos = first + (j - first) % ring
    ring_pos = torch.where(ring_pos >= sinks, ring_pos, -1)  # before the ring is full: empty slots
    return torch.cat([ring_pos, torch.arange(sinks, device=device) + mark])


def fused_eligible(terms, t: int, built: int) -> bool:
    """Whether ``fused_step`` may take the token at position ``t`` of a state with no
    padding last made from a whole sequence of ``built`` tokens: the steady state
    (recurrent.lean_eligible: every slot live, one key leaving per token) or, before the
    ring is full, any position from S on (the sinks all in, the new key a ring key; no key
    leaves until W + S + 1, so the prompt's state needs no step first)."""
    last = terms.window + terms.sinks  # the last position before the steady state
    return terms.block == 1 and (t > last and t > built or max(terms.sinks, 1) <= t <= last)
