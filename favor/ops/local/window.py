"""Exact local terms: FAVOR for the far keys, exact exp(q.k) for each query's nearest keys.

Pretrained encoders put much of each query's attention on a few keys: its neighbours and the
first token (an "attention sink"). Those pairs also have the largest q.k, where the random
features' relative variance, exp(|q + k|^2) - 1, is worst. Here the weights of the keys
within ``window`` positions of the query, and of the first ``sinks`` positions, are computed
exactly, and FAVOR estimates the rest:

    num_i = phi(q_i).(sum_j phi(k_j) v_j) - sum_{j in E(i)} phi(q_i).phi(k_j) v_j + sum_{j in E(i)} exp(s_ij) v_j

and likewise the normaliser with v = 1. The far keys' estimate stays unbiased, and the exact
set E(i) has at most 2 * window + 1 + sinks keys, so time and memory stay linear in length.
With a window covering the whole sequence the output is softmax attention exactly (tested).

Causal attention (``causal=True``) takes the keys i - window .. i and the sinks before them
exactly. Its far sums run over the keys delayed by window + 1 positions with the sinks
removed, so they hold only far keys (nothing is subtracted), with running maxima over the
prefix as in favor.ops.causal: no output depends on a later token.

``log_const`` is log E[phi(q).phi(k)] - q.k for the feature map at hand: 0 for FAVOR+ and
FAVOR++, and a per-head constant for favor.hf's dense-exponential features (adapter.py).

favor.hf's bidirectional layers run ``local_fast.local_fast`` (the same numbers as
``local_exact_attention``, tested against it and against ``local_exact_reference``, with a
hand-written backward); the functions here are its reference and the causal path.

Legend: B batch, H heads, Lq = Lk = L positions, M' features, E exact keys per query.
"""

from __future__ import annotations

import torch

from ...features.feature_map import FeatureMap
from ...features.maps import Features
from ..causal import causal_sums
from ..normalise import exp_diff, masked_keys, max_log_scale, normalise
from ..row_features import row_features
from ..state import State

__all__ = [
    "local_exact_attention",
    "pair_features",
    "check_exact_set",
    "exact_positions",
    "local_exact_reference",
    "explicit_reference",
    "far_sums",
    "combine_parts",
    "parts_sum",
    "query_log_scale",
]


def check_exact_set(window, sinks) -> None:
    """``window`` an int >= -1 (-1: no neighbours), ``sinks`` an int >= 0, or ValueError."""
    for name, value, low in (("exact_window", window, -1), ("exact_sinks", sinks, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def exact_positions(length: int, window: int, sinks: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(index (L, E) long, valid (L, E) bool): the keys whose weight is exact for each query.
    Neighbours i - window .. i + window inside [0, L), then sinks 0 .. sinks-1 not already
    among the neighbours; invalid slots point at key 0 and must be ignored."""
    if window < 0 and sinks <= 0:
        raise ValueError(f"an exact set needs window >= 0 or sinks > 0, got window={window}, sinks={sinks}")
    i = torch.arange(length, device=device)[:, None]
    parts, valid = [], []
    if window >= 0:
        j = i + torch.arange(-window, window + 1, device=device)[None, :]
        parts.append(j)
        valid.append((j >= 0) & (j < length))
    if sinks > 0:
        j = torch.arange(min(sinks, length), device=device)[None, :].expand(length, -1)
        parts.append(j)
        valid.append((i - j).abs() > window if window >= 0 else torch.ones_like(j, dtype=torch.bool))
    index, ok = torch.cat(parts, 1), torch.cat(valid, 1)
    return index.where(ok, torch.zeros_like(index)), ok


def pair_features(
    feature_map: FeatureMap, q: torch.Tensor, k: torch.Tensor, root: float, mask=None, *, causal: bool = False
):
    """Features of q * root and k * root (``mask`` bool (..., L), True for padding: FAVOR++'s
    statistics skip it; ``causal``: no statistic of the sequence is used): the fast paths'
    row features where the map allows (same numbers, fewer passes), else ``FeatureMap.pair``."""
    if feature_map.stabilizer != "exact":
        return feature_map.pair(q * root, k * root, causal=causal, q_mask=mask, k_mask=mask)
    a = None
    if feature_map.kernel == "oprf":
        a = feature_map.oprf_a(q * root, k * root, causal=causal, q_mask=mask, k_mask=mask)
    feat = row_features(feature_map, root)
    return feat(q, a), feat(k, a)


#: queries per block of the banded products: each block meets BLOCK + 2 W keys
BLOCK = 64


class _Band:
    """Banded products between each query and its neighbours i - W .. i + W, in blocks of
    C = max(``BLOCK``, W) queries: per block one GEMM against its own keys and two thin ones
    against the W keys either side (so no padded copy of the (L, M') keys is made unless L
    is not a multiple of C). A band is (..., L, 2W + 1), slot e holding key i + e - W; slots
    beyond either end hold 0."""

    def __init__(self, length: int, window: int) -> None:
        self.length, self.window = length, window
        self.block = min(max(BLOCK, window), length)
        self.blocks = -(-length // self.block)
        self.padded = self.blocks * self.block

    def _queries(self, x: torch.Tensor) -> torch.Tensor:  # (..., L, C) -> (..., nb, block, C)
        if self.padded != self.length:
            x = torch.nn.functional.pad(x, (0, 0, 0, self.padded - self.length))
        return x.reshape(*x.shape[:-2], self.blocks, self.block, x.shape[-1])

    def _keys(self, x: torch.Tensor) -> torch.Tensor:  # (..., L, C) -> (..., nb, C, block + 2W)
        w = self.window
        x = torch.nn.functional.pad(x, (0, 0, w, self.padded - self.length + w))
        return x.unfold(-2, self.block + 2 * w, self.block)

    def products(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a_i . b_j for every query i and neighbour slot, (..., L, 2W + 1); zero off the ends."""
        w, qa, kb = self.window, self._queries(a), self._queries(b)
        parts = [qa @ kb.transpose(-1, -2)]  # (..., nb, block, block): the block's own keys
        if w > 0:
            edge = qa.new_zeros(*qa.shape[:-1], w)  # (..., nb, block, W)
            left, right = edge, edge
            if self.blocks > 1:  # W <= block: the W keys before / after are in the next block over
                before = qa[..., 1:, :, :] @ kb[..., :-1, self.block - w :, :].transpose(-1, -2)
                after = qa[..., :-1, :, :] @ kb[..., 1:, :w, :].transpose(-1, -2)
                left = torch.cat([edge[..., :1, :, :], before], -3)
                right = torch.cat([after, edge[..., :1, :, :]], -3)
            parts = [left, parts[0], right]
        full = torch.cat(parts, -1) if len(parts) > 1 else parts[0]  # (..., nb, block, block + 2W)
        band = torch.stack([torch.diagonal(full, e, -2, -1) for e in range(2 * w + 1)], -1)
        return band.reshape(*band.shape[:-3], self.padded, -1)[..., : self.length, :]

    def weighted_sum(self, coeff: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """sum_e coeff[i, e] v[i + e - W], (..., L, Dv), from a band ``coeff`` (..., L, 2W + 1)."""
        c, w = self.block, self.window
        band = self._queries(coeff)  # (..., nb, block, 2W + 1)
        # skew: row r's slots move to columns r .. r + 2W of a (block, block + 2W) matrix
        skew = torch.nn.functional.pad(band, (0, c)).flatten(-2)[..., : c * (c + 2 * w)]
        skew = skew.reshape(*band.shape[:-2], c, c + 2 * w)
        out = skew @ self._keys(v).transpose(-1, -2)  # (..., nb, block, Dv)
        return out.reshape(*out.shape[:-3], self.padded, -1)[..., : self.length, :]

    def live(self, live_key: torch.Tensor | None, device) -> torch.Tensor:
        """Which slots hold a real key: inside the sequence and not padding, (..., L, 2W + 1)."""
        w, n = self.window, self.length
        inside = torch.ones(1, n, dtype=torch.bool, device=device) if live_key is None else live_key
        inside = torch.nn.functional.pad(inside, (w, w))  # False beyond either end
        return inside.unfold(-1, 2 * w + 1, 1)


def local_exact_attention(
    fq: Features,
    fk: Features,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    sinks: int,
    log_const: torch.Tensor | float = 0.0,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """FAVOR with exact local terms (module docstring), linear in L; ``causal``: query i sees
    keys j <= i only (``_causal``).

    fq, fk: features of the queries and keys (..., L, M'); q, k (..., L, D): the inputs whose
    dot products the features estimate (already scaled); v (..., L, Dv); ``log_const``: a
    float or a tensor broadcasting against (..., 1, 1) (per head); ``key_padding_mask`` bool
    (B, L), True for padding. Returns (..., L, Dv).

    Neighbour terms are banded GEMMs over blocks of queries (``_Band``), so no (L, E, M')
    tensor is formed and the extra work is ~(BLOCK + 2W) / BLOCK GEMMs the size of the core's."""
    length = q.shape[-2]
    if k.shape[-2] != length:
        raise ValueError(f"exact local terms need as many queries as keys, got {length} and {k.shape[-2]}")
    if window < 0 and sinks <= 0:
        raise ValueError(f"exact local terms need window >= 0 or sinks > 0, got window={window}, sinks={sinks}")
    if causal:
        return _causal(fq, fk, q, k, v, window, sinks, log_const, key_padding_mask)
    num_rf, den_rf, ref, weighted = far_sums(fq.values, fk, v, key_padding_mask)
    live_key = None if key_padding_mask is None else ~key_padding_mask[:, None, :]  # (B, 1, L)

    # per exact slot of query i: the features' estimate (the far sum's overcount) and the logit
    rf, logit = [], []  # each (..., L, slots)
    band = _Band(length, window) if window >= 0 else None
    if band is not None:
        rf.append(band.products(fq.values, weighted))
        live = band.live(live_key, q.device)
        logit.append(band.products(q, k).masked_fill(~live, float("-inf")))
    n_sinks = min(sinks, length)
    if n_sinks:
        rf.append(fq.values @ weighted[..., :n_sinks, :].transpose(-1, -2))
        positions = torch.arange(length, device=q.device)[:, None]
        live = (positions - torch.arange(n_sinks, device=q.device)[None, :]).abs() > window  # not a neighbour
        if live_key is not None:
            live = live & live_key[..., None, :n_sinks]
        logit.append((q @ k[..., :n_sinks, :].transpose(-1, -2)).masked_fill(~live, float("-inf")))
    logits = torch.cat(logit, -1)  # (..., L, E)
    rf_near = torch.cat(rf, -1).masked_fill(~torch.isfinite(logits), 0.0)

    parts = []
    if band is not None:
        parts.append((2 * window + 1, lambda c: band.weighted_sum(c, v)))
    if n_sinks:
        parts.append((n_sinks, lambda c: c @ v[..., :n_sinks, :]))
    q_scale = query_log_scale(fq, den_rf)
    return combine_parts(num_rf, den_rf, ref, logits, log_const, q_scale, parts_sum(parts), rf_near)


def far_sums(fq_values: torch.Tensor, fk: Features, v: torch.Tensor, key_padding_mask=None):
    """Bidirectional FAVOR over every key, before the exact keys' estimates are taken out:
    (numerator (..., Lq, Dv), normaliser (..., Lq), ref (..., 1), weighted keys (..., L, M')),
    the first two in units of exp(query log scale + ref), ref one shift per (batch, head) as
    key_summary, the weighted keys phi(k) exp(-ref) with padded rows 0."""
    mask = None if key_padding_mask is None else key_padding_mask[:, None, :]  # (B, 1, L) over heads
    values, log_scale = masked_keys(fk, mask)
    ref = max_log_scale(log_scale)
    weighted = values * exp_diff(log_scale, ref)[..., None]
    kv, z = weighted.transpose(-1, -2) @ v, weighted.sum(-2)
    return fq_values @ kv, (fq_values @ z[..., None])[..., 0], ref, weighted


def combine_parts(far_num, far_den, log_ref, logits, log_const, q_log_scale, near_v_sum, rf_near=None):
    """out = (far + exact) / (far + exact) with both parts on one scale per query.

    far_num (..., L, Dv) and far_den (..., L) are in units of exp(q_log_scale + log_ref);
    logits (..., L, E) (-inf: no exact key there); ``near_v_sum(coeff)`` returns
    sum_e coeff[..., e] v[key of slot e]; ``rf_near`` (..., L, E): the far sums' own
    estimates for the exact keys, to be taken out (bidirectional), or None (causal: the far
    sums never held them)."""
    log_exact = logits + log_const - q_log_scale[..., None] - log_ref[..., None]
    # one more shift per query so that neither part overflows
    top = log_exact.amax(-1).clamp_min(0.0).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    exact = torch.exp(log_exact - top[..., None])  # -inf (no key) -> 0
    far = torch.exp(-top)
    coeff = exact if rf_near is None else exact - far[..., None] * rf_near
    num = far[..., None] * far_num + near_v_sum(coeff)
    den = far * far_den + coeff.sum(-1)
    return normalise(num, den.clamp_min(0.0), None)


def _causal(fq, fk, q, k, v, window, sinks, log_const, key_padding_mask):
    """Causal: exact for keys i - W .. i and the first S tokens, FAVOR for the rest. The far
    sums run over keys delayed by W + 1 positions with the sinks removed, so they hold
    exactly the far keys (nothing to subtract), and every sum stops at the query."""
    length, lag = q.shape[-2], max(window, -1) + 1
    values, log_scale = masked_keys(fk, None if key_padding_mask is None else key_padding_mask[:, None, :])
    n_sinks = min(sinks, length)
    if n_sinks:
        values = torch.cat([values[..., :n_sinks, :] * 0.0, values[..., n_sinks:, :]], -2)
        log_scale = torch.cat([torch.full_like(log_scale[..., :n_sinks], float("-inf")), log_scale[..., n_sinks:]], -1)
    pad = torch.nn.functional.pad
    delayed_v = pad(v, (0, 0, lag, 0))[..., :length, :]
    values = pad(values, (0, 0, lag, 0))[..., :length, :]
    log_scale = pad(log_scale, (lag, 0), value=float("-inf"))[..., :length]
    lead = torch.broadcast_shapes(fq.values.shape[:-2], values.shape[:-2], v.shape[:-2])
    empty = State.empty(lead, values.shape[-1], v.shape[-1], dtype=values.dtype, device=values.device)
    far_num, far_den, run, _ = causal_sums(fq.values, values, log_scale, delayed_v, empty)
    run = torch.where(torch.isfinite(run), run, torch.zeros_like(run))  # no far key yet: sums are 0

    live_key = None if key_padding_mask is None else ~key_padding_mask[:, None, :]  # (B, 1, L)
    logit, parts = [], []
    if window >= 0:
        band = _Band(length, window)
        before = torch.arange(2 * window + 1, device=q.device) <= window  # slots at or before the query
        live = band.live(live_key, q.device) & before
        logit.append(band.products(q, k).masked_fill(~live, float("-inf"))[..., : window + 1])
        parts.append((window + 1, lambda c: band.weighted_sum(pad(c, (0, window)), v)))
    if n_sinks:
        positions = torch.arange(length, device=q.device)[:, None]
        live = positions - torch.arange(n_sinks, device=q.device)[None, :] > window  # in the far range
        if live_key is not None:
            live = live & live_key[..., None, :n_sinks]
        logit.append((q @ k[..., :n_sinks, :].transpose(-1, -2)).masked_fill(~live, float("-inf")))
        parts.append((n_sinks, lambda c: c @ v[..., :n_sinks, :]))

    q_scale = query_log_scale(fq, far_den)
    return combine_parts(far_num, far_den, run, torch.cat(logit, -1), log_const, q_scale, parts_sum(parts))


def parts_sum(parts):
    """``parts``: (width, coeff slice -> (..., L, Dv)) in the order of the exact keys'
    logits -> the ``near_v_sum`` of ``combine_parts``: each part on its slice of coeff, summed."""

    def near_v_sum(coeff):
        out, at = 0.0, 0
        for width, part in parts:
            out = out + part(coeff[..., at : at + width])
            at += width
        return out

    return near_v_sum


def query_log_scale(fq: Features, like: torch.Tensor) -> torch.Tensor:
    """The queries' feature log scale, zeros (shaped as ``like``) where the map has none."""
    return fq.log_scale if fq.log_scale is not None else torch.zeros_like(like)


def local_exact_reference(
    kernel: torch.Tensor,
    logits: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    sinks: int,
    log_const: torch.Tensor | float = 0.0,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """The same, quadratic and explicit: ``kernel`` (..., L, L) the features' estimate of
    exp(s_ij) * exp(log_const), ``logits`` s (..., L, L). For tests."""
    length = logits.shape[-1]
    index, ok = exact_positions(length, window, sinks, device=logits.device)
    near = torch.zeros(length, length, dtype=torch.bool, device=logits.device)
    near[torch.arange(length, device=logits.device)[:, None].expand_as(index)[ok], index[ok]] = True
    return explicit_reference(near, kernel, logits, v, log_const, key_padding_mask, causal=causal)


def explicit_reference(near, kernel, logits, v, log_const=0.0, key_padding_mask=None, *, causal=False):
    """Quadratic attention with the weights exp(s + log_const) where ``near`` (L, L) is True
    and the features' estimate ``kernel`` elsewhere: the tests' reference for any exact set."""
    weights = torch.where(near, torch.exp(logits + log_const), kernel)
    if key_padding_mask is not None:
        weights = weights.masked_fill(key_padding_mask[:, None, None, :], 0.0)
    if causal:
        weights = weights.masked_fill(torch.ones_like(near).triu(1), 0.0)
    num = weights @ v
    return normalise(num, weights.sum(-1), None)
