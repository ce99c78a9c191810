"""Causal FAVOR for training: the chunked algorithm of ``causal.causal_chunked`` (its
reference, tested against it and kernel_attention) with a hand-written backward.

Chunks of C positions are processed in blocks of ``BLOCK_CHUNKS``: inside a block every
chunk's C x C product, chunk summary and state read are one batched matmul each, and only
the (M' x Dv) state recursion across the block's chunks is a Python loop of two small ops
per chunk. Per-op dispatch, not arithmetic, was what held the one-chunk-at-a-time loop to a
third of matmul peak on CPU.

Forward keeps only what backward cannot cheaply redo: the state (kv, z, log scale) at the
start of every block, O(L/(C*BLOCK_CHUNKS) * M' * Dv), plus the output and its normaliser.
Backward walks the blocks in reverse, recomputes each block's features, products and
in-block states, and carries the gradient of the state backwards (in the spirit of SLiM
Performer, Likhosherstov et al. 2020). No L x M' x Dv tensor exists, and no L x M' feature
tensor is held for backward: features live one block at a time.

Numerics are those of the reference: a prefix running max of the keys' log scales (over
earlier chunks and, inside a chunk, over keys up to t), so output t is bit-for-bit
independent of tokens after t (masked entries are exact zeros). The shifts are constants
in the gradient: for each output row they cancel exactly.

Legend: n chunks in a block, C chunk, M' features, E = Dv + 1 (V with a column of ones:
numerator and normaliser come out of one matmul).
"""

from __future__ import annotations

import torch

from . import chunking
from .chunking import FeatFn, Scratch
from .normalise import exp_diff, masked_keys
from .state import State

__all__ = ["causal_fast", "DEFAULT_CAUSAL_CHUNK", "BLOCK_CHUNKS"]

#: tuned on a 2-core CPU (python -m benchmarks.tune_chunk, quiet machine, fwd+bwd at
#: L=16384: C=64 in blocks of 8 994 ms; blocks of 1, the chunk-at-a-time loop, 1430 ms;
#: C=128 in blocks of 4 1119 ms; C=32 in blocks of 8 1120 ms). The C x C intra-chunk
#: products cost O(C) per position, the state reads and updates O(M' * Dv / C)
DEFAULT_CAUSAL_CHUNK = 64
#: chunks per block: features of C * BLOCK_CHUNKS positions are alive at a time
BLOCK_CHUNKS = 8


def _rows(x: torch.Tensor, n: int, c: int, fill: float = 0.0) -> torch.Tensor:
    """(..., R, X) -> (..., n, c, X), rows padded with ``fill`` up to n * c."""
    pad = n * c - x.shape[-2]
    if pad:
        x = torch.cat([x, x.new_full((*x.shape[:-2], pad, x.shape[-1]), fill)], dim=-2)
    return x.unflatten(-2, (n, c))


class _Terms:
    """A block's log-scale bookkeeping, all from prefixes only.

    lk (..., n, C) key log scales, c0 (...) the state's log scale before the block.
    after (..., n): running max after chunk i; before (..., n): before chunk i;
    weights (..., n, C, C): exp(lk_j - run_t) for j <= t, else 0, where run_t is the max
    before the chunk and over its keys up to t; carry (..., n, C): the state's weight at t;
    e (..., n, C): key j's weight in its chunk's summary; decay (..., n): the state's factor
    across chunk i. ``all_finite``: every entry of lk is finite (no padded key or row)."""

    def __init__(self, lk: torch.Tensor, c0: torch.Tensor, *, all_finite: bool) -> None:
        within = torch.cummax(lk, dim=-1).values
        self.after = torch.cummax(torch.maximum(within[..., -1], c0[..., None]), dim=-1).values
        self.before = torch.cat([c0[..., None], self.after[..., :-1]], dim=-1)
        run = torch.maximum(within, self.before[..., None])
        c = lk.shape[-1]
        tril = torch.ones(c, c, dtype=torch.bool, device=lk.device).tril()
        if all_finite:
            # no padded key: run and after are finite (before is -inf only for an empty
            # state, where exp gives the 0 that exp_diff would), so a plain exp gives
            # exp_diff's bits; entries above the diagonal (future keys) become exact zeros.
            # Known from shapes and the mask's presence, not read from lk: bool(tensor)
            # would be a host sync per block on a GPU
            self.weights = torch.exp(lk[..., None, :] - run[..., :, None]).masked_fill_(~tril, 0.0)
            self.e = torch.exp(lk - self.after[..., None])
            self.carry = torch.exp(self.before[..., None] - run)
            self.decay = torch.exp(self.before - self.after)
        else:
            self.weights = torch.where(tril, exp_diff(lk[..., None, :], run[..., :, None]), 0.0)
            self.e = exp_diff(lk, self.after[..., None])
            self.carry = exp_diff(self.before[..., None], run)
            self.decay = exp_diff(self.before, self.after)


def _block_features(feat, q, k, a, mask, sl, grad: bool, leaves, scratch: Scratch):
    """Features of the block's rows; with ``grad`` under autograd from fresh leaves."""
    if not grad:
        fq = scratch.features(feat, q[..., sl, :], a, "fq", log_scale=False).values  # cancels
        fk = scratch.features(feat, k[..., sl, :], a, "fk")
        kvals, lk = masked_keys(fk, chunking.mask_at(mask, sl))
        return fq, fk, kvals, lk
    qb, kb, a_leaf = leaves
    with torch.enable_grad():
        fq = feat(qb, a_leaf).values
        fk = feat(kb, a_leaf)
        kvals, lk = masked_keys(fk, chunking.mask_at(mask, sl))
    return fq, fk, kvals, lk


class _Causal(torch.autograd.Function):
    # the state is held as kvz = [kv, z] (..., M', E), split only at the boundary
    @staticmethod
    def forward(ctx, q, k, v, a, mask, kv0, z0, c0, feat, chunk):
        length, dv = q.shape[-2], v.shape[-1]
        blocks = chunking.slices(length, chunk * BLOCK_CHUNKS)
        keep = any(ctx.needs_input_grad)
        starts = None  # the state before each block, kept only for backward
        out = q.new_empty(*q.shape[:-1], dv)
        den = q.new_empty(q.shape[:-1])
        kvz = None if kv0 is None else torch.cat([kv0, z0[..., None]], dim=-1)
        c = c0
        scratch = Scratch()
        for b, sl in enumerate(blocks):
            fq, _, kvals, lk = _block_features(feat, q, k, a, mask, sl, False, None, scratch)
            if kvz is None:  # empty initial state: shapes come from the first block
                lead = fq.shape[:-2]
                kvz = fq.new_zeros(*lead, kvals.shape[-1], dv + 1)
                c = fq.new_full(lead, float("-inf"))
            if keep:
                if starts is None:
                    starts = (kvz.new_empty(len(blocks), *kvz.shape), c.new_empty(len(blocks), *c.shape))
                starts[0][b], starts[1][b] = kvz, c
            rows = fq.shape[-2]
            n = -(-rows // chunk)
            fq, kvals, v1 = (
                _rows(fq, n, chunk),
                _rows(kvals, n, chunk),
                _rows(chunking.ones_column(v[..., sl, :]), n, chunk),
            )
            lk = _rows(lk[..., None], n, chunk, float("-inf"))[..., 0]
            t = _Terms(lk, c, all_finite=mask is None and rows == n * chunk)
            states, kvz = _scan(kvz, scratch.matmul("summary", kvals.mT, v1 * t.e[..., None]), t.decay, scratch)
            scores = scratch.matmul("scores", fq, kvals.mT).mul_(t.weights)
            nd = chunking.accumulate(scratch.matmul("nd", fq, states).mul_(t.carry[..., None]), scores, v1)
            nd = nd.flatten(-3, -2)[..., :rows, :]
            d = nd[..., -1]
            den[..., sl] = d
            torch.mul(nd[..., :-1], chunking.inverse(d)[..., None], out=out[..., sl, :])
            c = t.after[..., -1]
        ctx.feat, ctx.chunk, ctx.blocks = feat, chunk, blocks
        if starts is None:
            starts = (None, None)
        ctx.save_for_backward(q, k, v, a, mask, out, den, *starts)
        ctx.mark_non_differentiable(c)
        return out, kvz[..., :-1].contiguous(), kvz[..., -1].contiguous(), c

    @staticmethod
    def backward(ctx, g, g_kv, g_z, _g_c):
        q, k, v, a, mask, out, den, kvz_s, c_s = ctx.saved_tensors
        feat, chunk, blocks = ctx.feat, ctx.chunk, ctx.blocks
        need_q, need_k, need_v, need_a = ctx.needs_input_grad[:4]
        # every block writes its rows of the gradients it needs
        dq = torch.empty_like(q) if need_q else None
        dk = torch.empty_like(k) if need_k else None
        dv = torch.empty_like(v) if need_v else None
        da = None
        vjp = getattr(feat, "vjp", None) if not need_a else None
        # gradient of the state after the current block (from later blocks or return_state)
        dkvz = torch.zeros_like(kvz_s[-1])
        if g_kv is not None:
            dkvz[..., :-1] = g_kv
        if g_z is not None:
            dkvz[..., -1] = g_z
        scratch = Scratch()
        for b in reversed(range(len(blocks))):
            sl, kvz, c = blocks[b], kvz_s[b], c_s[b]
            leaves = None
            if vjp is None:
                leaves = (
                    chunking.leaf(q[..., sl, :], need_q),
                    chunking.leaf(k[..., sl, :], need_k),
                    chunking.leaf(a, need_a),
                )
            fq, fk, kvals, lk = _block_features(feat, q, k, a, mask, sl, vjp is None, leaves, scratch)
            rows = fq.shape[-2]
            n = -(-rows // chunk)
            fq_d, kv_d = _rows(fq.detach(), n, chunk), _rows(kvals.detach(), n, chunk)
            lk_d = _rows(lk.detach()[..., None], n, chunk, float("-inf"))[..., 0]
            v_c = _rows(v[..., sl, :], n, chunk)
            v1 = chunking.ones_column(v_c)
            t = _Terms(lk_d, c, all_finite=mask is None and rows == n * chunk)
            v1e = v1 * t.e[..., None]
            states, _ = _scan(kvz, scratch.matmul("summary", kv_d.mT, v1e), t.decay, scratch)
            scores = scratch.matmul("scores", fq_d, kv_d.mT).mul_(t.weights)
            inv = chunking.inverse(den[..., sl])
            g_c = g[..., sl, :]
            dnum = g_c * inv[..., None]
            dden = -(g_c * out[..., sl, :]).sum(-1) * inv
            dnd = _rows(torch.cat([dnum, dden[..., None]], dim=-1), n, chunk)  # (.., n, C, E)
            # intra-chunk: scores = (fq kvals^T) * weights, weights = exp(lk_j - run_t)
            dscores = scratch.matmul("dscores", dnd, v1.mT)
            draw = torch.mul(dscores, t.weights, out=scratch("draw", dscores.shape, dscores))
            dlk = dscores.mul_(scores).sum(-2)
            dv_c = scores.mT @ dnd[..., :-1]
            dnd_c = dnd.mul_(t.carry[..., None])
            dfq = chunking.accumulate(scratch.matmul("dfq", draw, kv_d), dnd_c, states.mT)
            dkvals = scratch.matmul("dkvals", draw.mT, fq_d)
            # the state recursion, backwards: grad[i] is that of the state after chunk i
            grads, dkvz = _scan_back(dkvz, scratch.matmul("reads", fq_d.mT, dnd_c), t.decay, scratch)
            # chunk summaries kvals^T ([v, 1] * e): e scales rows, so it is applied to (C x E)
            # products, never to a (C x M') copy of the features. The log-scale gradient
            # sum_m dkvals_jm kvals_jm = sum_E v1e_jE (kvals grads)_jE needs no C x M' pass
            dkvals = chunking.accumulate(dkvals, v1e, grads.mT)
            kvg = scratch.matmul("kv_grads", kv_d, grads)
            dv_c = dv_c.add_(kvg[..., :-1].mul(t.e[..., None]))
            dlk = dlk.add_(kvg.mul_(v1e).sum(-1))
            dfq, dkvals = dfq.flatten(-3, -2)[..., :rows, :], dkvals.flatten(-3, -2)[..., :rows, :]
            dlk = dlk.flatten(-2, -1)[..., :rows]
            if need_v:
                dv[..., sl, :] = dv_c.flatten(-3, -2)[..., :rows, :]
            if vjp is not None:
                # masked keys have zero weight, so dkvals and dlk vanish on them already
                if need_q:
                    dq[..., sl, :] = vjp(q[..., sl, :], a, fq, dfq, None)
                if need_k:
                    dk[..., sl, :] = vjp(k[..., sl, :], a, fk.values, dkvals, dlk)
            elif need_q or need_k or need_a:
                gq, gk, ga = chunking.grad([fq, kvals, lk], list(leaves), [dfq, dkvals, dlk])
                if need_q:
                    dq[..., sl, :] = 0.0 if gq is None else gq
                if need_k:
                    dk[..., sl, :] = 0.0 if gk is None else gk
                da = chunking.add(da, ga)
        if need_a and da is None:
            da = torch.zeros_like(a)
        d_kv0 = dkvz[..., :-1] if ctx.needs_input_grad[5] else None
        d_z0 = dkvz[..., -1] if ctx.needs_input_grad[6] else None
        return dq, dk, dv, da, None, d_kv0, d_z0, None, None, None


def _scan(kvz: torch.Tensor, sums: torch.Tensor, decay: torch.Tensor, scratch: Scratch):
    """States before each chunk (..., n, M', E) and after the last, from the state before
    the block and the chunk summaries: state_i = state_{i-1} * decay_i + sums_i."""
    states = scratch("states", sums.shape, sums)
    return states, _recur(states, kvz, sums, decay, range(sums.shape[-3]))


def _scan_back(grad: torch.Tensor, reads: torch.Tensor, decay: torch.Tensor, scratch: Scratch):
    """Gradients of the state after each chunk (..., n, M', E) and of the state before the
    block, from the gradient after the block and each chunk's read of its start state."""
    grads = scratch("grads", reads.shape, reads)
    return grads, _recur(grads, grad, reads, decay, range(reads.shape[-3] - 1, -1, -1))


def _recur(out: torch.Tensor, x: torch.Tensor, terms: torch.Tensor, decay: torch.Tensor, order: range):
    """out[i] = x before step i, in ``order``; x <- x * decay[i] + terms[i]. Each step is
    one fused pass written straight into its slot of ``out``; returns the final x."""
    prev = None
    # one unbind each instead of three Python-level index ops per step
    slots, terms, step = out.unbind(-3), terms.unbind(-3), decay[..., None, None].unbind(-3)
    for i in order:
        if prev is None:
            slots[i].copy_(x)
        else:
            torch.addcmul(terms[prev], slots[prev], step[prev], out=slots[i])
        prev = i
    return torch.addcmul(terms[prev], slots[prev], step[prev])


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
    # a chunk longer than the sequence would pad every block to chunk * BLOCK_CHUNKS rows
    # (chunk_size=10**9 on L=5 asked for 192 GB): one chunk of L rows computes the same
    chunk_size = min(chunk_size, q.shape[-2])
    out, kv, z, c = _Causal.apply(q, k, v, a, key_padding_mask, kv0, z0, c0, feat, chunk_size)
    return out, State(kv, z, c)
