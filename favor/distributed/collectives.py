"""An autograd-aware all-gather, and a tally of the bytes it moves.

Forward gathers one flat tensor from every rank of a group into (W, N). Its adjoint is a
reduce-scatter: rank j's gradient is the sum over ranks of their gradients for row j. NCCL
(and XCCL) have reduce_scatter; gloo does not, so there the gradient is all-reduced and each
rank keeps its row (twice the traffic of a reduce-scatter, on tensors of a few hundred KB).

Every rank of the group must call the gather in the same order, and, when gradients are
needed, must run backward through it: the backward is a collective too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["all_gather_rows", "CommCounter", "count_communication", "group_rank_size"]

_REDUCE_SCATTER_BACKENDS = ("nccl", "xccl")


@dataclass
class CommCounter:
    """Bytes this process handed to collectives (its own payload: what it contributes),
    and the number of collective calls, split by forward and backward."""

    forward_bytes: int = 0
    forward_calls: int = 0
    backward_bytes: int = 0
    backward_calls: int = 0


_COUNTERS: list[CommCounter] = []


@contextlib.contextmanager
def count_communication() -> Iterator[CommCounter]:
    """Tally the sequence-parallel collectives issued inside the block (this process only)."""
    counter = CommCounter()
    _COUNTERS.append(counter)
    try:
        yield counter
    finally:
        _COUNTERS.remove(counter)


def _tally(backward: bool, nbytes: int) -> None:
    for c in _COUNTERS:
        if backward:
            c.backward_bytes += nbytes
            c.backward_calls += 1
        else:
            c.forward_bytes += nbytes
            c.forward_calls += 1


def group_rank_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank in group, group size); (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group=group), dist.get_world_size(group=group)


def _backend(group) -> str:
    return str(dist.get_backend(group)).lower()


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        world = dist.get_world_size(group=group)
        out = x.new_empty(world, *x.shape)
        dist.all_gather(list(out.unbind(0)), x, group=group)
        _tally(False, x.numel() * x.element_size())
        ctx.group = group
        return out

    @staticmethod
    def backward(ctx, g):
        group = ctx.group
        g = g.contiguous()
        _tally(True, g[0].numel() * g.element_size())
        if _backend(group) in _REDUCE_SCATTER_BACKENDS:
            mine = g.new_empty(g.shape[1:])
            dist.reduce_scatter_tensor(mine, g, group=group)
            return mine, None
        total = g.clone()
        dist.all_reduce(total, group=group)
        return total[dist.get_rank(group=group)], None


def all_gather_rows(x: torch.Tensor, *, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """x (N...) on every rank -> (W, N...), row r from rank r; differentiable (see module doc)."""
    return _AllGatherRows.apply(x, group)
