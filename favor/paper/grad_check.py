"""The gradient of a favor model's task loss through its fast attention paths against the
explicit L x L kernelised reference with the same features (``kernel_attention``): the
books diagnosis's check that FAVOR's plateau is not a wrong gradient."""

from __future__ import annotations

import torch

from favor.nn import attention as A
from favor.ops.reference import kernel_attention


def reference_grad_error(model, task, batch) -> float:
    """max |g_fast - g_ref| / max |g_ref| over all parameters for one ``task.loss`` of
    ``batch``; the reference swaps favor.nn's "favor" attention for the explicit kernel only
    for the second backward (restored after)."""

    def grads():
        model.zero_grad()
        task.loss(model, batch).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    fast = grads()
    orig = A.ATTENTIONS["favor"]
    A.ATTENTIONS["favor"] = lambda mod, q, k, v, mask, state, stateful: (
        kernel_attention(q, k, v, mod.feature_map, key_padding_mask=mask),
        None,
    )
    try:
        ref = grads()
    finally:
        A.ATTENTIONS["favor"] = orig
    if not ref.abs().max() > 0:
        raise ValueError("the reference gradient is all zero: nothing to compare")
    return float((fast - ref).abs().max() / ref.abs().max())
