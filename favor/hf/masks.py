"""Read a Hugging Face attention mask as what FAVOR can compute: causal or not, which keys
are padding, and where the queries sit among the keys.

FAVOR never forms the L x L matrix, so an arbitrary mask cannot be applied. The masks
transformers builds are of two kinds that FAVOR can: padding (every query sees the same
keys) and causal-with-padding (query i sees key j when j <= i + offset and j is not
padding). Anything else (sliding windows, packed sequences, additive biases) raises.

Legend: B batch, H heads, Lq query length, Lk key length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .refusals import UnsupportedAttentionError

__all__ = ["MaskPlan", "plan_from_mask", "keep_from_mask"]

#: additive masks block with a large negative number (finfo.min, -1e4, -inf); anything
#: between this and 0 is a bias that changes the weights, which FAVOR cannot express
_BLOCKED_BELOW = -1e3


@dataclass(frozen=True)
class MaskPlan:
    """How to run FAVOR for one mask.

    ``causal``: query i (0-based among the Lq queries) sees keys j <= i + ``offset``.
    ``key_padding_mask``: bool (B, Lk), True for padding keys, or None.
    ``kv_length``: how many leading keys take part (the rest are never visible).
    ``dead_queries``: bool (B, Lq), True for query rows that see no key at all (output 0), or None.
    """

    causal: bool
    offset: int
    kv_length: int
    key_padding_mask: torch.Tensor | None
    dead_queries: torch.Tensor | None = None


def keep_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """A 4D mask (B, 1|H, Lq|1, Lk) as bool "this key is visible" of the same shape.

    Bool masks are already that (True = keep, as transformers' sdpa masks). Float masks are
    additive: 0 keeps, a large negative number blocks; other values raise."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.ndim != 4:
        raise ValueError(f"attention_mask must be 4D (B, 1|H, Lq, Lk), got shape {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask
    if not mask.is_floating_point():
        raise TypeError(f"attention_mask must be bool (True = keep) or an additive float mask, got dtype {mask.dtype}")
    keep = mask == 0
    blocked = mask <= _BLOCKED_BELOW
    # host sync (one per call): an additive bias cannot be applied and must raise
    if not bool((keep | blocked).all()):
        bad = mask[~(keep | blocked)]
        raise UnsupportedAttentionError(
            "attention_mask is an additive bias with values other than 0 (keep) and a large negative number "
            # host sync: only on the way to raising
            f"(block), e.g. {float(bad.flatten()[0]):.4g}; FAVOR cannot apply a bias to weights it never forms"
        )
    return keep


def _rows_equal(keep: torch.Tensor, want: torch.Tensor, dead: torch.Tensor) -> bool:
    # rows that see nothing are allowed anywhere: they are zeroed after attention
    return bool(((keep == want) | dead[..., None]).all())  # host sync: which plan the mask allows


def plan_from_mask(
    mask: torch.Tensor | None, *, batch: int, q_length: int, kv_length: int, is_causal: bool
) -> MaskPlan:
    """The MaskPlan for ``mask`` (None, bool or additive, 4D) of a layer whose module says ``is_causal``."""
    if mask is None:
        if not is_causal:
            return MaskPlan(False, 0, kv_length, None)
        if q_length == 1 or q_length == kv_length:
            # decoding one token (it sees every cached key) or a plain causal pass
            return MaskPlan(True, kv_length - q_length, kv_length, None)
        # transformers' convention without a mask and a longer (static) cache: upper-left
        # alignment, so query i sees keys 0..i and keys past Lq are never visible
        if q_length > kv_length:
            raise ValueError(f"causal attention without a mask needs Lq <= Lk, got Lq={q_length}, Lk={kv_length}")
        return MaskPlan(True, 0, q_length, None)

    keep = keep_from_mask(mask)
    b, h, lq, lk = keep.shape
    if lk != kv_length or lq not in (1, q_length) or b not in (1, batch):
        raise ValueError(
            f"attention_mask has shape {tuple(keep.shape)}; expected (B={batch}, 1|H, Lq={q_length}|1, Lk={kv_length})"
        )
    if h > 1 and not bool((keep == keep[:, :1]).all()):  # host sync: a per-head mask must raise
        raise UnsupportedAttentionError("attention_mask differs between heads; FAVOR needs one mask per batch element")
    keep = keep[:, 0].expand(batch, q_length, lk)  # (B, Lq, Lk)
    dead = ~keep.any(-1)  # (B, Lq)
    # the keys a query can see at most: the union over live rows
    cols = keep.any(-2)  # (B, Lk)
    offset = lk - q_length
    plans = []
    bidir_ok = _rows_equal(keep, cols[:, None, :].expand_as(keep), dead)
    causal_ok = False
    if offset >= 0:
        i = torch.arange(q_length, device=keep.device)[:, None]
        j = torch.arange(lk, device=keep.device)[None, :]
        tri = j <= i + offset
        causal_ok = _rows_equal(keep, tri[None] & cols[:, None, :], dead)
    if causal_ok:
        plans.append(True)
    if bidir_ok:
        plans.append(False)
    if not plans:
        raise UnsupportedAttentionError(
            "attention_mask is neither a key-padding mask nor causal with key padding (e.g. a sliding window, "
            "packed sequences or a custom pattern); FAVOR cannot express it"
        )
    # both fit when Lq == 1 or every live row sees all keys; follow the module so that
    # decoding a token gives the same numbers as the teacher-forced pass
    causal = is_causal if len(plans) == 2 else plans[0]
    pad = ~cols
    # host syncs (one per call): no padding and no dead query select the cheaper plain paths
    has_pad = bool(pad.any())  # host sync (see above)
    has_dead = bool(dead.any())  # host sync (see above)
    return MaskPlan(causal, offset if causal else 0, lk, pad if has_pad else None, dead if has_dead else None)
