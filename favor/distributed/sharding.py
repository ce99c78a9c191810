"""Splitting a batch along the sequence: rank r gets the r-th contiguous slice."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .collectives import group_rank_size

__all__ = ["shard_bounds", "shard_sequence"]


def shard_bounds(length: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of rank ``rank``'s slice of ``length`` positions split into ``world``
    contiguous slices as evenly as possible (the first ``length % world`` get one more,
    as torch.tensor_split does)."""
    for name, val in (("length", length), ("world", world), ("rank", rank)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"{name} must be a non-negative int, got {val!r}")
    if world < 1 or rank >= world:
        raise ValueError(f"need 0 <= rank < world with world >= 1, got rank={rank}, world={world}")
    base, extra = divmod(length, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_sequence(
    x: torch.Tensor, *, dim: int = 1, group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, int]:
    """This rank's contiguous slice of ``x`` along ``dim`` (default 1: tokens (B, L)) and
    its start offset in the full sequence (for positions). Without a process group the
    whole tensor and offset 0."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    rank, world = group_rank_size(group)
    start, stop = shard_bounds(x.shape[dim], world, rank)
    return x.narrow(dim, start, stop - start), start
