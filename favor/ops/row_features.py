"""Row-wise feature functions for the chunked fast paths, ``feat(x, a) -> Features``.

For the exponential kernels the |x|^2/2 term is the same for every feature of a row, so it
is moved out of ``values`` into ``log_scale``: values = exp(s - max_m s), one fewer pass over
the (rows x M) block. The exponential is taken as exp2 of s * log2(e), with log2(e) folded
into the (M x D) projection: on CPU torch's exp2 costs ~0.4 ns per float against ~0.9 ns
for exp (AVX-512, measured), and the (rows x M) exponential is FAVOR's largest
non-matmul cost. The attention scale sqrt(scale) is folded into the projection too, so no
scaled copy of q and k (L x D each) is ever made. Values are shifted to a largest feature of 2^HEADROOM, not 1 (see HEADROOM).
The represented phi(x) = values * exp(log_scale) is the same function
(maps.positive / maps.oprf are the references, tested equal in tests/ops/test_fast_paths.py),
and gradients stay exact: keys are differentiated through values and log_scale, and for
queries the per-row factor cancels in the output, so its gradient is zero either way.
"""

from __future__ import annotations

import math

import torch

from ..features.feature_map import FeatureMap
from ..features.maps import Features

__all__ = ["row_features"]

LOG2E = 1.0 / math.log(2.0)
#: each row's values are scaled to a largest feature of 2^HEADROOM (the log scale takes
#: the factor back): a product phi(q).phi(k) of two rows whose dominant features differ
#: would otherwise fall below float32's normal range (2^-126) already at ~e^-88 and make
#: 1/normaliser overflow (tests/ops/test_subnormal_normaliser.py); with 2^32 on
#: either side it stays normal down to ~e^-131, while sums over 2^20 keys of values up to
#: 2^20 stay below 2^112
HEADROOM = 32.0
LN2 = math.log(2.0)


def _base2(w: torch.Tensor, x: torch.Tensor, root: float) -> torch.Tensor:
    """The (M, D) projection times sqrt(scale) * log2(e), in x's dtype (float64 inputs keep
    float64 accuracy): exp(root x.w - shift) = exp2(x.(w root log2 e) - shift log2 e)."""
    return w.to(x.dtype) * (root * LOG2E)


def _square_norm(x: torch.Tensor) -> torch.Tensor:
    """|x|^2 per row without an (rows x D) temporary (no-graph paths only: the norm's
    gradient is undefined at 0)."""
    return torch.linalg.vector_norm(x, dim=-1).square_()


def _with_norm_grad(dx: torch.Tensor, x: torch.Tensor, d_log_scale, half_r2: float) -> torch.Tensor:
    """dx plus the log scale's part: log_scale carries -root^2 |x|^2 / 2 (the shift is a
    constant), so dL/dx gains -d_log_scale * root^2 x."""
    if d_log_scale is None:
        return dx
    return dx.addcmul_(d_log_scale[..., None], x, value=-2.0 * half_r2)


def _positive(w: torch.Tensor, root: float):
    log_m = 0.5 * math.log(w.shape[0])
    half_r2 = 0.5 * root * root

    w2: dict = {}  # the base-2 projection per dtype, made once per call of favor.attention

    def feat(
        x: torch.Tensor, a: torch.Tensor | None = None, *, out: torch.Tensor | None = None, log_scale: bool = True
    ) -> Features:
        if torch.is_grad_enabled() and x.requires_grad:
            s = x @ _base2(w, x, root).T
            shift = s.detach().amax(-1) - HEADROOM
            return Features(torch.exp2(s - shift[..., None]), shift * LN2 - half_r2 * (x * x).sum(-1) - log_m)
        # no graph to keep: the (rows x M) block is computed in place, in ``out`` if given
        wt = w2.get(x.dtype)
        if wt is None:
            wt = w2[x.dtype] = _base2(w, x, root).T
        s = torch.matmul(x, wt, out=out)
        shift = s.amax(-1).sub_(HEADROOM)
        values = s.sub_(shift[..., None]).exp2_()
        if not log_scale:  # a query's per-row factor cancels in its output
            return Features(values, None)
        return Features(values, shift * LN2 - half_r2 * _square_norm(x) - log_m)

    def vjp(x, a, values: torch.Tensor, d_values: torch.Tensor, d_log_scale: torch.Tensor | None):
        """dL/dx from dL/dvalues and dL/dlog_scale without an autograd graph (the shift is a
        constant): values = exp(root x W^T - shift), log_scale = shift - root^2 |x|^2/2 - log(M)/2."""
        return _with_norm_grad(d_values.mul_(values) @ (w.to(x.dtype) * root), x, d_log_scale, half_r2)

    def log2_terms(
        x: torch.Tensor, a: torch.Tensor | None = None, *, out: torch.Tensor | None = None, rows: bool = True
    ):
        """(rows x M) base-2 exponents, no graph: phi(x)_m = 2^t_m * exp(-root^2 |x|^2 / 2) / sqrt(M),
        and with ``rows`` that row factor folded in (phi(x)_m = 2^t_m exactly)."""
        wt = w2.get(x.dtype)
        if wt is None:
            wt = w2[x.dtype] = _base2(w, x, root).T
        t = torch.matmul(x, wt, out=out)
        if rows:
            t.sub_(((half_r2 * _square_norm(x) + log_m) * LOG2E)[..., None])
        return t

    feat.vjp = vjp
    feat.log2_terms = log2_terms
    return feat


def _oprf(w: torch.Tensor, root: float):
    log_m = 0.5 * math.log(w.shape[0])
    half_r2 = 0.5 * root * root

    def constants(x: torch.Tensor, a: torch.Tensor):
        """(w_a, bias, log_const) for A = a: the per-head projection, A |w|^2 and the log
        of the normalising constant, in x's dtype."""
        wx = _base2(w, x, 1.0)
        a = a.to(x.dtype)
        one_minus_4a = 1.0 - 4.0 * a
        # A |w|^2 in base 2 is A |w log2 e|^2 / log2(e)
        bias = (a * LN2)[..., None, None] * (wx * wx).sum(-1)  # (..., 1, M)
        log_const = 0.25 * x.shape[-1] * torch.log(one_minus_4a)[..., None] - log_m
        # root * sqrt(1-4A) scales the projection per head, (..., M, D), not the rows
        w_a = wx * (root * torch.sqrt(one_minus_4a))[..., None, None]
        return w_a, bias, log_const

    # no-graph path: the constants per dtype for the last A seen (the same A for every chunk
    # of a call of favor.attention), kept with A itself and its version so a new or
    # modified A is never served stale ones
    cache: dict = {}

    def cached(x: torch.Tensor, a: torch.Tensor):
        """(w_a, bias, log_const), w_a and bias 3-D per (batch, head) for x's leading dims."""
        lead = x.shape[:-2]
        hit = cache.get((x.dtype, lead))
        if hit is None or hit[0] is not a or hit[1] != a._version:
            w_a, bias, log_const = constants(x, a)
            # 3-D per (batch, head): bias + x w_a^T is then one baddbmm (the GEMM adds it)
            w_a = w_a.expand(*lead, *w_a.shape[-2:]).reshape(-1, *w_a.shape[-2:])
            bias = bias.expand(*lead, *bias.shape[-2:]).reshape(-1, *bias.shape[-2:])
            hit = cache[(x.dtype, lead)] = (a, a._version, w_a, bias, log_const)
        return hit[2:]

    def feat(x: torch.Tensor, a: torch.Tensor, *, out: torch.Tensor | None = None, log_scale: bool = True) -> Features:
        if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad):
            w_a, bias, log_const = constants(x, a)
            exponent = x @ w_a.mT + bias
            shift = exponent.detach().amax(-1) - HEADROOM
            values = torch.exp2(exponent - shift[..., None])
            return Features(values, shift * LN2 - half_r2 * (x * x).sum(-1) + log_const)
        lead, rows = x.shape[:-2], x.shape[-2]
        w_a, bias, log_const = cached(x, a)
        if out is None:
            out = x.new_empty(*lead, rows, w_a.shape[-2])
        torch.baddbmm(bias, x.reshape(-1, rows, x.shape[-1]), w_a.mT, out=out.view(-1, rows, w_a.shape[-2]))
        exponent = out
        shift = exponent.amax(-1).sub_(HEADROOM)
        values = exponent.sub_(shift[..., None]).exp2_()
        if not log_scale:
            return Features(values, None)
        return Features(values, shift * LN2 - half_r2 * _square_norm(x) + log_const)

    def values_grad(x: torch.Tensor, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """The values' part of dL/dx, g = d_values * values: values = exp2(x w_a^T + bias -
        shift), so d values / dx = values ln(2) w_a."""
        w_a = cached(x, a)[0]
        return torch.bmm(g.reshape(-1, x.shape[-2], w_a.shape[-2]), w_a * LN2).view(x.shape)

    def vjp(x: torch.Tensor, a: torch.Tensor, values, d_values: torch.Tensor, d_log_scale: torch.Tensor | None):
        """dL/dx for a constant A (no graph)."""
        return _with_norm_grad(values_grad(x, a, d_values.mul_(values)), x, d_log_scale, half_r2)

    def vjp_a(x: torch.Tensor, a: torch.Tensor, values, d_values: torch.Tensor, d_log_scale: torch.Tensor | None):
        """(dL/dx, dL/dA) when A itself depends on the data. In natural units the exponent is
        E = s root x.w + A |w|^2 with s = sqrt(1 - 4A), and the log scale carries
        (D/4) log(1 - 4A): dE/dA = -2 root x.w / s + |w|^2, and with G = d_values * values
        sum G root x.w = sum x . (G w_a ln 2) / s, the values' part of dx."""
        g = d_values.mul_(values)
        dx = values_grad(x, a, g)
        one_minus_4a = (1.0 - 4.0 * a.to(x.dtype)).expand(x.shape[:-2])
        w_sq = w.to(x.dtype).square().sum(-1)  # (M,)
        da = (-2.0 / one_minus_4a) * (x * dx).sum((-2, -1)) + g.sum(-2) @ w_sq
        if d_log_scale is not None:
            da = da - (x.shape[-1] / one_minus_4a) * d_log_scale.sum(-1)
        return _with_norm_grad(dx, x, d_log_scale, half_r2), da

    def log2_terms(x: torch.Tensor, a: torch.Tensor, *, out: torch.Tensor | None = None, rows: bool = True):
        """As FAVOR+'s ``log2_terms``: phi(x)_m = 2^t_m with ``rows`` (the |x|^2 term and the
        log of the normalising constant folded in), else up to a per-row factor."""
        lead, n_rows = x.shape[:-2], x.shape[-2]
        w_a, bias, log_const = cached(x, a)
        if out is None:
            out = x.new_empty(*lead, n_rows, w_a.shape[-2])
        torch.baddbmm(bias, x.reshape(-1, n_rows, x.shape[-1]), w_a.mT, out=out.view(-1, n_rows, w_a.shape[-2]))
        if rows:
            out.sub_(((half_r2 * _square_norm(x) - log_const) * LOG2E)[..., None])
        return out

    feat.vjp = vjp
    feat.vjp_a = vjp_a
    feat.log2_terms = log2_terms
    return feat


_SPECIAL = {"positive": _positive, "oprf": _oprf}


def row_features(feature_map: FeatureMap, root: float = 1.0):
    """The fastest row-wise ``feat(x, a, out=None)`` of ``x * root`` for this map's exact
    numerics (``root`` = sqrt(scale); gradients carry the factor back). Where set,
    ``feat.width`` is the number of features per row and ``feat`` takes, for the no-graph
    case, ``out=`` (a reusable (rows x width) buffer) and ``log_scale=False`` (values only,
    for queries)."""
    make = _SPECIAL.get(feature_map.kernel)
    if make is not None and feature_map.stabilizer == "exact":
        feat = make(feature_map.projection, root)
        feat.width = feature_map.projection.shape[0]  # features per row: ``out`` may be given
        return feat

    if root == 1.0:
        return feature_map.exact_features

    def feat_scaled(x: torch.Tensor, a: torch.Tensor | None = None) -> Features:
        return feature_map.exact_features(x * root, a)

    return feat_scaled
