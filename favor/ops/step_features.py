"""The row features and FAVOR++'s A of a decoding step, kept beside the feature map from one
token to the next (favor.step, the exact-terms step loop, favor.hf's cached decoding)."""

from __future__ import annotations

import weakref

import torch

from ..features.feature_map import FeatureMap
from .row_features import row_features

__all__ = ["step_features"]


#: per feature map, beside it rather than on it: the module stays picklable (closures are
#: not) and the entry goes when the map does
_STEP_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def step_features(feature_map: FeatureMap, root: float, q1: torch.Tensor, k1: torch.Tensor):
    """(feat, A) for a step: the chunked paths' row features (sqrt(scale) folded into the
    projection) and FAVOR++'s A, remembered on the map from one token to the next. A step
    is a few dozen tiny ops, so rebuilding them (the base-2 projection; for FAVOR++ A and
    its per-head projection) every token was a third of its cost. The key holds every
    buffer's storage and version, so a redraw, a new rho or a move to another device
    rebuilds them."""
    key = (
        feature_map.kernel,
        feature_map.stabilizer,
        root,
        q1.dtype,
        q1.device,
        q1.shape[:-2],
        k1.shape[:-2],
        tuple((b.data_ptr(), b._version) for b in feature_map.buffers()),
    )
    hit = _STEP_CACHE.get(feature_map)
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    feat = row_features(feature_map, root)
    a = feature_map.oprf_a(q1, k1, causal=True) if feature_map.kernel == "oprf" else None
    _STEP_CACHE[feature_map] = (key, feat, a)
    return feat, a
