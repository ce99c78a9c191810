"""Registration of "favor" (and a probe used by performerize) with transformers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import nn

__all__ = ["NAME", "PROBE", "register", "probing"]

#: the attn_implementation name
NAME = "favor"
#: softmax attention that also reports each call's queries and keys (calibration)
PROBE = "favor_probe"

_recorder: Callable | None = None


def _probe_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if _recorder is not None:
        _recorder(module, query, key, value, attention_mask, scaling, is_causal)
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def register() -> None:
    """Make ``attn_implementation="favor"`` known to transformers (idempotent).

    The mask function is transformers' sdpa one: a bool (B, 1, Lq, Lk) mask, or None when the
    pattern is plain causal / no padding, which favor.hf.masks reads back."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from .attention import favor_attention_forward

    for name, fn in ((NAME, favor_attention_forward), (PROBE, _probe_forward)):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, sdpa_mask)


@contextlib.contextmanager
def probing(model: nn.Module, recorder: Callable) -> Iterator[None]:
    """Run ``model`` with softmax attention that calls ``recorder`` on every attention call."""
    global _recorder
    register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(PROBE)
    _recorder = recorder
    try:
        yield
    finally:
        _recorder = None
        model.set_attn_implementation(previous if previous is not None else "sdpa")
