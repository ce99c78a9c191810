"""The far gain: a log weight g on FAVOR's estimate of the far keys beside exact terms.

With one normaliser only the ratio of the two parts matters, so far terms x exp(g) is the
exact terms x exp(-g): the ops' ``log_const`` (their exact weights are exp(q.k + log_const))
set to -g. A learnable g lets a model turn down a noisy far estimate and lean on the keys it
sees exactly, as LoLCATs' learned window/linear mixing factors do; favor.hf's adapter has
the same idea as ``far_log_gain``.
"""

from __future__ import annotations

import math

import torch

__all__ = ["far_log_const"]


def far_log_const(
    far_log_gain: torch.Tensor | float | None, lead: tuple[int, ...], *, dtype: torch.dtype, device
) -> torch.Tensor | float:
    """The ``log_const`` (..., 1, 1) of a far gain that broadcasts against the (batch, head)
    dims ``lead`` (a float, or a tensor such as a per-head (H,) parameter); None and 0.0 give
    0.0, today's arithmetic. A tensor keeps its gradient; its values are not read (no host
    sync), so a non-finite tensor is the caller's to avoid."""
    if far_log_gain is None:
        return 0.0
    if isinstance(far_log_gain, torch.Tensor):
        if not far_log_gain.is_floating_point():
            raise TypeError(f"far_log_gain must be a float or a floating-point tensor, got dtype {far_log_gain.dtype}")
        if far_log_gain.device != device:
            raise ValueError(f"far_log_gain is on {far_log_gain.device}, q on {device}")
        try:
            fits = torch.broadcast_shapes(far_log_gain.shape, lead) == tuple(lead)
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"far_log_gain of shape {tuple(far_log_gain.shape)} must broadcast against the (batch, head) "
                f"dims {tuple(lead)} (e.g. one value per head, shape ({lead[-1] if lead else 1},))"
            )
        return -far_log_gain.to(dtype)[..., None, None]
    if isinstance(far_log_gain, bool) or not isinstance(far_log_gain, (int, float)) or not math.isfinite(far_log_gain):
        raise ValueError(f"far_log_gain must be a finite float or a tensor, got {far_log_gain!r}")
    return -float(far_log_gain) if far_log_gain else 0.0
