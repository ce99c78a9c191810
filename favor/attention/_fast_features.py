"""Row-wise feature functions for the chunked fast paths, ``feat(x, a) -> Features``.

For the exponential kernels the |x|^2/2 term is the same for every feature of a row, so it
is moved out of ``values`` into ``log_scale``: values = exp(s - max_m s), one fewer pass over
the (rows x M) block. The represented phi(x) = values * exp(log_scale) is the same function
(maps.positive / maps.oprf are the references, tested equal in tests/attention/test_fast_paths.py),
and gradients stay exact: keys are differentiated through values and log_scale, and for
queries the per-row factor cancels in the output, so its gradient is zero either way.
"""

from __future__ import annotations

import math

import torch

from ..features.feature_map import FeatureMap
from ..features.maps import Features

__all__ = ["row_features", "scaled"]


def _positive(w: torch.Tensor):
    log_m = 0.5 * math.log(w.shape[0])

    def feat(x: torch.Tensor, a: torch.Tensor | None = None) -> Features:
        s = x @ w.to(x.dtype).T
        shift = s.detach().amax(-1)
        if torch.is_grad_enabled() and x.requires_grad:
            values = torch.exp(s - shift[..., None])
        else:  # no graph to keep: reuse the block, no extra (rows x M) allocations
            values = s.sub_(shift[..., None]).exp_()
        return Features(values, shift - 0.5 * (x * x).sum(-1) - log_m)

    def vjp(x: torch.Tensor, values: torch.Tensor, d_values: torch.Tensor, d_log_scale: torch.Tensor | None):
        """dL/dx from dL/dvalues and dL/dlog_scale without an autograd graph (the shift is a
        constant): values = exp(x W^T - shift), log_scale = shift - |x|^2/2 - log(M)/2."""
        dx = d_values.mul_(values) @ w.to(x.dtype)
        if d_log_scale is not None:
            dx = dx.sub_(d_log_scale[..., None] * x)
        return dx

    feat.vjp = vjp
    return feat


def _oprf(w: torch.Tensor):
    log_m = 0.5 * math.log(w.shape[0])

    def feat(x: torch.Tensor, a: torch.Tensor) -> Features:
        wx = w.to(x.dtype)
        a = a.to(x.dtype)
        one_minus_4a = 1.0 - 4.0 * a
        # sqrt(1-4A) scales the (rows x D) input rather than the (rows x M) product
        bias = a[..., None, None] * (wx * wx).sum(-1)  # (..., 1, M)
        exponent = (x * torch.sqrt(one_minus_4a)[..., None, None]) @ wx.T
        grad = torch.is_grad_enabled() and (x.requires_grad or a.requires_grad)
        exponent = exponent + bias if grad else exponent.add_(bias)
        shift = exponent.detach().amax(-1)
        values = torch.exp(exponent - shift[..., None]) if grad else exponent.sub_(shift[..., None]).exp_()
        log_const = 0.25 * x.shape[-1] * torch.log(one_minus_4a)[..., None] - log_m
        return Features(values, shift - 0.5 * (x * x).sum(-1) + log_const)

    return feat


_SPECIAL = {"positive": _positive, "oprf": _oprf}


def row_features(feature_map: FeatureMap):
    """The fastest row-wise ``feat(x, a)`` for this map's exact numerics."""
    make = _SPECIAL.get(feature_map.kernel)
    if make is None or feature_map.stabilizer != "exact":
        return feature_map.exact_features
    return make(feature_map.projection)


def scaled(feat, root: float):
    """feat(x * root, a): the attention scale applied chunk by chunk, so that no scaled
    copy of q and k (L x D each) is ever held; gradients carry the factor back."""
    if root == 1.0:
        return feat

    def feat_scaled(x: torch.Tensor, a: torch.Tensor | None = None) -> Features:
        return feat(x * root, a)

    base_vjp = getattr(feat, "vjp", None)
    if base_vjp is not None:

        def vjp(x, values, d_values, d_log_scale):
            return base_vjp(x * root, values, d_values, d_log_scale).mul_(root)

        feat_scaled.vjp = vjp
    return feat_scaled
