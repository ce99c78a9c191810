"""Registration of "favor" (and a probe used by performerize) with transformers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .interface import favor_attention_forward
from .names import NAME, OBSERVE, PROBE
from .refusals import check_keywords

__all__ = ["NAME", "PROBE", "OBSERVE", "register", "probing", "observing"]

_recorder: Callable | None = None
_observer: Callable | None = None


def _probe_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    # a softmax feature FAVOR cannot reproduce is refused before any calibration is measured
    check_keywords(module, kwargs)
    if _recorder is not None:
        _recorder(module, query, key, value, attention_mask, scaling, is_causal)
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def _observe_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    out, weights = favor_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )
    if _observer is not None:
        _observer(module, query, key, value, attention_mask, scaling, is_causal, out)
    return out, weights


def register() -> None:
    """Make ``attn_implementation="favor"`` known to transformers (idempotent).

    The mask function is transformers' sdpa one: a bool (B, 1, Lq, Lk) mask, or None when the
    pattern is plain causal / no padding, which favor.hf.masks reads back."""
    for name, fn in ((NAME, favor_attention_forward), (PROBE, _probe_forward), (OBSERVE, _observe_forward)):
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


@contextlib.contextmanager
def observing(model: nn.Module, observer: Callable) -> Iterator[None]:
    """Run ``model`` with FAVOR attention that calls ``observer(module, q, k, v, mask, scaling,
    is_causal, out)`` after every attention call (``out`` keeps its graph: losses may use it)."""
    global _observer
    register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(OBSERVE)
    _observer = observer
    try:
        yield
    finally:
        _observer = None
        model.set_attn_implementation(previous if previous is not None else NAME)
