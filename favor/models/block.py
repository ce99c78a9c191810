"""One pre-norm Transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

from __future__ import annotations

import torch
from torch import nn

from ..nn.attention import AttentionState, FavorAttention
from .config import PerformerConfig

__all__ = ["Block"]


class Block(nn.Module):
    def __init__(self, config: PerformerConfig, *, causal: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim)
        self.attn = FavorAttention(
            config.dim,
            config.heads,
            dropout=config.dropout,
            causal=causal,
            kernel=config.kernel,
            num_features=config.num_features,
            projection=config.projection,
            attention=config.attention,
            rotary=config.position == "rotary",
            chunk_size=config.chunk_size,
            exact=config.exact,
            far_gain=config.far_gain,
        )
        self.norm2 = nn.LayerNorm(config.dim)
        hidden = int(round(config.dim * config.mlp_ratio))
        self.mlp = nn.Sequential(
            nn.Linear(config.dim, hidden), nn.GELU(), nn.Linear(hidden, config.dim), nn.Dropout(config.dropout)
        )
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self,
        x: torch.Tensor,
        *,
        key_padding_mask: torch.Tensor | None = None,
        state: AttentionState | None = None,
        return_state: bool = False,
    ) -> tuple[torch.Tensor, AttentionState | None]:
        h, new = self.attn(self.norm1(x), key_padding_mask=key_padding_mask, state=state, return_state=return_state)
        x = x + self.drop(h)
        return x + self.mlp(self.norm2(x)), new
