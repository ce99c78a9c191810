"""Helpers shared by the chunked fast paths (``bidirectional_fast``, ``causal_fast``,
``recurrent``): chunk slices, reused scratch buffers, GEMM accumulation, a guarded
reciprocal and autograd plumbing. Shared by favor.ops' paths; no attention logic here."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..features.maps import Features

__all__ = [
    "FeatFn",
    "Scratch",
    "slices",
    "mask_at",
    "leaf",
    "grad",
    "add",
    "inverse",
    "ones_column",
    "accumulate",
]

#: ``feat(x, a) -> Features``, row-wise; with ``feat.width`` set it also takes ``out=``
#: (see row_features.row_features)
FeatFn = Callable[..., Features]


def slices(length: int, chunk: int):
    return [slice(s, min(s + chunk, length)) for s in range(0, length, chunk)]


def mask_at(mask: torch.Tensor | None, sl: slice) -> torch.Tensor | None:
    return None if mask is None else mask[..., sl]


def leaf(t: torch.Tensor | None, grad: bool) -> torch.Tensor | None:
    return None if t is None else t.detach().requires_grad_(grad)


def grad(outputs, inputs, grads) -> list:
    """autograd.grad over the pairs that take part; None for inputs that do not."""
    pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if o is not None and o.requires_grad]
    wanted = [i for i in inputs if i is not None and i.requires_grad]
    if not pairs or not wanted:
        return [None] * len(inputs)
    got = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
    return [next(got) if (i is not None and i.requires_grad) else None for i in inputs]


def add(acc, g):
    if g is None:
        return acc
    return g if acc is None else acc + g


class Scratch:
    """Buffers reused from chunk to chunk within one call. A fresh multi-MB tensor per chunk
    is returned to the OS and faulted in again by the next one (glibc's malloc); on a 2-core
    CPU those page faults were 10-25 % of the bidirectional forward."""

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, shape, like: torch.Tensor) -> torch.Tensor:
        buf = self._bufs.get(name)
        if buf is None or buf.shape != tuple(shape):
            buf = self._bufs[name] = like.new_empty(shape)
        return buf

    def zeros(self, name: str, shape, like: torch.Tensor) -> torch.Tensor:
        """A buffer that is all zeros when made (and reused as is): for callers that only
        ever write the same part of it and rely on the rest staying 0."""
        buf = self._bufs.get(name)
        if buf is None or buf.shape != tuple(shape):
            buf = self._bufs[name] = like.new_zeros(shape)
        return buf

    def matmul(self, name: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a @ b into the buffer ``name``."""
        shape = (*torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1])
        return torch.matmul(a, b, out=self(name, shape, a))

    def features(self, feat: FeatFn, x: torch.Tensor, a, name: str = "features", *, log_scale: bool = True) -> Features:
        """feat(x, a), its (rows x M') block in a reused buffer when feat takes one (and
        without the log scale, when not wanted and feat can skip it)."""
        width = getattr(feat, "width", None)
        if width is None:
            return feat(x, a)
        return feat(x, a, out=self(name, (*x.shape[:-1], width), x), log_scale=log_scale)


def inverse(den: torch.Tensor) -> torch.Tensor:
    """1 / den, and 0 where den == 0 (a query with no visible key returns 0, not NaN)."""
    zero = den == 0
    return den.masked_fill(zero, 1.0).reciprocal_().masked_fill_(zero, 0.0)


def ones_column(v: torch.Tensor) -> torch.Tensor:
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def accumulate(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """out += a @ b in the GEMM itself (beta = 1): no temporary, no extra pass."""
    out.view(-1, *out.shape[-2:]).baddbmm_(a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:]))
    return out
