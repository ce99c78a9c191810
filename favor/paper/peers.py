"""Peer attentions (lucidrains' Linformer and Reformer LSH) as the attention of favor's model.

The model is favor's PerformerLM / PerformerEncoder with every block's attention module
swapped for the peer's self-attention. The peers cannot rotate q and k inside their
attention, so these models use learned absolute positions instead of rotary ones (stated in
the experiments' tables). Optional extras: ``pip install --no-deps linformer==0.2.3
reformer-pytorch==1.4.4 product-key-memory local-attention axial-positional-embedding einops``.

- Linformer (bidirectional only): keys and values projected along the sequence to
  ``k = min(256, L / 4)`` rows (the paper's PG-19 run used k = 600).
- Reformer: LSH attention, buckets of 64 (or the largest smaller size whose double divides L), 2 hash rounds (for time on 2 CPU cores), shared query/key projection.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models import PerformerConfig, PerformerEncoder, PerformerLM

__all__ = ["build_peer_model", "PeerAttention"]


class PeerAttention(nn.Module):
    """Calls a peer self-attention with favor's block interface: (x, key_padding_mask) -> (out, None)."""

    def __init__(self, inner: nn.Module, kind: str) -> None:
        super().__init__()
        self.inner, self.kind = inner, kind

    def forward(self, x, *, key_padding_mask=None, state=None, return_state=False):
        if state is not None or return_state:
            raise ValueError(f"{self.kind} attention has no recurrent state")
        if self.kind == "linformer":
            if key_padding_mask is not None:
                raise ValueError("linformer attention takes no key_padding_mask")
            return self.inner(x), None
        mask = None if key_padding_mask is None else ~key_padding_mask
        return self.inner(x, input_mask=mask), None


def bucket_size(length: int) -> int:
    """The largest LSH bucket <= 64 whose double divides ``length`` (Reformer's requirement)."""
    for b in range(64, 0, -1):
        if length % (2 * b) == 0:
            return b
    raise ValueError(f"reformer attention needs an even sequence length, got {length}")


def build_peer_model(variant, size, *, vocab_size: int, causal: bool, seed: int):
    cfg = PerformerConfig(
        vocab_size=vocab_size,
        dim=size.dim,
        depth=variant.depth or size.depth,
        heads=size.heads,
        dropout=size.dropout,
        attention="softmax",
        position="learned",
        max_len=size.max_len,
        seed=seed,
    )
    model = (PerformerLM if causal else PerformerEncoder)(cfg)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    for block in model.blocks:
        if variant.attention == "linformer":
            if causal:
                raise ValueError("linformer attention is bidirectional only (causal=False)")
            from linformer import LinformerSelfAttention

            k = min(256, max(1, size.max_len // 4))
            inner = LinformerSelfAttention(size.dim, size.max_len, k=k, heads=size.heads, dropout=size.dropout)
        elif variant.attention == "reformer":
            from reformer_pytorch import LSHSelfAttention

            inner = LSHSelfAttention(
                size.dim,
                heads=size.heads,
                bucket_size=bucket_size(size.max_len),
                n_hashes=2,
                causal=causal,
                dropout=size.dropout,
            )
        else:
            raise ValueError(f"unknown peer attention {variant.attention!r}")
        block.attn = PeerAttention(inner, variant.attention)
    torch.random.set_rng_state(gen_state)
    return model
