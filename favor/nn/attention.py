"""FavorAttention: a drop-in for nn.MultiheadAttention backed by FAVOR attention.

Shapes follow nn.MultiheadAttention with batch_first=True by default: query (B, Lq, E),
key (B, Lk, kdim), value (B, Lk, vdim) -> (B, Lq, E). Inside, heads are split to
(B, H, L, D) and passed to ``favor.attention`` (or ``favor.step`` for one decoded token).
``attention="softmax"`` swaps in exact attention with the same parameters, for baselines.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..features.feature_map import FeatureMap
from ..ops.api import attention as favor_attention
from ..ops.local.recurrent import ExactState
from ..ops.local.spec import ExactTerms
from ..ops.recurrent import step as favor_step
from ..ops.reference import softmax_attention
from ..ops.state import State
from .rotary import apply_rotary

__all__ = ["FavorAttention", "AttentionState", "ATTENTIONS", "check_far_gain"]


def check_far_gain(far_gain, exact: ExactTerms | None) -> None:
    """``far_gain``: None, or the finite initial far log gain of a hybrid (``exact`` set)."""
    if far_gain is None:
        return
    if isinstance(far_gain, bool) or not isinstance(far_gain, (int, float)) or not math.isfinite(far_gain):
        raise ValueError(f"far_gain must be None or a finite float (the initial far log gain), got {far_gain!r}")
    if exact is None:
        raise ValueError("far_gain weighs FAVOR's far keys against exact terms: it needs exact=ExactTerms(...)")


class AttentionState(NamedTuple):
    """What causal self-attention keeps between calls: the number of positions seen, and
    either FAVOR's constant-size ``favor.State`` or, for exact softmax, the key/value cache
    (B, H, position, D) that grows with the context."""

    position: int
    favor: State | ExactState | None = None
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None


def _favor(module: FavorAttention, q, k, v, mask, state: AttentionState | None, stateful: bool):
    fm, chunk, exact, gain = module.feature_map, module.chunk_size, module.exact, module.far_log_gain
    if not stateful:
        out = favor_attention(
            q, k, v, fm, causal=module.causal, key_padding_mask=mask, chunk_size=chunk, exact=exact, far_log_gain=gain
        )
        return out, None
    prev = state.favor if state is not None else None
    if q.shape[-2] == 1:
        out, new = favor_step(prev, q[..., 0, :], k[..., 0, :], v[..., 0, :], fm, exact=exact, far_log_gain=gain)
        return out.unsqueeze(-2), new
    return favor_attention(
        q,
        k,
        v,
        fm,
        causal=True,
        chunk_size=chunk,
        initial_state=prev,
        return_state=True,
        exact=exact,
        far_log_gain=gain,
    )


def _softmax(module: FavorAttention, q, k, v, mask, state: AttentionState | None, stateful: bool):
    p = module.dropout if module.training else 0.0
    if not stateful:
        if mask is not None:
            b, lq, lk = q.shape[0], q.shape[-2], k.shape[-2]
            vis = ~mask.view(b, 1, 1, lk)
            if module.causal:
                vis = vis & torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
            # host sync (softmax baseline only, one per call): SDPA or the NaN-free reference
            if bool(vis.any(-1).all()):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=vis, dropout_p=p), None
            # some query sees no key: SDPA would give NaN, the exact reference gives 0
            out = softmax_attention(q, k, v, causal=module.causal, key_padding_mask=mask)
            return (F.dropout(out, p, module.training) if p else out), None
        return F.scaled_dot_product_attention(q, k, v, is_causal=module.causal, dropout_p=p), None
    if state is not None and state.keys is not None:
        k = torch.cat((state.keys, k), dim=-2)
        v = torch.cat((state.values, v), dim=-2)
    lq, lk = q.shape[-2], k.shape[-2]
    if lq == 1:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
    elif lq == lk:  # a prefill: plain causal, no (Lq, Lk) mask in memory
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
    else:
        past = lk - lq
        vis = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=past)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=vis, dropout_p=p)
    return out, (k, v)


#: attention name -> function(module, q, k, v, key_padding_mask, state, stateful) -> (out, new state part)
ATTENTIONS = {"favor": _favor, "softmax": _softmax}


class FavorAttention(nn.Module):
    """Multi-head attention with FAVOR (random-feature) attention inside.

    ``forward(query, key=None, value=None, *, key_padding_mask=None, state=None)`` returns
    ``(out, None)`` like nn.MultiheadAttention with need_weights=False (the L x L weights are
    never formed). key defaults to query and value to key. ``key_padding_mask`` is bool
    (B, Lk), True marks padding, as in nn.MultiheadAttention.

    Recurrent decoding (causal self-attention only): pass ``state`` (an AttentionState, or
    None with ``return_state=True`` to start) and the call returns ``(out, new_state)``;
    feeding a sequence in pieces gives the same outputs as one pass. ``dropout`` applies to
    the attention weights for softmax and to the attention output for favor (no weights).

    ``exact`` (a ``favor.ExactTerms``): each query's window, sinks and block get their exact
    softmax weight, FAVOR the rest (favor.attention's ``exact``); decoding keeps a ring of the
    last C + W keys beside FAVOR's state. ``far_gain`` (a float, with ``exact`` only): a
    learnable per-head log weight ``far_log_gain`` (H,), initialised to it, on FAVOR's
    estimate of the far keys (far terms x exp(g); 0 starts at the plain hybrid's numbers),
    so that training can turn down the noisy estimate against the exact window.

    Feature options: ``kernel`` (any favor.KERNELS name), ``num_features`` (default
    favor.default_num_features(head_dim) = round(D ln D)), ``projection``, ``stabilizer``,
    ``generator`` (for the initial draw). ``rotary=True`` rotates q and k by position
    before the feature map.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        batch_first: bool = True,
        causal: bool = False,
        kernel: str = "positive",
        num_features: int | None = None,
        projection: str | torch.Tensor = "orthogonal",
        stabilizer: str = "exact",
        attention: str = "favor",
        rotary: bool = False,
        rotary_base: float = 10000.0,
        chunk_size: int | None = None,
        exact: ExactTerms | None = None,
        far_gain: float | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, val in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim must be divisible by num_heads, got embed_dim={embed_dim}, num_heads={num_heads}"
            )
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {sorted(ATTENTIONS)}, got {attention!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        if rotary and self.head_dim % 2:
            raise ValueError(f"rotary=True needs an even head dim, got {self.head_dim}")
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout, self.batch_first, self.causal = float(dropout), batch_first, causal
        self.attention, self.rotary, self.rotary_base, self.chunk_size = attention, rotary, rotary_base, chunk_size
        self.exact = ExactTerms.coerce(exact)
        if self.exact is not None and attention != "favor":
            raise ValueError(f"exact terms are part of FAVOR attention; attention={attention!r} is exact already")
        check_far_gain(far_gain, self.exact)
        kw = {"device": device, "dtype": dtype}
        # a Parameter only when asked for: plain models keep their state_dict keys
        self.far_log_gain = None
        if far_gain is not None:
            self.far_log_gain = nn.Parameter(torch.full((num_heads,), float(far_gain), **kw))
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.feature_map = None
        if attention == "favor":
            self.feature_map = FeatureMap(
                kernel,
                dim=self.head_dim,
                num_features=num_features,
                projection=projection,
                stabilizer=stabilizer,
                generator=generator,
            )
            if device is not None:
                self.feature_map.to(device)

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, attention={self.attention!r}, "
            f"causal={self.causal}, rotary={self.rotary}"
            + (f", exact={self.exact}" if self.exact else "")
            + (", far_gain=learned" if self.far_log_gain is not None else "")
        )

    @classmethod
    def from_multihead_attention(cls, mha: nn.MultiheadAttention, **kwargs) -> FavorAttention:
        """A FavorAttention with ``mha``'s projection weights; ``kwargs`` as for __init__."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"mha must be an nn.MultiheadAttention, got {type(mha).__name__}")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("add_bias_kv / add_zero_attn have no FAVOR counterpart")
        e = mha.embed_dim
        kwargs.setdefault("batch_first", mha.batch_first)
        w = mha.in_proj_weight
        new = cls(
            e,
            mha.num_heads,
            kdim=mha.kdim,
            vdim=mha.vdim,
            bias=mha.in_proj_bias is not None,
            dropout=mha.dropout,
            device=mha.out_proj.weight.device,
            dtype=mha.out_proj.weight.dtype,
            **kwargs,
        )
        with torch.no_grad():
            ws = w.chunk(3) if w is not None else (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
            for proj, weight in zip((new.q_proj, new.k_proj, new.v_proj), ws, strict=False):
                proj.weight.copy_(weight)
            if mha.in_proj_bias is not None:
                for proj, b in zip((new.q_proj, new.k_proj, new.v_proj), mha.in_proj_bias.chunk(3), strict=False):
                    proj.bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        return x.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        *,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        state: AttentionState | None = None,
        return_state: bool = False,
    ) -> tuple[torch.Tensor, AttentionState | None]:
        if need_weights:
            raise ValueError("FavorAttention never forms the attention weights: call it with need_weights=False")
        if not isinstance(query, torch.Tensor) or query.ndim != 3:
            shape = tuple(query.shape) if isinstance(query, torch.Tensor) else type(query).__name__
            raise ValueError(
                f"query must be a 3-d tensor ({'B, L, E' if self.batch_first else 'L, B, E'}), got {shape}"
            )
        self_attention = key is None
        key = query if key is None else key
        value = key if value is None else value
        if not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if query.shape[-1] != self.embed_dim:
            raise ValueError(f"query has embedding size {query.shape[-1]}, expected embed_dim={self.embed_dim}")
        if key.shape[-1] != self.kdim or value.shape[-1] != self.vdim:
            raise ValueError(
                f"key/value have sizes {key.shape[-1]}/{value.shape[-1]}, expected kdim={self.kdim}/vdim={self.vdim}"
            )
        if key.shape[:2] != value.shape[:2] or key.shape[0] != query.shape[0]:
            raise ValueError(
                f"batch/length mismatch: query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}"
            )
        stateful = state is not None or return_state
        if stateful:
            if not (self.causal and self_attention):
                raise ValueError("state / return_state are for causal self-attention (causal=True, key=None)")
            if key_padding_mask is not None:
                raise ValueError("key_padding_mask cannot be combined with recurrent state")
            if state is not None and not isinstance(state, AttentionState):
                raise TypeError(f"state must be a favor.nn.AttentionState, got {type(state).__name__}")
        offset = state.position if state is not None else 0
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        if self.rotary:
            q = apply_rotary(q, offset, base=self.rotary_base)
            k = apply_rotary(k, offset, base=self.rotary_base)
        out, new = ATTENTIONS[self.attention](self, q, k, v, key_padding_mask, state, stateful)
        if self.attention == "favor" and self.dropout and self.training:
            out = F.dropout(out, self.dropout, True)
        out = self.out_proj(out.transpose(1, 2).reshape(query.shape[0], query.shape[1], self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if not stateful:
            return out, None
        position = offset + query.shape[1]
        if self.attention == "favor":
            return out, AttentionState(position, favor=new)
        return out, AttentionState(position, keys=new[0], values=new[1])
