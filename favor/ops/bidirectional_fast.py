"""Bidirectional FAVOR without L x M' feature tensors: the memory-lean twin of
``bidirectional.bidirectional`` (its reference, tested against it and kernel_attention).

Forward: phi(K)^T V and phi(K)^T 1 are built over key chunks (a running max of the keys'
log scales, the sums rescaled when it grows), then the outputs over query chunks. Only
q, k, v, the (M', Dv) summaries, the output and its normaliser are kept. Backward
recomputes features chunk by chunk and differentiates them with autograd, so any row-wise
feature map works (``feat(x, a) -> Features``; ``a`` is FAVOR++'s A*, whose gradient is
returned too when it depends on the data).

The shifts (running max, the features' own row shifts) are constants here: they cancel
exactly between numerator and normaliser, so the gradient through them is zero.
"""

from __future__ import annotations

import torch

from . import chunking
from .chunking import FeatFn, Scratch
from .normalise import exp_diff, masked_keys

__all__ = ["bidirectional_fast", "default_chunk", "DEFAULT_BIDIRECTIONAL_CHUNK"]

#: rows of features alive at a time; (B*H) x chunk x M' floats per live tensor
DEFAULT_BIDIRECTIONAL_CHUNK = 512

#: rows over all (batch, head) pairs per chunk, and the chunk's bounds. Each chunk is a few
#: batched GEMMs plus ~20 small ops; with few heads a 512-row chunk leaves the GEMMs too
#: small to amortise that. Measured fwd+bwd on 2 cores, L=8192..16384 (python -m
#: benchmarks.tune_chunk --heads 1,2,4,8,16): best near 8192 rows in all, i.e. C=1024 at
#: 8 heads (9 % faster than 512 at L=16384), C=4096 at 1 head (2x faster); 16 heads: 512.
CHUNK_ROWS = 8192
CHUNK_BOUNDS = (DEFAULT_BIDIRECTIONAL_CHUNK, 4096)


def default_chunk(lead: int) -> int:
    """The chunk for ``lead`` = B*H (batch times heads) sequences: CHUNK_ROWS rows in all,
    within CHUNK_BOUNDS (the scratch blocks stay at most 8192 x M' floats)."""
    low, high = CHUNK_BOUNDS
    return min(high, max(low, CHUNK_ROWS // max(lead, 1)))


def _weighted_v1(scratch: Scratch, v: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """[v, 1] * e (rows x (Dv + 1)) in a reused buffer: the keys' weights on V and on the
    normaliser's column of ones."""
    dv = v.shape[-1]
    v1 = scratch("v1", (*v.shape[:-1], dv + 1), v)
    torch.mul(v, e, out=v1[..., :dv])
    v1[..., dv:] = e
    return v1


def key_sums(k, v, a, mask, feat: FeatFn, chunk: int, scratch: Scratch | None = None):
    """(kvz (..., M', Dv + 1), c (...,)): [sum_j phi(k_j) v_j^T, sum_j phi(k_j)] = kvz * exp(c),
    over chunks of keys with a running max c of the log scales. The normaliser rides along
    as a column of ones appended to V: one matmul gives numerator and normaliser. Each key's
    weight exp(log_scale - c) scales its row of [V, 1] (Dv + 1 floats), not its M' features."""
    scratch = Scratch() if scratch is None else scratch
    kvz = c = None
    for sl in chunking.slices(k.shape[-2], chunk):
        vals, ls = masked_keys(scratch.features(feat, k[..., sl, :], a), chunking.mask_at(mask, sl))
        if kvz is None:
            lead = vals.shape[:-2]
            kvz = vals.new_zeros(*lead, vals.shape[-1], v.shape[-1] + 1)
            c = vals.new_full(lead, float("-inf"))
        new_c = torch.maximum(c, ls.amax(-1))
        # without padding every log scale is finite, and so is new_c: plain exp gives
        # exp_diff's values (exp(-inf) = 0 for the empty start) in one op instead of six
        plain = mask is None
        e = (torch.exp(ls - new_c[..., None]) if plain else exp_diff(ls, new_c[..., None]))[..., None]
        decay = torch.exp(c - new_c) if plain else exp_diff(c, new_c)
        v1 = _weighted_v1(scratch, v[..., sl, :], e)
        kvz.mul_(decay[..., None, None]).add_(scratch.matmul("summary", vals.mT, v1))
        c = new_c
    return kvz, c


def _key_terms(feat: FeatFn, k, a, mask, sl, scratch: Scratch, name: str) -> torch.Tensor:
    """Base-2 exponents of the keys ``sl`` (every row factor in), -inf for padding."""
    t = feat.log2_terms(k[..., sl, :], a, out=scratch(name, (*k.shape[:-2], sl.stop - sl.start, feat.width), k))
    m = chunking.mask_at(mask, sl)
    return t if m is None else t.masked_fill_(m[..., None], float("-inf"))


def _finite(b: torch.Tensor) -> torch.Tensor:
    """A column shift with -inf (no key yet, or only padding) replaced by 0."""
    return torch.where(torch.isfinite(b), b, torch.zeros_like(b))


def key_sums_per_feature(k, v, a, mask, feat: FeatFn, chunk: int, scratch: Scratch):
    """(kvz (..., M', Dv + 1), b (..., M')): [sum_j phi(k_j) v_j^T, sum_j phi(k_j)] with row m
    scaled by 2^-b_m, b_m the running max over keys of feature m's base-2 exponent.

    One shift per feature, not per key: a feature that no key makes large still has a row
    of order 1, so a query dominated by it (q's shift adds b, see ``_query_values``) gets a
    normaliser >= 1. With one shared shift, such a normaliser was ~e^-95 in float32 books
    training (FAVOR++, L = 2048): subnormal, and 1/normaliser overflowed to inf."""
    kvz = b = None
    dv = v.shape[-1]
    for sl in chunking.slices(k.shape[-2], chunk):
        t = _key_terms(feat, k, a, mask, sl, scratch, "fk")
        if kvz is None:
            kvz = t.new_zeros(*t.shape[:-2], t.shape[-1], dv + 1)
            b = t.new_full((*t.shape[:-2], t.shape[-1]), float("-inf"))
        # b stays -inf for a feature no real key has reached yet (its row of kvz is 0), so
        # that padding never lowers the shift of the keys that come later
        new_b = torch.maximum(b, t.amax(-2))
        shift = _finite(new_b)
        vals = t.sub_(shift[..., None, :]).exp2_()
        v1 = scratch("v1", (*v.shape[:-2], sl.stop - sl.start, dv + 1), v)
        v1[..., :dv] = v[..., sl, :]
        v1[..., dv] = 1.0
        kvz.mul_(torch.exp2(b - shift)[..., None]).add_(scratch.matmul("summary", vals.mT, v1))
        b = new_b
    return kvz, _finite(b)


def _query_values(feat: FeatFn, q, a, b, sl, scratch: Scratch, name: str) -> torch.Tensor:
    """Query features for ``key_sums_per_feature``'s rows: 2^(t_m + b_m - max), each row's own
    factor dropped (it cancels in the output)."""
    t = feat.log2_terms(
        q[..., sl, :], a, out=scratch(name, (*q.shape[:-2], sl.stop - sl.start, feat.width), q), rows=False
    )
    t.add_(b[..., None, :])
    return t.sub_(t.amax(-1, keepdim=True)).exp2_()


class _Bidirectional(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, a, mask, feat, chunk):
        scratch = Scratch()
        per_feature = getattr(feat, "log2_terms", None) is not None
        if per_feature:
            kvz, c = key_sums_per_feature(k, v, a, mask, feat, chunk, scratch)
        else:
            kvz, c = key_sums(k, v, a, mask, feat, chunk, scratch)
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        den = q.new_empty(q.shape[:-1])
        for sl in chunking.slices(q.shape[-2], chunk):
            if per_feature:
                fq = _query_values(feat, q, a, c, sl, scratch, "features")
            else:
                fq = scratch.features(feat, q[..., sl, :], a, log_scale=False).values
            nd = scratch.matmul("nd", fq, kvz)
            d = nd[..., -1]
            den[..., sl] = d
            torch.mul(nd[..., :-1], chunking.inverse(d)[..., None], out=out[..., sl, :])
        ctx.feat, ctx.chunk, ctx.per_feature = feat, chunk, per_feature
        ctx.save_for_backward(q, k, v, a, mask, kvz, c, out, den)
        return out

    @staticmethod
    def backward(ctx, g):
        q, k, v, a, mask, kvz, c, out, den = ctx.saved_tensors
        feat, chunk = ctx.feat, ctx.chunk
        need_q, need_k, need_v, need_a = ctx.needs_input_grad[:4]
        # hand-written feature gradients, no graph: ``vjp`` -> dx, or with A in the graph
        # (FAVOR++'s data-adaptive A) ``vjp_a`` -> (dx, dA)
        vjp = getattr(feat, "vjp_a" if need_a else "vjp", None)
        if vjp is None:
            return _backward_autograd(ctx, g, q, k, v, a, mask, kvz[..., :-1], kvz[..., -1], c, out, den)
        # dkvz = [dkv, dz] (M' x E) comes out of one GEMM per query chunk with dnd = [dnum,
        # dden]; the outputs' gradients are then GEMMs against kvz and dkvz, and every
        # per-key weight e scales rows of (C x E) products, never a (C x M') block
        dq = torch.empty_like(q) if need_q else None
        dk = torch.empty_like(k) if need_k else None
        dv = torch.empty_like(v) if need_v else None
        da = [] if need_a else None

        def feature_grad(x, values, d_values, d_log_scale):
            if da is None:
                return vjp(x, a, values, d_values, d_log_scale)
            dx, da_part = vjp(x, a, values, d_values, d_log_scale)
            da.append(da_part)
            return dx

        dkvz = torch.zeros_like(kvz)
        scratch = Scratch()
        for sl in chunking.slices(q.shape[-2], chunk):
            inv = chunking.inverse(den[..., sl])
            g_c = g[..., sl, :]
            dnd = scratch("dnd", (*g_c.shape[:-1], g_c.shape[-1] + 1), g_c)
            torch.mul(g_c, inv[..., None], out=dnd[..., :-1])
            torch.mul((g_c * out[..., sl, :]).sum(-1), inv, out=dnd[..., -1]).neg_()
            qc = q[..., sl, :]
            if ctx.per_feature:
                fq = _query_values(feat, q, a, c, sl, scratch, "fq")
            else:
                fq = scratch.features(feat, qc, a, "fq", log_scale=False).values
            chunking.accumulate(dkvz, fq.mT, dnd)
            if need_q or need_a:
                dx = feature_grad(qc, fq, scratch.matmul("dfq", dnd, kvz.mT), None)
                if need_q:
                    dq[..., sl, :] = dx
        if need_k or need_v or need_a:
            for sl in chunking.slices(k.shape[-2], chunk):
                kc = k[..., sl, :]
                if ctx.per_feature:  # every row factor is inside the values: e = 1
                    vals = _key_terms(feat, k, a, mask, sl, scratch, "fk").sub_(c[..., None, :]).exp2_()
                    e = torch.ones_like(vals[..., :1])
                else:
                    f = scratch.features(feat, kc, a, "fk")
                    vals, ls = masked_keys(f, chunking.mask_at(mask, sl))
                    e = exp_diff(ls, c[..., None])[..., None]  # c is the final max: a constant
                p = scratch.matmul("p", vals, dkvz)  # (C x E): phi(k) [dkv, dz]
                if need_v:
                    torch.mul(p[..., :-1], e, out=dv[..., sl, :])
                if need_k or need_a:
                    v1e = _weighted_v1(scratch, v[..., sl, :], e)
                    # d log_scale_j = sum_m dw_jm w_jm = e_j [v_j, 1] . p_j
                    d_ls = (v1e * p).sum(-1)
                    dx = feature_grad(
                        kc, vals if ctx.per_feature else f.values, scratch.matmul("dw", v1e, dkvz.mT), d_ls
                    )
                    if need_k:
                        dk[..., sl, :] = dx
        if da is not None:
            da = torch.stack(da).sum(0).sum_to_size(a.shape)
        return dq, dk, dv, da, None, None, None


def _backward_autograd(ctx, g, q, k, v, a, mask, kv, z, c, out, den):
    """Backward through per-chunk autograd graphs of the features: when A (FAVOR++'s
    data-adaptive parameter) needs a gradient, or the map has no hand-written one."""
    feat, chunk = ctx.feat, ctx.chunk
    need_q, need_k, need_v, need_a = ctx.needs_input_grad[:4]
    dq = torch.zeros_like(q) if need_q else None
    dk = torch.zeros_like(k) if need_k else None
    dv = torch.zeros_like(v) if need_v else None
    da = None
    dkv = torch.zeros_like(kv)
    dz = torch.zeros_like(z)
    a_leaf = chunking.leaf(a, need_a)
    for sl in chunking.slices(q.shape[-2], chunk):
        inv = chunking.inverse(den[..., sl])
        g_c = g[..., sl, :]
        dnum = g_c * inv[..., None]
        dden = -(g_c * out[..., sl, :]).sum(-1) * inv
        with torch.enable_grad():
            qc = chunking.leaf(q[..., sl, :], need_q)
            fq = feat(qc, a_leaf).values
        fq_d = fq.detach()
        dkv += fq_d.mT @ dnum
        dz += (fq_d.mT @ dden[..., None])[..., 0]
        if need_q or need_a:
            dfq = dnum @ kv.mT + dden[..., None] * z[..., None, :]
            gq, ga = chunking.grad([fq], [qc, a_leaf], [dfq])
            if gq is not None:
                dq[..., sl, :] = gq
            da = chunking.add(da, ga)
    if need_k or need_v or need_a:
        for sl in chunking.slices(k.shape[-2], chunk):
            v_c = v[..., sl, :]
            with torch.enable_grad():
                kc = chunking.leaf(k[..., sl, :], need_k)
                vals, ls = masked_keys(feat(kc, a_leaf), chunking.mask_at(mask, sl))
                w = vals * exp_diff(ls, c[..., None])[..., None]
            if need_v:
                dv[..., sl, :] = w.detach() @ dkv
            if need_k or need_a:
                dw = v_c @ dkv.mT + dz[..., None, :]
                gk, ga = chunking.grad([w], [kc, a_leaf], [dw])
                if gk is not None:
                    dk[..., sl, :] = gk
                da = chunking.add(da, ga)
    if need_a and da is None:
        da = torch.zeros_like(a)
    return dq, dk, dv, da, None, None, None


def bidirectional_fast(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feat: FeatFn,
    *,
    a: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Already-scaled q (..., Lq, D), k (..., Lk, D), v (..., Lk, Dv) with equal leading
    shapes -> (..., Lq, Dv); ``feat(x, a)`` gives row-wise Features of x (rows chunked;
    ``chunk_size=None`` takes ``default_chunk`` of the leading shape)."""
    if chunk_size is None:
        chunk_size = default_chunk(q.shape[:-2].numel())
    return _Bidirectional.apply(q, k, v, a, key_padding_mask, feat, chunk_size)
