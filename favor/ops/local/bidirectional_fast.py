"""Exact local terms, bidirectional, fast: one autograd.Function with a hand-written backward.

The same numbers as ``local.local_exact_attention`` (its reference; both are tested against
the explicit quadratic ``local_exact_reference``, outputs and gradients in float64), for
the maps with row features and hand-written feature gradients (favor.attention's
``row_features``: FAVOR+, FAVOR++ with a fixed A, and favor.hf's dense-exponential features,
which run on FAVOR+). Where the slow path records an autograd graph of some twenty (L x ...)
tensors, here:

* features are computed once without a graph and differentiated by the map's ``vjp``;
* the numerator and normaliser ride in one GEMM (V with a column of ones appended, each
  key's weight on V's rows), and so do the sinks' own estimates (extra columns);
* every banded product over the 2W + 1 neighbours is one batched GEMM over blocks of
  ``BLOCK`` queries, all sequences of the batch laid end to end (the products that cross
  from one sequence into the next fall on slots that are masked anyway), and the band is
  read out of the block products with one strided view;
* the backward's "which queries saw key j" is the band read transposed (a strided view of
  the padded coefficients), so it reuses the same two banded kernels.

Legend: N = B*H sequences, L positions, E = 2W + 1 + S exact slots, X any row width.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from ...features.feature_map import FeatureMap
from ..chunking import Scratch
from ..normalise import exp_diff
from ..row_features import row_features
from .block import check_block

__all__ = ["local_fast", "fast_eligible", "band_products", "band_weighted_sum", "band_transpose", "BLOCK"]

#: queries per block of the banded GEMMs: each block meets BLOCK + 2W keys, so the products
#: cost (BLOCK + 2W) / (2W + 1) times the band itself; smaller blocks waste less but make
#: smaller GEMMs (8, 16 and 32 within noise of each other at W = 8 on the 2-core CPU)
BLOCK = 16


def _geometry(block: int, length: int) -> tuple[int, int]:
    """(queries per block c, padded length P = c * blocks)."""
    c = max(1, min(block, length))
    return c, -(-length // c) * c


def _flat_keys(x: torch.Tensor, w: int, padded: int) -> torch.Tensor:
    """x (N, L, X) -> (N * P + 2w, X): all sequences end to end, each padded to P rows, w zero
    rows before the first and after the last (a copy)."""
    n, length, width = x.shape
    if padded != length:
        x = F.pad(x, (0, 0, 0, padded - length))
    return F.pad(x.reshape(n * padded, width), (0, 0, w, w))


def _flat_reused(x: torch.Tensor, w: int, padded: int, scratch, name: str) -> torch.Tensor:
    """``_flat_keys`` of x in the reused, zero-edged buffer ``name`` (the edges are never
    written, so only x is copied); a fresh copy when the blocks do not tile L."""
    n, length, width = x.shape
    if scratch is None or padded != length:
        return _flat_keys(x, w, padded)
    flat = scratch.zeros(name, (n * length + 2 * w, width), x)
    flat[w : w + n * length].view(n, length, width).copy_(x)
    return flat


def _keys_view(flat: torch.Tensor, w: int, c: int) -> torch.Tensor:
    """(N * P + 2w, X) -> (N * nb, X, c + 2w): the keys each block of c queries meets, an
    overlapping view (a block's keys past its sequence's end belong to the next sequence:
    those slots are masked by the callers)."""
    return flat.unfold(0, c + 2 * w, c)


def _query_blocks(x: torch.Tensor, c: int, padded: int) -> torch.Tensor:
    n, length, width = x.shape
    if padded != length:
        x = F.pad(x, (0, 0, 0, padded - length))
    return x.reshape(n * (padded // c), c, width)


def band_products(
    a: torch.Tensor, b: torch.Tensor, w: int, block: int = BLOCK, *, b_flat=None, scratch=None
) -> torch.Tensor:
    """a_i . b_(i + s - w) for every query i and slot s = 0 .. 2w, a, b (N, L, X) ->
    (N, L, 2w + 1). Slots beyond the sequence's ends hold 0 or a product with another
    sequence's row: the caller masks them. ``b_flat``: b already laid out as ``_flat_keys``;
    ``scratch`` (a Scratch): its buffers are reused for the layout."""
    n, length, _ = a.shape
    c, padded = _geometry(block, length)
    flat = _flat_reused(b, w, padded, scratch, "band_b") if b_flat is None else b_flat
    full = torch.bmm(_query_blocks(a, c, padded), _keys_view(flat, w, c))  # (N * nb, c, c + 2w)
    band = full.as_strided((full.shape[0], c, 2 * w + 1), (c * (c + 2 * w), c + 2 * w + 1, 1))
    return band.reshape(n, padded, 2 * w + 1)[:, :length]


def band_weighted_sum(
    coeff: torch.Tensor, x: torch.Tensor, w: int, block: int = BLOCK, *, x_flat=None, out=None, scratch=None
) -> torch.Tensor:
    """sum_s coeff[i, s] x[i + s - w], coeff (N, L, 2w + 1), x (N, L, X) -> (N, L, X).
    ``coeff`` must be 0 on slots beyond the sequence's ends. ``x_flat``: as ``_flat_keys``;
    ``out`` (N, L, X) contiguous: added to in place (in the GEMM itself where blocks tile L)."""
    n, length, width = x.shape
    c, padded = _geometry(block, length)
    flat = _flat_reused(x, w, padded, scratch, "band_x") if x_flat is None else x_flat
    band = _query_blocks(coeff, c, padded)  # (N * nb, c, 2w + 1)
    # skew: row r's slots move to columns r .. r + 2w of a (c, c + 2w) matrix (the band
    # padded with c zero columns; a reused buffer keeps its zero columns)
    if scratch is None:
        wide = F.pad(band, (0, c))
    else:
        wide = scratch.zeros("band_skew", (*band.shape[:-1], 2 * w + 1 + c), band)
        wide[..., : 2 * w + 1] = band
    skew = wide.flatten(-2)[:, : c * (c + 2 * w)].view(-1, c, c + 2 * w)
    keys = _keys_view(flat, w, c).transpose(-1, -2)  # (N * nb, c + 2w, X)
    if out is not None and padded == length:
        out.view(-1, c, width).baddbmm_(skew, keys)
        return out
    got = torch.bmm(skew, keys).view(n, padded, width)[:, :length]  # (N * nb, c, X) -> (N, L, X)
    return got if out is None else out.add_(got)


def band_transpose(coeff: torch.Tensor, w: int) -> torch.Tensor:
    """The band read from the keys' side: out[j, t] = coeff[j + t - w, 2w - t] (0 beyond the
    ends), so that sum_(i, s -> j) coeff[i, s] y_i = band_weighted_sum(out, y)[j]."""
    n, length, e = coeff.shape
    p = F.pad(coeff, (0, 0, w, w)).contiguous()  # (N, L + 2w, 2w + 1)
    return p.as_strided((n, length, e), (p.stride(0), e, 2 * w), p.storage_offset() + 2 * w)


def block_products(a: torch.Tensor, b: torch.Tensor, w: int, block: int, *, b_flat=None, scratch=None) -> torch.Tensor:
    """Exact blocks (local_block.py): a_i . b_(start(i) + s) for every query i and slot
    s = 0 .. c + 2w - 1, start(i) = c (i // c) - w, a, b (N, L, X) -> (N, L, c + 2w); slots
    beyond the sequence's ends as in ``band_products``: the caller masks them."""
    n, length, _ = a.shape
    c, padded = _geometry(block, length)
    flat = _flat_reused(b, w, padded, scratch, "band_b") if b_flat is None else b_flat
    full = torch.bmm(_query_blocks(a, c, padded), _keys_view(flat, w, c))  # (N * nb, c, c + 2w)
    return full.view(n, padded, c + 2 * w)[:, :length]


def block_weighted_sum(
    coeff: torch.Tensor, x: torch.Tensor, w: int, block: int, *, x_flat=None, out=None, scratch=None
) -> torch.Tensor:
    """sum_s coeff[i, s] x[start(i) + s], coeff (N, L, c + 2w), x (N, L, X) -> (N, L, X);
    ``coeff`` 0 on slots beyond the ends; ``x_flat``, ``out`` as in ``band_weighted_sum``."""
    n, length, width = x.shape
    c, padded = _geometry(block, length)
    flat = _flat_reused(x, w, padded, scratch, "band_x") if x_flat is None else x_flat
    keys = _keys_view(flat, w, c).transpose(-1, -2)  # (N * nb, c + 2w, X)
    co = _query_blocks(coeff, c, padded)
    if out is not None and padded == length:
        out.view(-1, c, width).baddbmm_(co, keys)
        return out
    got = torch.bmm(co, keys).view(n, padded, width)[:, :length]
    return got if out is None else out.add_(got)


def block_transpose_sum(coeff: torch.Tensor, y: torch.Tensor, w: int, block: int, *, out=None) -> torch.Tensor:
    """The blocks read from the keys' side: out[j] = sum over (i, s) with start(i) + s = j of
    coeff[i, s] y_i, coeff (N, L, c + 2w), y (N, L, X) -> (N, L, X); ``coeff`` 0 on slots
    beyond the ends (their products land in padding or in a neighbouring sequence's rows)."""
    n, length, width = y.shape
    c, padded = _geometry(block, length)
    ext = _query_blocks(coeff, c, padded).mT @ _query_blocks(y, c, padded)  # (N * nb, c + 2w, X)
    flat = y.new_zeros(n * padded + 2 * w + c, width)  # row b c + s: slot s of block b
    for o in range(0, c + 2 * w, c):  # the overlapping extents, c rows at a time
        m = min(c, c + 2 * w - o)
        flat[o : o + n * padded].view(-1, c, width)[:, :m] += ext[:, o : o + m]
    got = flat[w : w + n * padded].view(n, padded, width)[:, :length]
    return got if out is None else out.add_(got)


class _ExactSlots:
    """Where each exact slot's key sits: the band (``blocks`` = 1: keys i - w .. i + w, in
    GEMM blocks of ``block`` queries) or exact blocks (``blocks`` = C > 1: each query's block
    of C positions widened by w, local_block.py), with the products both passes use."""

    def __init__(self, window: int, block: int, blocks: int, length: int) -> None:
        self.blocked = blocks > 1
        self.w = max(window, 0) if self.blocked else window
        self.block = blocks if self.blocked else block
        self.c = _geometry(self.block, length)[0]
        self.n = (self.c + 2 * self.w) if self.blocked else (2 * window + 1 if window >= 0 else 0)

    def keys(self, length: int, device) -> torch.Tensor:
        """(L, n): the key of each slot (may lie outside [0, L))."""
        i = torch.arange(length, device=device)[:, None]
        start = (i // self.c) * self.c - self.w if self.blocked else i - self.w
        return start + torch.arange(self.n, device=device)[None, :]

    def weights(self, e: torch.Tensor) -> torch.Tensor:
        """e (g, L) of each slot's key, (g, L, n); 0 beyond the ends."""
        if not self.blocked:
            return F.pad(e, (self.w, self.w)).unfold(-1, self.n, 1)
        g, length = e.shape
        c, padded = _geometry(self.block, length)
        ext = F.pad(e, (self.w, padded - length + self.w)).unfold(-1, self.n, c)  # (g, nb, n)
        return ext[:, :, None, :].expand(g, padded // c, c, self.n).reshape(g, padded, self.n)[:, :length]

    def products(self, a, b, **kw):
        f = block_products if self.blocked else band_products
        return f(a, b, self.w, self.block, **kw)

    def weighted_sum(self, coeff, x, **kw):
        f = block_weighted_sum if self.blocked else band_weighted_sum
        return f(coeff, x, self.w, self.block, **kw)

    def transpose_sum(self, coeff, y, *, x_flat=None, out=None):
        if self.blocked:
            return block_transpose_sum(coeff, y, self.w, self.block, out=out)
        return band_weighted_sum(band_transpose(coeff, self.w), y, self.w, self.block, x_flat=x_flat, out=out)


#: rows (sequences x positions) whose features are alive at a time: a group of whole
#: sequences, so no feature row is ever computed twice and the band needs no halo. None:
#: ROWS_PER_THREAD per torch thread (up to 4). At L=4096, H=8 on the 2-core CPU (quiet,
#: interleaved): 1 thread best at 4096 rows (125 ms forward; 16384: 140-149 ms), 2 threads
#: best at 8192 (forward 76 ms, forward+backward 225 ms; 4096: 86 / 249 ms). Exact blocks
#: (C=32) take ROWS_PER_THREAD whatever the threads: at 2 threads 4096 rows 68 / 224 ms,
#: 8192 rows 75 / 237 ms (forward / forward+backward, interleaved, median of 11 / 7)
GROUP_ROWS: int | None = None
ROWS_PER_THREAD = 4096


def _group_rows(blocked: bool = False) -> int:
    if GROUP_ROWS is not None:
        return GROUP_ROWS
    return ROWS_PER_THREAD * (1 if blocked else max(1, min(torch.get_num_threads(), 4)))


def _features(feat, x: torch.Tensor, a, w: int, block: int, scratch: Scratch, name: str):
    """(values (g, L, M'), log scale (g, L), flat): features of x (g, L, D) in the reused
    buffer ``name``, laid out as ``_flat_keys`` (``flat``) when the blocks tile L, else flat
    is None."""
    g, length, _ = x.shape
    c, padded = _geometry(block, length)
    width = feat.width
    if w < 0 or padded != length:
        f = scratch.features(feat, x, a, name)
        return f.values, f.log_scale, None
    flat = scratch(name, (g * length + 2 * w, width), x)
    flat[:w].zero_()
    flat[g * length + w :].zero_()
    f = feat(x, a, out=flat[w : w + g * length].view(g, length, width))
    return f.values, f.log_scale, flat


class _SequenceGroup:
    """One group of sequences: features, masks and the per-key weights, as both passes use."""

    def __init__(self, ctx_like, q, k, a, pad, scratch: Scratch, ref=None, *, weighted: bool = True):
        feat, w, block = ctx_like
        self.qv, self.lq, self.q_flat = _features(feat, q, a, w, block, scratch, "fq")
        kv_, lk, self.k_flat = _features(feat, k, a, w, block, scratch, "fk")
        if pad is not None:
            lk = lk.masked_fill(pad, float("-inf"))
        self.ref = lk.amax(-1, keepdim=True) if ref is None else ref  # (g, 1)
        # each key's weight exp(log scale - ref) (g, L), 0 for padding
        self.e = exp_diff(lk, self.ref) if pad is not None else torch.exp(lk - self.ref)
        # weighted: phi(k_j) exp(-ref) = values * e, in place (the backward's form); else the
        # forward leaves the values alone and puts e on V's rows and on the band's products
        self.kv = kv_.mul_(self.e[..., None]) if weighted else kv_


def _flat(x: torch.Tensor, lead: torch.Size) -> torch.Tensor:
    """(..., L, X) broadcast to ``lead`` -> (N, L, X)."""
    return x.expand(*lead, *x.shape[-2:]).reshape(-1, *x.shape[-2:])


def _live_slots(length: int, slots: _ExactSlots, sinks: int, live_key, device) -> torch.Tensor:
    """Which exact slots hold a real key, (1 or N, L, E): neighbours (or the block's keys)
    inside the sequence, sinks not among them, neither padding (``live_key`` (N, L) or None)."""
    parts = [slots.keys(length, device)] if slots.n else []
    n_sinks = min(sinks, length)
    if n_sinks:
        parts.append(torch.arange(n_sinks, device=device)[None, :].expand(length, -1))
    j = torch.cat(parts, -1)  # (L, E): the key of each slot
    ok = (j >= 0) & (j < length)
    if n_sinks and slots.n:
        first, sink = j[:, :1], j[:, -n_sinks:]
        ok[:, -n_sinks:] &= (sink < first) | (sink >= first + slots.n)
    ok = ok[None]
    if live_key is not None:
        ok = ok & live_key[:, j.clamp(0, length - 1)]
    return ok


def _oprf_a_of_group(a, lead, sl):
    """FAVOR++'s A for the sequences ``sl`` of the flattened lead dims, or None."""
    return None if a is None else a.expand(lead).reshape(-1)[sl]


class _LocalFast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, qx, kx, v, log_const, projection, a, mask, feat, root, window, sinks, block, blocks):
        lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2], qx.shape[:-2], kx.shape[:-2])
        length, dv = q.shape[-2], v.shape[-1]
        q_, k_, qx_, kx_, v_ = (_flat(x, lead) for x in (q, k, qx, kx, v))
        n = q_.shape[0]
        pad = None if mask is None else mask.expand(*lead, length).reshape(n, length)
        if not isinstance(log_const, torch.Tensor):  # a float is honoured, not taken as 0
            log_const = torch.full((), float(log_const), dtype=q.dtype, device=q.device)
        c_all = log_const.to(q.dtype).expand(*lead, 1, 1).reshape(n, 1, 1)
        slots = _ExactSlots(window, block, blocks, length)
        live = _live_slots(length, slots, sinks, None if pad is None else ~pad, q.device)  # (1 or N, L, E)
        n_sinks, nb = min(sinks, length), slots.n
        n_exact, dead_all = live.shape[-1], ~live
        out = q_.new_empty(n, length, dv)
        inv = q_.new_empty(n, length)
        far = q_.new_empty(n, length)
        coeff = q_.new_empty(n, length, live.shape[-1])
        exact = torch.empty_like(coeff)
        kvzs, refs = [], []
        step = max(1, _group_rows(slots.blocked) // length)
        scratch = Scratch()  # the groups' (rows x M') blocks reuse the same buffers
        for s0 in range(0, n, step):
            sl = slice(s0, min(n, s0 + step))
            p_ = None if pad is None else pad[sl]
            gr = _SequenceGroup(
                (feat, slots.w, slots.block), q_[sl], k_[sl], _oprf_a_of_group(a, lead, sl), p_, scratch, weighted=False
            )
            qv, kv, e = gr.qv, gr.kv, gr.e
            g = qv.shape[0]
            # [v, 1] e: each key's weight on V's rows and on the normaliser's column
            v1e = scratch("v1e", (g, length, dv + 1), q_)
            torch.mul(v_[sl], e[..., None], out=v1e[..., :dv])
            v1e[..., dv].copy_(e)
            kvz_g = kv.mT @ v1e  # (g, M', Dv + 1)
            if n_sinks:  # the sinks' weighted features ride in the same GEMM as the far sums
                rhs = scratch("rhs", (g, kv.shape[-1], dv + 1 + n_sinks), q_)
                rhs[..., : dv + 1].copy_(kvz_g)
                torch.mul(kv[:, :n_sinks].mT, e[:, None, :n_sinks], out=rhs[..., dv + 1 :])
                nd = scratch.matmul("nd", qv, rhs)  # (g, L, Dv + 1 + S)
            else:
                nd = scratch.matmul("nd", qv, kvz_g)  # (g, L, Dv + 1): far numerator and normaliser
            dead = dead_all if dead_all.shape[0] == 1 else dead_all[sl]
            # each exact slot's FAVOR estimate (rf) and exact logit, written side by side
            rf, logits = scratch("rf", (g, length, n_exact), q_), scratch("logits", (g, length, n_exact), q_)
            if nb:
                e_band = slots.weights(e)  # (g, L, nb): e of each slot's key
                torch.mul(slots.products(qv, kv, b_flat=gr.k_flat), e_band, out=rf[..., :nb])
                logits[..., :nb] = slots.products(qx_[sl], kx_[sl], scratch=scratch)
            if n_sinks:
                rf[..., nb:] = nd[..., dv + 1 :]
                torch.matmul(qx_[sl], kx_[sl, :n_sinks].mT, out=logits[..., nb:])
            rf.masked_fill_(dead, 0.0)
            log_exact = logits.add_(c_all[sl] - gr.lq[..., None] - gr.ref[..., None, :]).masked_fill_(
                dead, float("-inf")
            )
            top = log_exact.amax(-1).clamp_min_(0.0)
            top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
            ex = torch.sub(log_exact, top[..., None], out=exact[sl]).exp_()  # (g, L, E), 0 where no key
            fa = torch.exp(-top)  # (g, L)
            co = torch.addcmul(ex, rf, fa[..., None], value=-1.0, out=coeff[sl])
            den = (fa * nd[..., dv] + co.sum(-1)).clamp_min_(0.0)
            iv = torch.where(den > 0, 1.0 / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
            # out = (fa nd + sum co v) / den, the 1 / den folded into the (L x E) coefficients
            # so that the banded and sink sums add into ``out`` inside their GEMMs
            o = out[sl]
            torch.mul(nd[..., :dv], (fa * iv)[..., None], out=o)
            co_iv = co * iv[..., None]
            if nb:
                slots.weighted_sum(co_iv[..., :nb], v_[sl], out=o, scratch=scratch)
            if n_sinks:
                o.baddbmm_(co_iv[..., nb:], v_[sl, :n_sinks])
            inv[sl], far[sl] = iv, fa
            kvzs.append(kvz_g)
            refs.append(gr.ref)
        ctx.feat, ctx.window, ctx.sinks, ctx.block, ctx.lead, ctx.root = feat, window, sinks, block, lead, root
        ctx.blocks = blocks
        ctx.shapes = (qx.shape, kx.shape, v.shape)
        ctx.c_shape = log_const.shape if ctx.needs_input_grad[5] else None
        ctx.w_shape, ctx.w_dtype = projection.shape, projection.dtype
        ctx.save_for_backward(
            q, k, qx, kx, v, a, pad, torch.cat(kvzs), torch.cat(refs), live, coeff, exact, far, out, inv
        )
        return out.view(*lead, length, dv)

    @staticmethod
    def backward(ctx, grad):
        q, k, qx, kx, v, a, pad, kvz, ref, live, coeff, exact, far, out, inv = ctx.saved_tensors
        lead, need, length = ctx.lead, ctx.needs_input_grad, out.shape[-2]
        q_, k_, qx_, kx_, v_ = (_flat(x, lead) for x in (q, k, qx, kx, v))
        grad = _flat(grad, lead)
        n = q_.shape[0]
        dq = torch.empty_like(q_) if need[0] else None
        dk = torch.empty_like(k_) if need[1] else None
        dqx = torch.empty_like(qx_) if need[2] else None
        dkx = torch.empty_like(kx_) if need[3] else None
        dv_ = torch.empty_like(v_) if need[4] else None
        dc = q_.new_empty(n) if need[5] and ctx.c_shape is not None else None
        # FAVOR+'s projection W (fitted or distilled): values = exp(root x.w_m - shift), so
        # dW = root * sum over rows of (d values * values)^T x, for queries and keys
        dw = torch.zeros(ctx.w_shape, dtype=q_.dtype, device=q_.device) if need[6] else None
        step = max(1, _group_rows(ctx.blocks > 1) // length)
        scratch = Scratch()
        for s0 in range(0, n, step):
            sl = slice(s0, min(n, s0 + step))
            saved = (q_, k_, qx_, kx_, v_, a, pad, kvz, ref, live, coeff, exact, far, out, inv, grad)
            _backward_group(ctx, scratch, sl, saved, (dq, dk, dqx, dkx, dv_, dc, dw))

        def view(t, shape):
            return None if t is None else t.view(*lead, *t.shape[-2:]).sum_to_size(shape)

        return (
            view(dq, q.shape),
            view(dk, k.shape),
            view(dqx, ctx.shapes[0]),
            view(dkx, ctx.shapes[1]),
            view(dv_, ctx.shapes[2]),
            None if dc is None else dc.view(*lead, 1, 1).sum_to_size(ctx.c_shape),
            None if dw is None else (dw * ctx.root).to(ctx.w_dtype),
            *([None] * 8),  # a, mask, feat, root, window, sinks, block, blocks
        )


def _backward_group(ctx, scratch: Scratch, sl: slice, saved: tuple, grads: tuple) -> None:
    """The hand-written backward for the sequences ``sl``, written into ``grads`` (each (N, ...) or None)."""
    q_, k_, qx_, kx_, v_, a, pad, kvz, ref, live, coeff, exact, far, out, inv, grad = saved
    feat, window, sinks, block, lead = ctx.feat, ctx.window, ctx.sinks, ctx.block, ctx.lead
    dq, dk, dqx, dkx, dv_, dc, dw = grads
    length, dv = out.shape[-2], out.shape[-1]
    slots = _ExactSlots(window, block, ctx.blocks, length)
    n_sinks, nb = min(sinks, length), slots.n
    a_g = _oprf_a_of_group(a, lead, sl)
    gr = _SequenceGroup(
        (feat, slots.w, slots.block), q_[sl], k_[sl], a_g, None if pad is None else pad[sl], scratch, ref[sl]
    )
    qv, kw = gr.qv, gr.kv
    lv = live if live.shape[0] == 1 else live[sl]
    co, ex, fa, iv, vg = coeff[sl], exact[sl], far[sl], inv[sl], v_[sl]
    g = grad[sl]
    dnum = g * iv[..., None]
    dden = -(g * out[sl]).sum(-1) * iv
    dnd = torch.cat([dnum, dden[..., None]], -1) * fa[..., None]  # (g, L, Dv + 1)
    kvz_g = kvz[sl]
    dkvz = qv.mT @ dnd  # (g, M', Dv + 1)
    dcoeff = []
    if nb:
        dcoeff.append(slots.products(dnum, vg))
    if n_sinks:
        dcoeff.append(dnum @ vg[:, :n_sinks].mT)
    dcoeff = torch.cat(dcoeff, -1) if len(dcoeff) > 1 else dcoeff[0]
    dcoeff = (dcoeff + dden[..., None]).masked_fill_(~lv, 0.0)
    dlog = dcoeff * ex  # d log_exact (exact = 0 on dead slots)
    drf = dcoeff.mul_(-fa[..., None])
    if dv_ is not None:
        d = kw @ dkvz[..., :dv]
        if nb:
            d += slots.transpose_sum(co[..., :nb], dnum)
        if n_sinks:
            d[:, :n_sinks] += co[..., nb:].mT @ dnum
        dv_[sl] = d
    if dqx is not None:
        d = 0.0
        if nb:
            d = slots.weighted_sum(dlog[..., :nb], kx_[sl])
        if n_sinks:
            d = d + dlog[..., nb:] @ kx_[sl, :n_sinks]
        dqx[sl] = d
    if dkx is not None:
        d = torch.zeros_like(kx_[sl])
        if nb:
            d += slots.transpose_sum(dlog[..., :nb], qx_[sl])
        if n_sinks:
            d[:, :n_sinks] += dlog[..., nb:].mT @ qx_[sl]
        dkx[sl] = d
    if dc is not None:
        dc[sl] = dlog.sum((-2, -1))
    if dq is not None or dw is not None:
        dqv = scratch.matmul("dqv", dnd, kvz_g.mT)  # (g, L, M')
        if nb:
            slots.weighted_sum(drf[..., :nb], kw, x_flat=gr.k_flat, out=dqv)
        if n_sinks:
            dqv.baddbmm_(drf[..., nb:], kw[:, :n_sinks])
        if dw is not None:
            prod = torch.mul(dqv, qv, out=scratch("prod", qv.shape, qv))
            dw.addmm_(prod.flatten(0, 1).mT, q_[sl].flatten(0, 1))
        if dq is not None:
            dq[sl] = feat.vjp(q_[sl], a_g, qv, dqv, -dlog.sum(-1))
    if dk is not None or dw is not None:
        v1 = torch.cat([vg, torch.ones_like(vg[..., :1])], -1)
        dkw = scratch.matmul("dkw", v1, dkvz.mT)  # (g, L, M')
        if nb:
            slots.transpose_sum(drf[..., :nb], qv, x_flat=gr.q_flat, out=dkw)
        if n_sinks:
            dkw[:, :n_sinks] += drf[..., nb:].mT @ qv
        # phi(k) exp(-ref) = kw: its log scale (the |k|^2 term) carries sum_m dkw kw
        prod = torch.mul(dkw, kw, out=scratch("prod", kw.shape, kw))
        if dw is not None:
            dw.addmm_(prod.flatten(0, 1).mT, k_[sl].flatten(0, 1))
        if dk is not None:
            dk[sl] = feat.vjp(k_[sl], a_g, kw, dkw, prod.sum(-1))


def fast_eligible(feature_map: FeatureMap, a: torch.Tensor | None) -> bool:
    """Whether ``local_fast`` takes this map: row features with a hand-written gradient
    (FAVOR+, so also favor.hf's dense features, or FAVOR++ with a constant A and a constant
    projection) and the exact stabiliser."""
    if feature_map.stabilizer != "exact" or feature_map.kernel not in ("positive", "oprf"):
        return False
    if feature_map.kernel == "oprf":
        return (a is None or not a.requires_grad) and not feature_map.projection.requires_grad
    return True


def local_fast(
    feature_map: FeatureMap,
    q: torch.Tensor,
    k: torch.Tensor,
    qx: torch.Tensor,
    kx: torch.Tensor,
    v: torch.Tensor,
    *,
    root: float,
    window: int,
    sinks: int,
    a: torch.Tensor | None = None,
    log_const: torch.Tensor | float = 0.0,
    key_padding_mask: torch.Tensor | None = None,
    block: int = BLOCK,
    exact_block: int = 1,
) -> torch.Tensor:
    """Bidirectional FAVOR with exact local terms (local.py's module docstring), fast.

    The features are ``feature_map``'s of q * root and k * root, q, k (..., L, D'); qx, kx
    (..., L, D): the inputs whose dot products the features estimate (already scaled);
    v (..., L, Dv); ``a``: FAVOR++'s A (a constant) or None; ``log_const``: a float or a
    tensor broadcasting against (..., 1, 1); ``key_padding_mask`` bool (B, L), True for
    padding. ``exact_block`` C > 1: each query's block of C positions widened by ``window``
    is exact instead of its neighbours (local_block.py; its ``block_exact_attention`` is this
    path's reference). Gradients reach q, k, qx, kx, v, a tensor log_const and FAVOR+'s
    projection. Returns (..., L, Dv)."""
    if not fast_eligible(feature_map, a):
        raise ValueError(
            f"local_fast takes FAVOR+ ('positive') or FAVOR++ ('oprf') with a constant A and projection and the "
            f"exact stabiliser, got kernel={feature_map.kernel!r}, stabilizer={feature_map.stabilizer!r}"
        )
    length = q.shape[-2]
    if k.shape[-2] != length or qx.shape[-2] != length or kx.shape[-2] != length or v.shape[-2] != length:
        raise ValueError(
            f"exact local terms need as many queries as keys, got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    check_block(exact_block)
    if window < 0 and sinks <= 0 and exact_block == 1:
        raise ValueError(f"exact local terms need window >= 0 or sinks > 0, got window={window}, sinks={sinks}")
    mask = None if key_padding_mask is None else key_padding_mask[:, None, :]
    feat = row_features(feature_map, root)
    projection = feature_map.projection
    return _LocalFast.apply(
        q, k, qx, kx, v, log_const, projection, a, mask, feat, root, window, sinks, block, exact_block
    )
