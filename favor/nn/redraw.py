"""Feature redraw policy: every projection matrix is a function of (seed, layer, step).

Each FeatureMap in ``model.modules()`` order gets index i and is redrawn from a
torch.Generator seeded with mix(seed, i, step), an integer hash (splitmix64) that does not
depend on Python's randomised ``hash``. Every process of a distributed job that calls
``redraw_features(model, seed, step)`` at the same step therefore holds the same matrices
without communicating, and distinct layers never share a draw (unlike a generator seeded
from the input, which gives every layer the same matrix).
"""

from __future__ import annotations

import torch
from torch import nn

from ..features.feature_map import FeatureMap

__all__ = ["mix_seed", "feature_maps", "redraw_features", "FeatureRedrawer"]

_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers, order-sensitive, identical on every machine and process."""
    h = 0x6A09E667F3BCC909
    for p in parts:
        if isinstance(p, bool) or not isinstance(p, int):
            raise TypeError(f"mix_seed takes ints, got {type(p).__name__}")
        h = _splitmix64(h ^ (p & _MASK))
    return h & ((1 << 63) - 1)


def feature_maps(model: nn.Module) -> list[FeatureMap]:
    """The model's FeatureMaps in ``modules()`` order: index i is layer i for redraws."""
    return [m for m in model.modules() if isinstance(m, FeatureMap)]


@torch.no_grad()
def redraw_features(model: nn.Module, seed: int, step: int) -> int:
    """Redraw every random projection in ``model`` from (seed, layer index, step), in place.

    Maps without randomness (elu) or with an explicit matrix are skipped (their index still
    counts, so indices do not shift). Returns the number of matrices redrawn.
    """
    count = 0
    for i, fm in enumerate(feature_maps(model)):
        if fm.projection is None or fm.projection_kind == "explicit":
            continue
        fm.redraw(torch.Generator().manual_seed(mix_seed(seed, i, step)))
        count += 1
    return count


class FeatureRedrawer:
    """Calls ``redraw_features(model, seed, step)`` every ``interval`` optimiser steps.

    ``redrawer.step(step)`` after the optimiser step numbered ``step`` (1-based) redraws when
    ``step % interval == 0``; the matrices depend only on (seed, layer, step), so a resumed
    run redraws exactly as an uninterrupted one. ``interval=None`` or 0 never redraws.
    """

    def __init__(self, model: nn.Module, interval: int | None, seed: int) -> None:
        if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int) or interval < 0):
            raise ValueError(f"interval must be a non-negative int or None, got {interval!r}")
        self.model = model
        self.interval = interval or 0
        self.seed = int(seed)

    def step(self, step: int) -> bool:
        """Redraw if ``step`` is a multiple of the interval; returns whether it did."""
        if self.interval and step > 0 and step % self.interval == 0:
            redraw_features(self.model, self.seed, step)
            return True
        return False
