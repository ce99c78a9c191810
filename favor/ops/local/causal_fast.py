"""Causal FAVOR with exact local terms, chunked, linear in L.

Query t takes exact weights exp(q_t.k_j + log_const) for its exact set (spec.py: positions
floor(t / C) C - W .. t and the first S tokens) and FAVOR's phi(q_t).phi(k_j) for every other
key j <= t, under one normaliser. Nothing is subtracted: the far sums hold only far keys.

Queries go in chunks of T positions (T a multiple of C). Every key more than ``lag``
(= ceil(W / T) T) positions before a chunk's first query is far for the whole chunk, so it
lives in the chunk's state, a prefix sum of phi(k) [v, 1] that trails the chunk by ``lag``.
The chunk meets the rest, its span of lag + T keys, as dense (T x span) products: exact
logits where the key is in the set, feature products where it is far. Sinks before the span
are S extra columns; the state never holds a sink.

Scales: every term of row t is taken relative to the query's feature log scale and then to
one row shift r_t (the max over the row's terms: exact logits, far keys' log scales, the
state's running max), so nothing overflows and the shift cancels in the output. All maxima
run over the prefix only: output t is bit-for-bit independent of tokens after t.

``_CausalExact``'s backward walks the groups of BLOCK_CHUNKS chunks in reverse and
differentiates each group's forward intermediates (a group is a few hundred rows). When all
groups' intermediates take at most KEEP_BYTES the forward keeps them (no second forward);
else it keeps only the far state at the start of every group and the backward recomputes
each group's forward, so no L x anything graph or feature tensor is held.
``causal_exact_autograd`` is the same loop under autograd (any map, also a trained
projection); window.py and reference.py hold the slower and quadratic references.

Legend: T chunk, n chunks in a group, R = n T rows, span = lag + T keys, M' features,
E = Dv + 1 (V with a column of ones), S' = min(S, L) sinks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..chunking import inverse, ones_column
from ..normalise import exp_diff, normalise
from .spec import ExactTerms

__all__ = ["causal_exact_fast", "causal_exact_autograd", "Geometry", "DEFAULT_CHUNK", "BLOCK_CHUNKS", "KEEP_BYTES"]

#: queries per chunk (rounded up to a multiple of C); the span products cost O(lag + T) per query
DEFAULT_CHUNK = 64
#: chunks per group: the backward differentiates one group of R = BLOCK_CHUNKS * T rows at a time
BLOCK_CHUNKS = 8
#: the forward keeps every group's intermediates for the backward when they take at most
#: this many bytes in all (estimated from the first group); above it the backward recomputes
#: each group's forward (one more forward pass, memory O(R (lag + T)) instead of O(L (lag + T))).
#: At L = 8,192, 2 heads of 32, W = 64, M = 111 (favor paper long-proteins) a call keeps
#: ~50 MB and its forward + backward takes ~0.65x the time of recomputing
KEEP_BYTES = 256 * 2**20

NEG_INF = float("-inf")


class Geometry:
    """The chunking of one call: chunk T, lag, span and the masks of a chunk's (T, span)
    products relative to its first query (the same for every chunk: T is a multiple of C)."""

    def __init__(self, terms: ExactTerms, length: int, chunk: int = DEFAULT_CHUNK, device=None) -> None:
        c = terms.block
        chunk = max(1, min(chunk, length))
        self.terms = terms
        self.chunk = t = c * -(-chunk // c)
        self.lag = terms.lag(t)
        self.span = self.lag + t
        a = torch.arange(t, device=device)[:, None]  # query offset in its chunk
        j = torch.arange(self.span, device=device)[None, :] - self.lag  # key offset from the chunk start
        start = terms.start(a)
        self.causal = j <= a
        self.exact = (j >= start) & self.causal
        self.far = j < start
        # far keys lie in the span's first lag + T - C - W columns (query T - 1's exact set starts
        # at T - C - W): when that is at most T, the far products take one chunk's keys (the
        # short form: 8x fewer for W = 512, T = 64); else, when T <= C + W, the chunk's own keys
        # are all exact or in the future (the first lag columns); else the whole span
        need = self.lag + t - c - terms.window
        self.far_cols = t if need <= t else self.lag if t <= c + terms.window else self.span
        # the same masks as additive biases (0 or -inf), for chunks without padding or sinks
        zero = torch.zeros((), device=device)
        self.exact_bias = torch.where(self.exact, zero, NEG_INF)
        self.far_bias = torch.where(self.far[:, : self.far_cols], zero, NEG_INF)

    def rows(self, length: int) -> int:
        """Rows per group: BLOCK_CHUNKS chunks, fewer for a short sequence."""
        return self.chunk * min(BLOCK_CHUNKS, -(-length // self.chunk))


def _far_log(far_lk: torch.Tensor, geo: Geometry, n: int) -> torch.Tensor:
    """(..., n, fc): each chunk's far-span keys' log scales (sinks and padding -inf)."""
    if far_lk.shape[-1] == n * geo.chunk:  # the short form: far span = the chunk's own lagged rows
        return far_lk.unflatten(-1, (n, geo.chunk))
    return _spans(far_lk[..., None], geo)[..., 0][..., : geo.far_cols]


def _take(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows start .. stop - 1 of x (..., L, X), zero rows outside [0, L)."""
    length = x.shape[-2]
    got = x[..., max(start, 0) : min(stop, length), :]
    before, after = max(0, -start), max(0, stop - length)
    if before or after:
        got = F.pad(got, (0, 0, before, after))
    return got


def _take_valid(valid: torch.Tensor | None, length: int, start: int, stop: int, device) -> torch.Tensor:
    """Which of rows start .. stop - 1 are real keys (inside [0, L), not padding): (..., rows)."""
    pos = torch.arange(start, stop, device=device)
    inside = (pos >= 0) & (pos < length)
    if valid is None:
        return inside
    got = valid[..., max(start, 0) : min(stop, length)]
    return F.pad(got, (max(0, -start), max(0, stop - length)), value=False) & inside


def _spans(x: torch.Tensor, geo: Geometry) -> torch.Tensor:
    """(..., lag + R, X) -> (..., n, span, X): each chunk's keys (a copy-free view)."""
    return x.unfold(-2, geo.span, geo.chunk).transpose(-1, -2)


class _Parts:
    """A group's forward intermediates (``_parts``): what the output needs and what the
    hand-written backward re-reads."""

    def nbytes(self) -> int:
        """Bytes of the tensors it holds (a view counts its own size: an upper estimate)."""
        return sum(x.numel() * x.element_size() for x in vars(self).values() if isinstance(x, torch.Tensor))


def _parts(
    feat,
    a,
    geo: Geometry,
    log_const,
    root,
    q,
    qx,
    k,
    kx,
    v,
    kvalid,
    pos0,
    sinks,
    kvz,
    c,
    *,
    length: int,
    masked=True,
    keep=True,
    outputs=None,
) -> _Parts:
    """One group of n chunks, forward (differentiable where its inputs are: the autograd path).

    q, qx (..., R, .) the group's queries (rows past L are zeros); k, kx, v (..., lag + R, .)
    its keys from pos0 - lag; kvalid (..., lag + R) real keys; ``sinks`` (k, kx, v, valid)
    of the first S' positions or None; kvz (..., M', E), c (...) the far state before the
    group in units of exp(c) (c = -inf: empty). qx, kx None: q * root, k * root.
    ``length`` L of the call (rows past it hold no key); ``masked`` False: no key of the call is padding (the span's masks are then the same for
    every chunk past the sinks); ``keep`` False: the forward only (the exact weights are
    not kept apart from the far ones); ``outputs`` (out (..., R, Dv), normaliser (..., R)):
    the group's outputs as the forward computed them, not recomputed. Without autograd the
    (T x span) passes run in place."""
    p = _Parts()
    p.q, p.k = q, k
    inplace = not torch.is_grad_enabled()
    t, lag, terms = geo.chunk, geo.lag, geo.terms
    rows = q.shape[-2]
    n = rows // t
    p.n = n
    p.qx = q * root if qx is None else qx
    p.kx = k * root if kx is None else kx
    # with a far span of one chunk (fc = T) the far keys and the lagged keys are the group's
    # first R key rows: their features alone are made, as one (..., R, M') block whose chunks
    # are views (the last lag rows only enter the exact logits, through kx)
    p.short = short = geo.far_cols == t
    k_feat = k[..., :rows, :] if short else k
    fq, fk = feat(q, a), feat(k_feat, a)
    p.k_feat = k_feat
    p.fq = fq.values
    qv = p.qv = fq.values.unflatten(-2, (n, t))  # (..., n, T, M')
    lq = fq.log_scale if fq.log_scale is not None else qv.new_zeros(q.shape[:-1])
    lq = lq.expand(q.shape[:-1]).unflatten(-1, (n, t))
    fvalid = kvalid[..., : k_feat.shape[-2]]
    lk = fk.log_scale if fk.log_scale is not None else k_feat.new_zeros(k_feat.shape[:-1])
    lk = lk.masked_fill(~fvalid, NEG_INF)
    kvals = fk.values
    if masked or pos0 - lag < 0 or pos0 + rows > length:  # rows that hold no key: zero features
        kvals = kvals.masked_fill_(~fvalid[..., None], 0.0) if inplace else kvals.masked_fill(~fvalid[..., None], 0.0)
    p.kvals = kvals
    pos = torch.arange(pos0 - lag, pos0 + rows, device=q.device)
    sink_key = pos < terms.sinks
    far_lk = lk.masked_fill(sink_key[: k_feat.shape[-2]], NEG_INF)  # the state and far products skip sinks
    if isinstance(log_const, torch.Tensor):
        log_const = log_const[..., None]  # (..., 1, 1) -> (..., 1, 1, 1): one per chunk too

    # the far state before each chunk: prefix sums of the keys trailing the chunks by lag
    lag_lk = far_lk[..., :rows].unflatten(-1, (n, t))  # (..., n, T)
    after = torch.cummax(torch.maximum(lag_lk.amax(-1), c[..., None]), -1).values.detach()
    before = torch.cat([c[..., None], after[..., :-1]], -1)
    p.e = exp_diff(lag_lk, after[..., None])  # each lagged key's weight in its chunk's summary
    p.v1 = v1 = ones_column(v)
    lag_keys = (kvals[..., :rows, :] * p.e.flatten(-2)[..., None]).unflatten(-2, (n, t))
    sums = lag_keys.mT @ v1[..., :rows, :].unflatten(-2, (n, t))  # (..., n, M', E)
    p.decay = decay = exp_diff(before, after)
    states = []
    for i in range(n):
        states.append(kvz)
        kvz = kvz * decay[..., i, None, None] + sums[..., i, :, :]
    p.states = torch.stack(states, -3)  # (..., n, M', E)
    p.kvz, p.c = kvz, after[..., -1]

    # the span: exact logits and far products, relative to each query's feature scale
    p.qxc = qxc = p.qx.unflatten(-2, (n, t))
    fc = geo.far_cols
    shift = log_const - lq[..., None]  # every term relative to the query's feature scale
    logits = qxc @ _spans(p.kx, geo).mT
    if not masked and pos0 - lag >= terms.sinks:  # no padding, no sink in the span: static masks
        log_exact = logits.add_(shift).add_(geo.exact_bias) if inplace else logits + shift + geo.exact_bias
        log_far = _far_log(far_lk, geo, n)[..., None, :] + geo.far_bias
    else:
        valid = _spans(kvalid[..., None], geo)[..., 0][..., None, :]  # (..., n, 1, span)
        sink_col = _spans(sink_key[:, None], geo)[..., 0][..., None, :]  # (n, 1, span)
        exact = (geo.exact | (sink_col & geo.causal)) & valid
        log_exact = (logits + shift).masked_fill(~exact, NEG_INF)
        far = (geo.far[:, :fc] & ~sink_col[..., :fc]) & valid[..., :fc]
        log_far = torch.where(far, _far_log(far_lk, geo, n)[..., None, :], NEG_INF)
    top = torch.maximum(log_exact.amax(-1), before[..., None])
    if fc:
        top = torch.maximum(top, log_far.amax(-1))
    log_sink = None
    if sinks is not None:
        sk, skx, sv, svalid = sinks
        span_start = pos0 - lag + torch.arange(n, device=q.device) * t  # (n,)
        live = (torch.arange(sk.shape[-2], device=q.device) < span_start[:, None]) & svalid[..., None, :]
        log_sink = (qxc @ skx[..., None, :, :].mT + shift).masked_fill(~live[..., None, :], NEG_INF)
        top = torch.maximum(top, log_sink.amax(-1))
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top)).detach()[..., None]  # (..., n, T, 1)

    p.w_exact = weights = log_exact.sub_(top).exp_() if inplace else torch.exp(log_exact - top)
    if fc:
        # (..., n, fc, M'): with fc = T, chunk i's far keys are the group's key rows i T ..
        # (i + 1) T - 1, a view; else a strided view that the product copies
        far_rows = kvals.unflatten(-2, (n, t)) if short else _spans(kvals, geo)[..., :fc, :]
        p.kv_far = far_rows
        p.e_far = log_far.sub_(top).exp_() if inplace else torch.exp(log_far - top)
        products = qv @ p.kv_far.mT
        p.w_far = products.mul_(p.e_far) if inplace else products * p.e_far
        if inplace and not keep:  # exact and far weights have disjoint supports
            weights[..., :fc].add_(p.w_far)
        elif fc < geo.span:
            weights = torch.cat([weights[..., :fc] + p.w_far, weights[..., fc:]], -1)
        else:
            weights = weights + p.w_far
    p.weights = weights
    p.carry = torch.exp(before[..., None, None] - top)  # (..., n, T, 1); 0 for an empty state
    p.w_sink = None
    if log_sink is not None:
        p.w_sink = torch.exp(log_sink - top)
        p.sv1 = ones_column(sv)
    if outputs is not None:  # the backward's recomputation: the forward kept them
        p.out, p.den = outputs
        return p
    nd = weights @ _spans(v1, geo)  # (..., n, T, E)
    nd = nd + (qv @ p.states) * p.carry
    if log_sink is not None:
        nd = nd + p.w_sink @ p.sv1[..., None, :, :]
    nd = nd.flatten(-3, -2)
    p.den = nd[..., -1]
    p.out = normalise(nd[..., :-1], p.den, None)
    return p


def _overlap_add(x: torch.Tensor, geo: Geometry, width: int, rows: int) -> torch.Tensor:
    """Per-chunk span rows x (..., n, width, X) summed back onto the group's key rows
    (..., rows, X), chunk i's span starting at row i T (the transpose of ``_spans``)."""
    n, t = x.shape[-3], geo.chunk
    out = x.new_zeros(*x.shape[:-3], rows, x.shape[-1])
    for o in range(0, width, t):
        w = min(t, width - o)
        out[..., o : o + n * t, :].unflatten(-2, (n, t))[..., :w, :] += x[..., o : o + w, :]
    return out


def _feature_vjp(feat, x, a, values, d_values, d_log):
    """dL/dx of the features feat(x, a) from dL/dvalues and dL/dlog_scale: the map's own
    ``vjp`` where it has one, else autograd over a recomputation."""
    vjp = getattr(feat, "vjp", None)
    if vjp is not None:
        return vjp(x, a, values, d_values, d_log)
    with torch.enable_grad():
        leaf = x.detach().requires_grad_()
        f = feat(leaf, a)
        outs, grads = [f.values], [d_values]
        if f.log_scale is not None:
            outs.append(f.log_scale.expand(x.shape[:-1]))
            grads.append(d_log)
        return torch.autograd.grad(outs, leaf, grads, allow_unused=True)[0]


def _lc_grad(d_log: torch.Tensor, shape) -> torch.Tensor:
    """d_log (..., n, T, X) summed onto a log_const of ``shape`` (broadcasting against
    (..., 1, 1))."""
    row = d_log.sum((-1, -2, -3))  # (...)
    lead = tuple(shape[:-2]) if len(shape) >= 2 else ()
    return row.sum_to_size(lead).reshape(shape) if lead else row.sum().reshape(shape)


def _group_backward(feat, a, geo: Geometry, p: _Parts, q, k, g_out, d_kvz, sinks, lc_shape):
    """Gradients of one group from its recomputed ``_parts``: g_out (..., R, Dv) of its
    outputs, d_kvz (..., M', E) of the far state after it (None: 0). Returns a dict: q, qx
    (..., R, .), k, kx, v (..., lag + R, .), sk_x, s_v (sinks) and state (the far state
    before the group), lc (the log_const, summed, or None)."""
    n, t = p.n, geo.chunk
    rows = q.shape[-2]
    halo = k.shape[-2]
    inv = inverse(p.den)
    dnum = g_out * inv[..., None]
    dden = -(g_out * p.out).sum(-1) * inv
    dnd = torch.cat([dnum, dden[..., None]], -1).unflatten(-2, (n, t))  # (..., n, T, E)
    v1s = _spans(p.v1, geo)
    d_w = dnd @ v1s.mT  # (..., n, T, span)
    d_v1 = _overlap_add(p.weights.mT @ dnd, geo, geo.span, halo)  # (..., lag + R, E)
    d_read = (p.qv * p.carry).mT @ dnd  # (..., n, M', E): each chunk's read of its state
    d_qv = (dnd @ p.states.mT).mul_(p.carry)  # (..., n, T, M')
    d_log = d_w * p.w_exact  # exact logits
    d_qx = d_log @ _spans(p.kx, geo)
    d_kx = _overlap_add(d_log.mT @ p.qxc, geo, geo.span, halo)
    d_lq = -d_log.sum(-1)
    d_lc = None if lc_shape is None else _lc_grad(d_log, lc_shape)
    d_far_keys = None  # (..., n, T, M') when the far span is one chunk (rows i T .. of the group), else spread
    d_lk = p.kvals.new_zeros(p.kvals.shape[:-1])
    fc = geo.far_cols
    if fc:
        d_wf = d_w[..., :fc]
        d_prod = d_wf * p.e_far
        d_qv = d_qv.add_(d_prod @ p.kv_far)
        d_far_keys = d_prod.mT @ p.qv  # (..., n, fc, M')
        far_log_grad = (d_wf * p.w_far).sum(-2)  # (..., n, fc)
        if p.short:
            d_lk = d_lk.add_(far_log_grad.flatten(-2))
        else:
            d_lk = d_lk.add_(_overlap_add(far_log_grad[..., None], geo, fc, halo)[..., 0])
    out = {}
    if p.w_sink is not None:
        sk, skx, sv, _ = sinks
        d_ws = dnd @ p.sv1[..., None, :, :].mT  # (..., n, T, S')
        out["s_v"] = (p.w_sink.mT @ dnd).sum(-3)[..., :-1]
        d_logs = d_ws * p.w_sink
        d_qx = d_qx.add_(d_logs @ skx[..., None, :, :])
        out["s_kx"] = (d_logs.mT @ p.qxc).sum(-3)
        d_lq = d_lq.sub_(d_logs.sum(-1))
        if lc_shape is not None:
            d_lc = d_lc + _lc_grad(d_logs, lc_shape)
    # the far state, backwards: G after chunk i gives the chunk's summary its gradient
    d_sums = torch.empty_like(d_read)
    grad = torch.zeros_like(p.kvz) if d_kvz is None else d_kvz
    for i in range(n - 1, -1, -1):
        d_sums[..., i, :, :] = grad
        grad = d_read[..., i, :, :] + grad * p.decay[..., i, None, None]
    out["state"] = grad
    kv_lag = p.kvals[..., :rows, :].unflatten(-2, (n, t))
    v1_lag = p.v1[..., :rows, :].unflatten(-2, (n, t))
    e = p.e[..., None]
    d_kv_lag = (v1_lag @ d_sums.mT).mul_(e)  # (..., n, T, M')
    d_v1 = d_v1.add_(F.pad(((kv_lag * e) @ d_sums).flatten(-3, -2), (0, 0, 0, halo - rows)))
    # the key features' rows: the group's first R (short form) or its whole halo
    extra = p.kvals.shape[-2] - rows
    d_lk = d_lk.add_(F.pad((d_kv_lag * kv_lag).sum(-1).flatten(-2), (0, extra)))
    if p.short:  # far and lagged keys on the same R rows: no zero-filled copy
        d_kvals = d_kv_lag if d_far_keys is None else d_kv_lag.add_(d_far_keys)
        d_kvals = d_kvals.flatten(-3, -2)
    else:
        d_kvals = F.pad(d_kv_lag.flatten(-3, -2), (0, 0, 0, extra))
        if d_far_keys is not None:
            d_kvals = d_kvals.add_(_overlap_add(d_far_keys, geo, fc, halo))
    out["q"] = _feature_vjp(feat, q, a, p.fq, d_qv.flatten(-3, -2), d_lq.flatten(-2))
    d_k = _feature_vjp(feat, p.k_feat, a, p.kvals, d_kvals, d_lk)
    out["k"] = F.pad(d_k, (0, 0, 0, halo - d_k.shape[-2]))  # rows past the features: logits only
    out["qx"], out["kx"], out["v"], out["lc"] = d_qx.flatten(-3, -2), d_kx, d_v1[..., :-1], d_lc
    return out


class _Inputs:
    """The group-wise slices of one call's inputs (with zero rows outside the sequence)."""

    def __init__(self, q, k, qx, kx, v, valid, geo: Geometry) -> None:
        self.q, self.k, self.qx, self.kx, self.v, self.valid, self.geo = q, k, qx, kx, v, valid, geo
        self.length = q.shape[-2]
        self.rows = geo.rows(self.length)
        self.groups = -(-self.length // self.rows)
        s = min(geo.terms.sinks, self.length)
        self.n_sinks = s

    def queries(self, g: int):
        s = g * self.rows
        qx = None if self.qx is None else _take(self.qx, s, s + self.rows)
        return _take(self.q, s, s + self.rows), qx

    def keys(self, g: int):
        s = g * self.rows
        lo, hi = s - self.geo.lag, s + self.rows
        kx = None if self.kx is None else _take(self.kx, lo, hi)
        valid = _take_valid(self.valid, self.length, lo, hi, self.q.device)
        return _take(self.k, lo, hi), kx, _take(self.v, lo, hi), valid

    def parts(self, g: int, feat, a, log_const, root, sinks, kvz, c, **kw) -> _Parts:
        """``_parts`` of group g: its queries and keys sliced here, the far state (kvz, c)
        before it given."""
        qg, qxg = self.queries(g)
        kg, kxg, vg, valid = self.keys(g)
        masked = self.valid is not None
        return _parts(
            feat,
            a,
            self.geo,
            log_const,
            root,
            qg,
            qxg,
            kg,
            kxg,
            vg,
            valid,
            g * self.rows,
            sinks,
            kvz,
            c,
            length=self.length,
            masked=masked,
            **kw,
        )

    def sinks(self, root):
        s = self.n_sinks
        if not s:
            return None
        kx = self.k[..., :s, :] * root if self.kx is None else self.kx[..., :s, :]
        valid = _take_valid(self.valid, self.length, 0, s, self.q.device)
        return self.k[..., :s, :], kx, self.v[..., :s, :], valid


def _empty_state(feat, a, q, v):
    m = getattr(feat, "width", None) or feat(q[..., :1, :], a).values.shape[-1]
    lead = q.shape[:-2]
    return q.new_zeros(*lead, m, v.shape[-1] + 1), q.new_full(lead, NEG_INF)


class _CausalExact(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, qx, kx, v, log_const, a, valid, feat, geo, root):
        inp = _Inputs(q, k, qx, kx, v, valid, geo)
        keep = any(ctx.needs_input_grad)
        kvz, c = _empty_state(feat, a, q, v)
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        den = q.new_empty(q.shape[:-1])
        starts = []
        # every group's parts for the backward while they fit KEEP_BYTES (decided on the first)
        parts = [] if keep else None
        sinks = inp.sinks(root)
        for g in range(inp.groups):
            if keep:
                starts.append((kvz, c))
            s = g * inp.rows
            p = inp.parts(g, feat, a, log_const, root, sinks, kvz, c, keep=parts is not None)
            if parts is not None:
                if g == 0 and p.nbytes() * inp.groups > KEEP_BYTES:
                    parts = None
                else:
                    parts.append(p)
            o, kvz, c = p.out, p.kvz, p.c
            take = min(inp.rows, inp.length - s)
            out[..., s : s + take, :] = o[..., :take, :]
            den[..., s : s + take] = p.den[..., :take]
        ctx.feat, ctx.geo, ctx.root, ctx.starts, ctx.parts = feat, geo, root, starts, parts
        ctx.save_for_backward(
            q, k, qx, kx, v, log_const if isinstance(log_const, torch.Tensor) else None, a, valid, out, den
        )
        ctx.log_const = log_const
        return out

    @staticmethod
    def backward(ctx, g_out):
        q, k, qx, kx, v, lc_t, a, valid, out, den = ctx.saved_tensors
        feat, geo, root = ctx.feat, ctx.geo, ctx.root
        log_const = ctx.log_const if lc_t is None else lc_t
        inp = _Inputs(q, k, qx, kx, v, valid, geo)
        need = ctx.needs_input_grad
        length, lag = inp.length, geo.lag
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dqx = None if qx is None else torch.zeros_like(qx)
        dkx = None if kx is None else torch.zeros_like(kx)
        need_lc = lc_t is not None and need[5]
        d_lc = torch.zeros_like(lc_t) if need_lc else None
        sinks = inp.sinks(root)
        d_kvz = None
        for g in reversed(range(inp.groups)):
            s = g * inp.rows
            if ctx.parts is not None:  # the forward's own parts
                p = ctx.parts[g]
            else:  # recomputed from the far state before the group and its kept outputs
                kvz0, c0 = ctx.starts[g]
                kept = (_take(out, s, s + inp.rows), _take(den[..., None], s, s + inp.rows)[..., 0])
                p = inp.parts(g, feat, a, log_const, root, sinks, kvz0, c0, outputs=kept)
            take = min(inp.rows, length - s)
            g_o = g_out.new_zeros(p.out.shape)
            g_o[..., :take, :] = g_out[..., s : s + take, :]
            got = _group_backward(feat, a, geo, p, p.q, p.k, g_o, d_kvz, sinks, lc_t.shape if need_lc else None)
            d_kvz = got["state"]
            lo, hi = max(s - lag, 0), min(s + inp.rows, length)
            off = lo - (s - lag)
            # logit inputs: their own gradients, or folded into q, k (qx = q root)
            gq, gk = got["q"][..., :take, :], got["k"][..., off : off + hi - lo, :]
            gqx, gkx = got["qx"][..., :take, :], got["kx"][..., off : off + hi - lo, :]
            dq[..., s : s + take, :] += gq if qx is not None else gq.add_(gqx, alpha=root)
            dk[..., lo:hi, :] += gk if kx is not None else gk.add_(gkx, alpha=root)
            if dqx is not None:
                dqx[..., s : s + take, :] += gqx
            if dkx is not None:
                dkx[..., lo:hi, :] += gkx
            dv[..., lo:hi, :] += got["v"][..., off : off + hi - lo, :]
            if sinks is not None and "s_kx" in got:
                n_s = inp.n_sinks
                dv[..., :n_s, :] += got["s_v"]
                if dkx is not None:
                    dkx[..., :n_s, :] += got["s_kx"]
                else:
                    dk[..., :n_s, :] += got["s_kx"] * root
            if need_lc:
                d_lc += got["lc"]
        return (
            dq if need[0] else None,
            dk if need[1] else None,
            dqx if need[2] else None,
            dkx if need[3] else None,
            dv if need[4] else None,
            d_lc,
            None,
            None,
            None,
            None,
            None,
        )


def _valid_keys(key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    return None if key_padding_mask is None else ~key_padding_mask


def causal_exact_fast(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feat,
    terms: ExactTerms,
    *,
    root: float,
    qx: torch.Tensor | None = None,
    kx: torch.Tensor | None = None,
    a: torch.Tensor | None = None,
    log_const: torch.Tensor | float = 0.0,
    key_padding_mask: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Causal FAVOR with exact terms, memory-light (module docstring).

    q, k (..., L, D') the features' inputs before sqrt(scale) (``feat(x * root)`` is taken
    by ``feat(x, a)``, favor.attention's row features), v (..., L, Dv), equal leading dims;
    qx, kx (..., L, D): the inputs whose dot products the features estimate, already scaled
    (None: q * root, k * root); ``a`` FAVOR++'s A (a constant) or None; ``log_const`` a float
    or a tensor broadcasting against (..., 1, 1); ``key_padding_mask`` bool broadcasting
    against (..., L), True for padding. Gradients reach q, k, qx, kx, v and a tensor
    log_const. Returns (..., L, Dv)."""
    geo = Geometry(terms, q.shape[-2], chunk_size, q.device)
    return _CausalExact.apply(q, k, qx, kx, v, log_const, a, _valid_keys(key_padding_mask), feat, geo, root)


def causal_exact_autograd(
    q,
    k,
    v,
    feat,
    terms: ExactTerms,
    *,
    root,
    qx=None,
    kx=None,
    a=None,
    log_const=0.0,
    key_padding_mask=None,
    chunk_size: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """The same loop under autograd: any map, gradients also to a projection or A that is
    trained. Holds every group's graph (memory O(L (lag + T))): the reference beside
    ``causal_exact_fast``."""
    geo = Geometry(terms, q.shape[-2], chunk_size, q.device)
    inp = _Inputs(q, k, qx, kx, v, _valid_keys(key_padding_mask), geo)
    kvz, c = _empty_state(feat, a, q, v)
    sinks = inp.sinks(root)
    outs = []
    for g in range(inp.groups):
        p = inp.parts(g, feat, a, log_const, root, sinks, kvz, c)
        kvz, c = p.kvz, p.c
        outs.append(p.out)
    return torch.cat(outs, -2)[..., : inp.length, :]
