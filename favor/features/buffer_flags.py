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

__all__ = ["buffer_flag"]


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
