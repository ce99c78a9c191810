"""Input validation shared by every attention entry point: errors name the argument, what
was expected and what came."""

from __future__ import annotations

import math

import torch

from ..features.feature_map import FeatureMap
from .state import State

__all__ = [
    "check_qkv",
    "check_scale",
    "key_mask",
    "compute_dtype",
    "check_chunk_size",
    "check_feature_map",
    "check_state",
]


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if t.ndim < 2:
        raise ValueError(f"{name} must have shape (..., L, D) with at least 2 dims, got shape {tuple(t.shape)}")


def check_qkv(q, k, v, *, causal: bool) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share the head dim D: q (..., Lq, {q.shape[-1]}), k (..., Lk, {k.shape[-1]})")
    if q.shape[-1] == 0:
        raise ValueError("q and k must have a head dim D >= 1, got D=0")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must share the length Lk: k has Lk={k.shape[-2]}, v has Lk={v.shape[-2]}")
    try:
        if not q.shape[:-2] == k.shape[:-2] == v.shape[:-2]:  # (broadcast_shapes costs ~0.1 ms a call)
            torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"leading (batch, head) dims of q {tuple(q.shape[:-2])}, k {tuple(k.shape[:-2])}, "
            f"v {tuple(v.shape[:-2])} do not broadcast"
        ) from None
    if causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(f"causal attention needs Lq == Lk, got q length {q.shape[-2]} and k length {k.shape[-2]}")


def check_feature_map(feature_map) -> None:
    if not isinstance(feature_map, FeatureMap):
        raise TypeError(f"feature_map must be a favor.FeatureMap, got {type(feature_map).__name__}")


def check_scale(scale, d: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float, got {scale!r}")
    return float(scale)


def check_chunk_size(chunk_size, default: int) -> int:
    if chunk_size is None:
        return default
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def key_mask(key_padding_mask, k: torch.Tensor) -> torch.Tensor | None:
    """Validate a key padding mask (True = padding) and shape it to broadcast over k's
    rows: (B, Lk) for k (B, ..., Lk, D), or exactly k.shape[:-1]."""
    if key_padding_mask is None:
        return None
    m = key_padding_mask
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a bool torch.Tensor, got {type(m).__name__}")
    if m.dtype != torch.bool:
        raise TypeError(f"key_padding_mask must have dtype torch.bool (True marks padding), got {m.dtype}")
    if m.device != k.device:
        raise ValueError(f"key_padding_mask is on {m.device} but k is on {k.device}")
    rows = tuple(k.shape[:-1])
    if tuple(m.shape) == rows:
        return m
    if k.ndim >= 3 and tuple(m.shape) == (k.shape[0], k.shape[-2]):
        return m.reshape(k.shape[0], *([1] * (k.ndim - 3)), k.shape[-2])
    expected = f"(B={k.shape[0]}, Lk={k.shape[-2]})" if k.ndim >= 3 else f"(Lk={k.shape[-2]},)"
    raise ValueError(f"key_padding_mask must have shape {expected} or k.shape[:-1]={rows}, got {tuple(m.shape)}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Features, sums and state run in float64 for float64 inputs, else in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_state(state, name: str, lead, m: int, dv: int, device: torch.device) -> None:
    """A favor.State continuing attention over (..., M', Dv) with leading shape ``lead``:
    kv (*lead, M', Dv), z (*lead, M'), log_scale (*lead), on ``device``."""
    if not isinstance(state, State):
        raise TypeError(f"{name} must be a favor.State, got {type(state).__name__}")
    want = (tuple(lead) + (m, dv), tuple(lead) + (m,), tuple(lead))
    got = tuple(tuple(t.shape) for t in state)
    if got != want:
        raise ValueError(f"{name} has shapes kv {got[0]}, z {got[1]}, log_scale {got[2]}; expected {want}")
    devices = {t.device for t in state}
    if devices != {device}:
        raise ValueError(f"{name} is on {sorted(map(str, devices))} but the inputs are on {device}")
