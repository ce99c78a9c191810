"""ExactTerms: which keys of each query get their exact softmax weight.

Causal (query t): positions max(0, floor(t / C) C - W) .. t, plus the first S tokens.
Bidirectional (query t): floor(t / C) C - W .. floor(t / C) C + C - 1 + W, plus the first S.
C = 1 is a window of W keys either side (causal: the last W + 1 positions); C = W = 64 is
LoLCATs' "own block plus the previous one". FAVOR estimates every other key's weight and one
normaliser covers both parts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["ExactTerms", "exact_mask"]


@dataclass(frozen=True)
class ExactTerms:
    """``window`` W >= 0 keys either side (causal: before), ``sinks`` S >= 0 first tokens,
    ``block`` C >= 1 positions sharing one exact set."""

    window: int
    sinks: int = 0
    block: int = 1

    def __post_init__(self) -> None:
        for name, low in (("window", 0), ("sinks", 0), ("block", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"ExactTerms.{name} must be an int >= {low}, got {value!r}")

    def start(self, t: torch.Tensor) -> torch.Tensor:
        """The first exact neighbour of query t (may be negative)."""
        return torch.div(t, self.block, rounding_mode="floor") * self.block - self.window

    def lag(self, chunk: int) -> int:
        """Positions, a multiple of ``chunk``, by which the causal far state trails a chunk's
        first query (chunk a multiple of C): keys before it are far for every query of the chunk."""
        return -(-self.window // chunk) * chunk

    def ring(self) -> int:
        """Keys a causal decoder keeps exactly beside the sinks: up to C - 1 + W + 1."""
        return self.block + self.window

    @classmethod
    def coerce(cls, value) -> ExactTerms | None:
        """None, an ExactTerms, a dict of its fields or a (window, sinks, block) sequence."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls(**value)
        if isinstance(value, (tuple, list)):
            return cls(*value)
        raise TypeError(f"exact must be an ExactTerms, a dict or (window, sinks, block), got {type(value).__name__}")


def exact_mask(length: int, terms: ExactTerms, *, causal: bool, device=None) -> torch.Tensor:
    """(L, L) bool: True where key j's weight for query i is exact (the references' set);
    causal sets stop at the query."""
    i = torch.arange(length, device=device)
    start = terms.start(i)
    if causal:
        stop = i + 1
    else:
        stop = start + terms.block + 2 * terms.window
    near = (i[None, :] >= start[:, None]) & (i[None, :] < stop[:, None])
    near = near | (i[None, :] < terms.sinks)
    return near & (i[None, :] <= i[:, None]) if causal else near
