"""Python facts about small buffers, read from the device once per change, not per call.

Whether FAVOR++'s rho is fixed (not NaN) or an adapter is calibrated decides which code
runs, so it must reach the host. On a GPU, ``bool(tensor)`` waits for every queued kernel,
and attention asks on every call of every layer. The answer is kept with the buffer object
and its version counter (bumped by every in-place write: ``fill_``, ``copy_``,
``load_state_dict``), so it is recomputed, with one host sync, only when the buffer changes
or is replaced (``module.to(device)``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["buffer_flag", "buffer_derived"]


def buffer_flag(
    owner: object, name: str, buffer: torch.Tensor, predicate: Callable[[torch.Tensor], torch.Tensor]
) -> bool:
    """``bool(predicate(buffer))``, cached on ``owner`` under ``name`` per buffer version."""
    try:
        version = buffer._version
    except RuntimeError:  # inference-mode tensors keep no version counter: ask every time
        return bool(predicate(buffer))  # host sync (uncacheable)
    cache = owner.__dict__.setdefault("_buffer_flags", {})
    hit = cache.get(name)
    # the cache holds the buffer itself, so "is" cannot be fooled by a reused address
    if hit is not None and hit[0] is buffer and hit[1] == version:
        return hit[2]
    value = bool(predicate(buffer))  # host sync: once per change of the buffer
    cache[name] = (buffer, version, value)
    return value


def buffer_derived(
    owner: object,
    name: object,
    buffers: tuple[torch.Tensor, ...],
    compute: Callable[[], object],
    *,
    graph_free: bool = False,
) -> object:
    """``compute()``, a value made from ``buffers`` only, cached on ``owner`` under ``name``
    until one of them changes (version or object) or needs a gradient. A decoding step runs
    a few dozen tiny ops per layer, and remaking such constants was a tenth of them.
    ``graph_free``: the caller has checked that grad and inference mode are both off, so
    no graph is recorded and the buffers' ``requires_grad`` need not be asked (per layer
    and token, ten tensor reads fewer; a value cached so is one compute() gives there)."""
    # called per layer and decoding token: list comprehensions and one tuple comparison
    # (the identities and versions together), no generators
    if not graph_free and (torch.is_inference_mode_enabled() or True in [b.requires_grad for b in buffers]):
        return compute()  # a cached inference tensor could not enter autograd later; a gradient needs the graph
    try:
        # the cache holds the buffers themselves, so an id cannot be reused while it stands
        key = (*map(id, buffers), *[b._version for b in buffers])
    except RuntimeError:  # inference-mode buffers keep no version counter
        return compute()
    cache = owner.__dict__.get("_buffer_derived")
    if cache is None:
        cache = owner.__dict__["_buffer_derived"] = {}
    hit = cache.get(name)
    if hit is not None and hit[1] == key:
        return hit[2]
    value = compute()
    cache[name] = (buffers, key, value)
    return value
