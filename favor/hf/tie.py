"""Tying FAVOR's key side per key/value group (grouped-query attention), for decoding.

In a GQA layer (SmolLM2: 9 query heads, 3 key/value heads) the query heads of a group share
their keys, but a key's random features go through each head's adapter: its key shift,
key map and dense-exponential a. Trained per head (``favor distill``), the features differ
per query head, so decoding keeps the far state per query head (favor.ops.local.fused:
9 x M x (Dv + 1) floats per layer, read every token). With the key side tied per group (one
shift, key map and a per group; the query maps and far gains stay per head) a key's features
are the same for every head of its group, and the fused step keeps the far state once per
key/value head (``LeanConstants.shared``): a third of those bytes and of the key's work.

The projection is one per layer already. ``dense_a`` is not trained: tied at calibration
(favor.hf.performerize's ``tie_keys`` pools each group's query and key statistics) or by
``tie_keys_`` before training (which rewrites the projection for the new kappa, so not
after the projection was trained). The key map and shift are trained, and ``tie_keys_``
after every optimiser step (favor.hf.distill, favor.hf.fit) puts each group back on its mean:
projected gradient steps onto the tied set.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapter import ATTRIBUTE, FavorAdapter

__all__ = ["key_groups", "tie_adapter_", "tie_keys_", "keys_tied"]


def key_groups(module: nn.Module) -> int:
    """Query heads per key/value head of an attention module (1 without GQA)."""
    groups = getattr(module, "num_key_value_groups", 1)
    return groups if isinstance(groups, int) and groups >= 1 else 1


def _grouped(t: torch.Tensor, groups: int) -> torch.Tensor:
    return t.reshape(t.shape[0] // groups, groups, *t.shape[1:])


def _tied(t: torch.Tensor, groups: int) -> bool:
    v = _grouped(t.detach(), groups)
    return bool((v == v[:, :1]).all())  # host sync: once per call, off the decoding path


@torch.no_grad()
def tie_adapter_(adapter: FavorAdapter, groups: int) -> None:
    """Each group's mean key shift and key map on every head of the group, in place (the
    tensors may be leaves that require grad: the optimiser keeps them); an untied dense a
    (not trained) likewise, through ``set_dense`` (which rewrites the projection: call it
    before the projection is trained)."""
    if groups <= 1:
        return
    if adapter.heads % groups:
        raise ValueError(f"{adapter.heads} query heads do not split into groups of {groups}")
    for name in ("key_shift", "key_map"):
        t = getattr(adapter, name)
        g = _grouped(t, groups)
        g.copy_(g.mean(1, keepdim=True).expand_as(g))
    if adapter.dense and not _tied(adapter.dense_a, groups):
        a = _grouped(adapter.dense_a, groups).mean(1).repeat_interleave(groups, 0)
        adapter.set_dense(a)


def tie_keys_(model: nn.Module) -> int:
    """``tie_adapter_`` on every performerized attention module of ``model`` with GQA;
    returns how many were tied."""
    n = 0
    for module in model.modules():
        adapter = getattr(module, ATTRIBUTE, None)
        if isinstance(adapter, FavorAdapter) and key_groups(module) > 1:
            tie_adapter_(adapter, key_groups(module))
            n += 1
    return n


def keys_tied(adapter: FavorAdapter, groups: int) -> bool:
    """Whether the adapter's key shift, key map and dense a are the same within each group."""
    names = ("key_shift", "key_map") + (("dense_a",) if adapter.dense else ())
    return groups <= 1 or all(_tied(getattr(adapter, n), groups) for n in names)
