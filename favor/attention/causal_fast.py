"""Causal FAVOR for training: the chunked algorithm of ``causal.causal_chunked`` (its
reference, tested against it and kernel_attention) with a hand-written backward.

Forward keeps only what backward cannot cheaply redo: the state (kv, z, log scale) at the
start of every chunk, O(L/C * M' * Dv), plus the output and its normaliser. Backward walks
the chunks in reverse, recomputes each chunk's features and C x C products, and carries
the gradient of the state backwards (in the spirit of SLiM Performer, Likhosherstov et al.
2020). No L x M' x Dv tensor exists, and no L x M' feature tensor is held for backward.

Numerics are those of the reference: a prefix running max of the keys' log scales, so
output t is bit-for-bit independent of tokens after t. The shifts (running max, features'
row shifts) are constants in the gradient: for each output row they cancel exactly.
"""

from __future__ import annotations

import torch

from ._normalise import exp_diff, masked_keys, normalise
from .bidirectional_fast import FeatFn, _add, _grad, _leaf, _mask_at, _slices
from .state import State

__all__ = ["causal_fast", "DEFAULT_CAUSAL_CHUNK"]

#: tuned on a 2-core CPU (benchmarks/tune_chunk.py): 128 balances the C x C intra-chunk
#: products against the per-chunk state updates and Python overhead
DEFAULT_CAUSAL_CHUNK = 128


def _chunk_terms(fq, kvals, lk, c):
    """The reference's per-chunk quantities: running max, C x C weights, carry factor."""
    n = fq.shape[-2]
    run = torch.maximum(torch.cummax(lk, dim=-1).values, c[..., None])
    tril = torch.ones(n, n, dtype=torch.bool, device=fq.device).tril()
    if bool(torch.isfinite(lk).all()):
        # no padded key in this chunk: run is finite, so a plain exp gives exp_diff's bits in
        # two passes instead of six; entries above the diagonal (future keys, possibly inf)
        # are overwritten with exact zeros
        weights = torch.exp(lk[..., None, :] - run[..., :, None]).masked_fill_(~tril, 0.0)
    else:
        weights = exp_diff(lk[..., None, :], run[..., :, None])
        weights = torch.where(tril, weights, torch.zeros_like(weights))
    carry = exp_diff(c[..., None], run)
    return run, weights, carry


def _with_ones(v_c: torch.Tensor) -> torch.Tensor:
    """[V, 1]: numerator and normaliser come out of one matmul."""
    return torch.cat([v_c, v_c.new_ones(*v_c.shape[:-1], 1)], dim=-1)


class _Causal(torch.autograd.Function):
    # the state is held as kvz = [kv, z] (..., M', Dv + 1), split only at the boundary
    @staticmethod
    def forward(ctx, q, k, v, a, mask, kv0, z0, c0, feat, chunk):
        slices = _slices(q.shape[-2], chunk)
        keep = any(ctx.needs_input_grad)
        starts = None  # the state before each chunk, kept only for backward
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        den = q.new_empty(q.shape[:-1])
        kvz = None if kv0 is None else torch.cat([kv0, z0[..., None]], dim=-1)
        c = c0
        for i, sl in enumerate(slices):
            fq = feat(q[..., sl, :], a).values
            kvals, lk = masked_keys(feat(k[..., sl, :], a), _mask_at(mask, sl))
            v1 = _with_ones(v[..., sl, :])
            if kvz is None:  # empty initial state: shapes come from the first chunk
                lead = fq.shape[:-2]
                kvz = fq.new_zeros(*lead, kvals.shape[-1], v1.shape[-1])
                c = fq.new_full(lead, float("-inf"))
            if keep:
                if starts is None:
                    starts = (kvz.new_empty(len(slices), *kvz.shape), c.new_empty(len(slices), *c.shape))
                starts[0][i], starts[1][i] = kvz, c
            run, weights, carry = _chunk_terms(fq, kvals, lk, c)
            scores = (fq @ kvals.mT).mul_(weights)
            nd = (scores @ v1).add_((fq @ kvz).mul_(carry[..., None]))
            out[..., sl, :] = normalise(nd[..., :-1], nd[..., -1], None)
            den[..., sl] = nd[..., -1]
            new_c = run[..., -1]
            k_w = kvals.mul_(exp_diff(lk, new_c[..., None])[..., None])
            kvz = (kvz * exp_diff(c, new_c)[..., None, None]).add_(k_w.mT @ v1)
            c = new_c
        ctx.feat, ctx.slices = feat, slices
        if starts is None:
            starts = (None, None)
        ctx.save_for_backward(q, k, v, a, mask, out, den, *starts)
        ctx.mark_non_differentiable(c)
        return out, kvz[..., :-1].contiguous(), kvz[..., -1].contiguous(), c

    @staticmethod
    def backward(ctx, g, g_kv, g_z, _g_c):
        q, k, v, a, mask, out, den, kvz_s, c_s = ctx.saved_tensors
        feat, slices = ctx.feat, ctx.slices
        need_q, need_k, need_v, need_a = ctx.needs_input_grad[:4]
        dq = torch.zeros_like(q) if need_q else None
        dk = torch.zeros_like(k) if need_k else None
        dv = torch.zeros_like(v) if need_v else None
        da = None
        a_leaf = _leaf(a, need_a)
        vjp = getattr(feat, "vjp", None) if not need_a else None
        last = kvz_s[-1]
        # gradient of the state after the current chunk (from later chunks or return_state)
        dkvz = torch.zeros_like(last)
        if g_kv is not None:
            dkvz[..., :-1] = g_kv
        if g_z is not None:
            dkvz[..., -1] = g_z
        for i in reversed(range(len(slices))):
            sl, kvz, c = slices[i], kvz_s[i], c_s[i]
            v_c = v[..., sl, :]
            v1 = _with_ones(v_c)
            if vjp is not None:  # hand-written feature gradient, no graph
                qc, kc = q[..., sl, :], k[..., sl, :]
                fq = feat(qc, a).values
                fk = feat(kc, a)
                kvals, lk = masked_keys(fk, _mask_at(mask, sl))
            else:
                with torch.enable_grad():
                    qc = _leaf(q[..., sl, :], need_q)
                    kc = _leaf(k[..., sl, :], need_k)
                    fq = feat(qc, a_leaf).values
                    kvals, lk = masked_keys(feat(kc, a_leaf), _mask_at(mask, sl))
            fq_d, kv_d, lk_d = fq.detach(), kvals.detach(), lk.detach()
            run, weights, carry = _chunk_terms(fq_d, kv_d, lk_d, c)
            scores = (fq_d @ kv_d.mT).mul_(weights)
            d = den[..., sl]
            inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))
            g_c = g[..., sl, :]
            dnum = g_c * inv[..., None]
            dden = -(g_c * out[..., sl, :]).sum(-1) * inv
            dnd = torch.cat([dnum, dden[..., None]], dim=-1)  # (.., C, Dv + 1)
            # intra-chunk: scores = (fq kvals^T) * weights, weights = exp(lk_i - run_t)
            dscores = dnd @ v1.mT
            draw = dscores * weights
            dlk = (dscores.mul_(scores)).sum(-2)
            dv_c = scores.mT @ dnum
            dnd_c = dnd.mul_(carry[..., None])
            dfq = (draw @ kv_d).add_(dnd_c @ kvz.mT)
            dkvals = draw.mT @ fq_d
            # the state update kvz' = kvz * decay + (kvals * e)^T [v, 1]
            new_c = run[..., -1]
            e = exp_diff(lk_d, new_c[..., None])
            k_w = kv_d * e[..., None]
            dk_w = v1 @ dkvz.mT
            dv_c = dv_c.add_(k_w @ dkvz[..., :-1])
            dkvals = dkvals.add_(dk_w * e[..., None])
            dlk = dlk.add_((dk_w * k_w).sum(-1))
            decay = exp_diff(c, new_c)
            dkvz = (dkvz * decay[..., None, None]).add_(fq_d.mT @ dnd_c)
            if need_v:
                dv[..., sl, :] = dv_c
            if vjp is not None:
                # masked keys have zero weight, so dkvals and dlk vanish on them already
                if need_q:
                    dq[..., sl, :] = vjp(qc, fq_d, dfq, None)
                if need_k:
                    dk[..., sl, :] = vjp(kc, fk.values, dkvals, dlk)
            elif need_q or need_k or need_a:
                gq, gk, ga = _grad([fq, kvals, lk], [qc, kc, a_leaf], [dfq, dkvals, dlk])
                if gq is not None:
                    dq[..., sl, :] = gq
                if gk is not None:
                    dk[..., sl, :] = gk
                da = _add(da, ga)
        if need_a and da is None:
            da = torch.zeros_like(a)
        d_kv0 = dkvz[..., :-1] if ctx.needs_input_grad[5] else None
        d_z0 = dkvz[..., -1] if ctx.needs_input_grad[6] else None
        return dq, dk, dv, da, None, d_kv0, d_z0, None, None, None


def causal_fast(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feat: FeatFn,
    *,
    a: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    state: State | None = None,
    chunk_size: int = DEFAULT_CAUSAL_CHUNK,
) -> tuple[torch.Tensor, State]:
    """Already-scaled q, k (..., L, D), v (..., L, Dv), equal leading shapes, L >= 1 ->
    (out (..., L, Dv), state after position L-1); ``feat(x, a)`` gives row-wise Features."""
    kv0, z0, c0 = (None, None, None) if state is None else state
    out, kv, z, c = _Causal.apply(q, k, v, a, key_padding_mask, kv0, z0, c0, feat, chunk_size)
    return out, State(kv, z, c)
