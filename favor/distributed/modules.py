"""Running a model's causal FavorAttention layers sequence-parallel.

``sequence_parallel(model, group=...)`` is a context manager: inside it every causal
FavorAttention of ``model`` computes ``sequence_parallel_attention`` over ``group`` instead
of single-process attention (the parameters, buffers and state_dict are untouched; on exit
the layers are as before). ``sequence_parallel_forward(model, idx, offset=...)`` runs a
PerformerLM on this rank's slice of tokens, whose first token sits at ``offset`` in the
full sequence (rotary or learned positions count from there).

Implementation note: FavorAttention dispatches on its ``attention`` name through the
``favor.nn.ATTENTIONS`` table; the context registers one more entry there while it is
active and points the layers at it. Positions reach the layers the way recurrent decoding
passes them, as an ``AttentionState(position=offset)`` per layer.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..nn.attention import ATTENTIONS, AttentionState, FavorAttention
from .sequence import sequence_parallel_attention

__all__ = ["sequence_parallel", "sequence_parallel_forward", "SEQUENCE_PARALLEL_ATTENTION"]

#: the ATTENTIONS entry active inside ``sequence_parallel``
SEQUENCE_PARALLEL_ATTENTION = "favor_sequence_parallel"
_GROUP_ATTR = "_favor_sequence_parallel_group"
_lock = threading.Lock()
_active = 0


def _sp_attention(module: FavorAttention, q, k, v, mask, state, stateful):
    out = sequence_parallel_attention(
        q,
        k,
        v,
        module.feature_map,
        group=getattr(module, _GROUP_ATTR),
        chunk_size=module.chunk_size,
        key_padding_mask=mask,
    )
    if module.dropout and module.training:  # FavorAttention applies this for "favor" only
        out = F.dropout(out, module.dropout, True)
    # stateful calls (used to pass the position offset) expect a (keys, values) pair for
    # attentions other than "favor"; sequence-parallel keeps no cache
    return out, ((None, None) if stateful else None)


def _layers(model: nn.Module) -> list[FavorAttention]:
    layers = [m for m in model.modules() if isinstance(m, FavorAttention)]
    if not layers:
        raise ValueError(f"model has no FavorAttention layer ({type(model).__name__})")
    for m in layers:
        if not m.causal or m.attention != "favor":
            raise ValueError(
                f"sequence parallelism splits causal FAVOR attention; a layer has causal={m.causal}, "
                f"attention={m.attention!r}"
            )
        if m.exact is not None:
            raise ValueError(
                f"sequence parallelism does not yet split attention with exact terms ({m.exact}): a rank's "
                "first queries need the previous rank's last keys exactly; run this model on one process"
            )
    return layers


@contextlib.contextmanager
def sequence_parallel(model: nn.Module, *, group: dist.ProcessGroup | None = None) -> Iterator[nn.Module]:
    """Inside the block, the causal FavorAttention layers of ``model`` attend across the
    ranks of ``group`` (each rank passes its own contiguous slice of the sequence)."""
    global _active
    layers = _layers(model)
    with _lock:
        ATTENTIONS[SEQUENCE_PARALLEL_ATTENTION] = _sp_attention
        _active += 1
    for m in layers:
        setattr(m, _GROUP_ATTR, group)
        m.attention = SEQUENCE_PARALLEL_ATTENTION
    try:
        yield model
    finally:
        for m in layers:
            m.attention = "favor"
            delattr(m, _GROUP_ATTR)
        with _lock:
            _active -= 1
            if _active == 0:
                ATTENTIONS.pop(SEQUENCE_PARALLEL_ATTENTION, None)


def sequence_parallel_forward(
    model: nn.Module, idx: torch.Tensor, *, offset: int, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Logits (B, L_r, vocab) of a PerformerLM for this rank's tokens ``idx`` (B, L_r),
    which start at position ``offset`` of the full sequence (see ``shard_sequence``)."""
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    depth = getattr(getattr(model, "config", None), "depth", None)
    if depth is None:
        raise TypeError(f"model must be a PerformerLM (with .config.depth), got {type(model).__name__}")
    with sequence_parallel(model, group=group):
        logits, _ = model(idx, state=[AttentionState(offset) for _ in range(depth)])
    return logits
