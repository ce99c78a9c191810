"""The paper's model skeletons with a pluggable attention (Fig. 3, App. E).

A pre-LayerNorm Transformer over a byte vocabulary: token embedding, ``layers`` of favor's
own block (``favor.models.Block``: ``x + attention(LN(x))`` and ``x + MLP(LN(x))``, GELU,
width ``d_ff``) with the attention swapped in, a final LN and a linear head. No positional embedding: it costs nothing next to the rest and would tie the
model to a maximum length. The attention is chosen by name from ``ATTENTIONS``:

- ``favor``: FAVOR+ (positive features, M=256, orthogonal), through ``favor.attention``;
- ``sdpa``: exact softmax attention, ``torch.nn.functional.scaled_dot_product_attention``;
- ``x``: attention that returns V, the paper's "X" line (no attention cost at all);
- ``performer-pytorch``, ``reformer-pytorch``, ``linformer``: the peers' own self-attention
  modules (their projections included), as a user of each library would build it; optional
  extras (``pip install --no-deps`` of the ``compare`` group in pyproject.toml).

favor, SDPA and X share one block written as a user would: one fused (d, 3d) projection
whose output is viewed as q, k, v (B, H, L, D), strided views into it, not copies.

Legend: B batch, H heads, L length, D head dim (d_model / H), M features.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import favor

from ..models.block import Block
from ..models.config import PerformerConfig

__all__ = [
    "SkeletonConfig",
    "REGULAR",
    "SMALL",
    "SIZES",
    "ATTENTIONS",
    "available",
    "Skeleton",
    "BlockAttention",
    "make_block",
    "build_model",
]


@dataclass(frozen=True)
class SkeletonConfig:
    """(heads, layers, d_ff, d_model) as the paper writes them, and the vocabulary size."""

    heads: int
    layers: int
    d_ff: int
    d_model: int
    vocab: int = 256

    def __post_init__(self) -> None:
        for name in ("heads", "layers", "d_ff", "d_model", "vocab"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by heads={self.heads}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


#: the paper's "regular" (Fig. 3) and "small" (App. E) sizes
REGULAR = SkeletonConfig(heads=8, layers=6, d_ff=2048, d_model=512)
SMALL = SkeletonConfig(heads=1, layers=6, d_ff=64, d_model=64)
SIZES = {"regular": REGULAR, "small": SMALL}


# -- attention cores over q, k, v views of one fused projection ---------------------------
def _favor_core(cfg: SkeletonConfig, *, causal: bool, num_features: int, generator: torch.Generator) -> nn.Module:
    class FavorCore(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.feature_map = favor.FeatureMap(
                "positive", dim=cfg.head_dim, num_features=num_features, generator=generator
            )

        def forward(self, q, k, v):
            return favor.attention(q, k, v, self.feature_map, causal=causal)

    return FavorCore()


class _SdpaCore(nn.Module):
    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.causal = causal

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)


class _IdentityCore(nn.Module):
    """The paper's "X": attention that returns V."""

    def forward(self, q, k, v):
        return v


class FusedSelfAttention(nn.Module):
    """qkv = x W (one (d, 3d) GEMM), viewed as q, k, v (B, H, L, D) without copies; the core's
    (B, H, L, D) output goes through the output projection."""

    def __init__(self, cfg: SkeletonConfig, core: nn.Module) -> None:
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.core = core
        self.out = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        o = self.core(q, k, v)  # (B, H, L, D)
        return self.out(o.transpose(1, 2).reshape(b, length, d))


# -- the peers' own self-attention modules ------------------------------------------------
class _PeerAttention(nn.Module):
    """A peer's self-attention module (B, L, d) -> (B, L, d), quiet on construction."""

    def __init__(self, make: Callable[[], nn.Module]) -> None:
        super().__init__()

        with contextlib.redirect_stdout(io.StringIO()):  # performer-pytorch prints without CUDA kernels
            self.inner = make()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def _performer(cfg: SkeletonConfig, *, causal: bool, num_features: int, length: int) -> nn.Module:
    from performer_pytorch import SelfAttention

    return _PeerAttention(
        lambda: SelfAttention(
            dim=cfg.d_model, heads=cfg.heads, dim_head=cfg.head_dim, nb_features=num_features, causal=causal
        )
    )


def _reformer(cfg: SkeletonConfig, *, causal: bool, num_features: int, length: int) -> nn.Module:
    from reformer_pytorch import LSHSelfAttention

    # the library's defaults: buckets of 64, 8 hash rounds
    return _PeerAttention(lambda: LSHSelfAttention(dim=cfg.d_model, heads=cfg.heads, causal=causal))


def _linformer(cfg: SkeletonConfig, *, causal: bool, num_features: int, length: int) -> nn.Module:
    if causal:
        raise ValueError("linformer has no causal mode (it projects keys along the whole sequence)")
    from linformer import LinformerSelfAttention

    # k (the projected length) = M, the same budget as the random features
    return _PeerAttention(
        lambda: LinformerSelfAttention(dim=cfg.d_model, seq_len=length, k=num_features, heads=cfg.heads)
    )


@dataclass(frozen=True)
class Attention:
    """How to build one attention of the skeleton and whether it is installed."""

    build: Callable[..., nn.Module]  # (cfg, *, causal, num_features, length, generator) -> module
    module: str | None = None  # the import that must be found for it to be available
    causal: bool = True  # whether it has a causal mode
    #: how its time grows with L beyond the model's linear part (sweeps skip lengths
    #: predicted to pass their time limit)
    exponent: float = 1.0


def _fused(core: Callable[..., nn.Module]):
    def build(cfg, *, causal, num_features, length, generator):
        return FusedSelfAttention(cfg, core(cfg, causal=causal, num_features=num_features, generator=generator))

    return build


def _peer(make):
    def build(cfg, *, causal, num_features, length, generator):
        return make(cfg, causal=causal, num_features=num_features, length=length)

    return build


ATTENTIONS: dict[str, Attention] = {
    "favor": Attention(_fused(_favor_core)),
    "sdpa": Attention(_fused(lambda cfg, *, causal, num_features, generator: _SdpaCore(causal)), exponent=2.0),
    "x": Attention(_fused(lambda cfg, *, causal, num_features, generator: _IdentityCore())),
    "performer-pytorch": Attention(_peer(_performer), module="performer_pytorch"),
    "reformer-pytorch": Attention(_peer(_reformer), module="reformer_pytorch"),
    "linformer": Attention(_peer(_linformer), module="linformer", causal=False),
}


def available(name: str) -> bool:
    """Whether the attention ``name`` can be built here (peers are optional extras)."""
    if name not in ATTENTIONS:
        raise ValueError(f"attention must be one of {sorted(ATTENTIONS)}, got {name!r}")
    module = ATTENTIONS[name].module
    return module is None or importlib.util.find_spec(module) is not None


class BlockAttention(nn.Module):
    """A self-attention (B, L, d) -> (B, L, d) behind favor's Block interface:
    ``(x, *, key_padding_mask, state, return_state) -> (out, None)`` (no masks, no state: the
    skeletons time whole sequences)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x, *, key_padding_mask=None, state=None, return_state=False):
        if key_padding_mask is not None or state is not None or return_state:
            raise ValueError("the skeleton's attention takes no key_padding_mask and keeps no state")
        return self.inner(x), None


def make_block(cfg: SkeletonConfig, attention: nn.Module, *, causal: bool) -> Block:
    """favor's pre-LN ``favor.models.Block`` (x + attn(LN(x)), x + MLP(LN(x)), GELU, width
    d_ff) with ``attention`` in it. The MLP's weights are drawn from torch's global generator
    exactly as an ``nn.Sequential(Linear, GELU, Linear)`` built here would draw them (the
    Block's own attention, replaced, draws nothing from it), so a seed gives the same weights
    as the skeleton's earlier private block did."""
    dim = cfg.d_model
    config = PerformerConfig(
        vocab_size=cfg.vocab,
        dim=dim,
        depth=1,
        heads=cfg.heads,
        mlp_ratio=cfg.d_ff / dim,
        attention="softmax",
        position="none",
    )
    with torch.random.fork_rng(devices=[]):
        block = Block(config, causal=causal)
    if block.mlp[0].out_features != cfg.d_ff:  # pragma: no cover - round(d * (d_ff / d)) == d_ff
        raise ValueError(f"d_ff={cfg.d_ff} is not representable as mlp_ratio over d_model={dim}")
    block.attn = BlockAttention(attention)
    block.mlp[0].reset_parameters()
    block.mlp[2].reset_parameters()
    return block


class Skeleton(nn.Module):
    """tokens (B, L) -> logits (B, L, vocab)."""

    def __init__(self, cfg: SkeletonConfig, attentions: list[nn.Module], *, causal: bool = False) -> None:
        super().__init__()
        if len(attentions) != cfg.layers:
            raise ValueError(f"need one attention per layer ({cfg.layers}), got {len(attentions)}")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.blocks = nn.ModuleList(make_block(cfg, a, causal=causal) for a in attentions)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)[0]
        return self.head(self.norm(x))


def build_model(
    cfg: SkeletonConfig,
    attention: str,
    *,
    causal: bool = False,
    num_features: int = 256,
    length: int | None = None,
    seed: int = 0,
) -> Skeleton:
    """The skeleton ``cfg`` with attention ``attention`` (a key of ATTENTIONS) in every layer.
    ``length`` is needed by linformer only (its projection is (length, M)). Weights and
    random features are drawn from ``seed``."""
    if not isinstance(cfg, SkeletonConfig):
        raise TypeError(f"cfg must be a SkeletonConfig, got {type(cfg).__name__}")
    if not available(attention):
        raise ValueError(f"attention {attention!r} needs the optional package {ATTENTIONS[attention].module!r}")
    spec = ATTENTIONS[attention]
    if causal and not spec.causal:
        raise ValueError(f"attention {attention!r} has no causal mode")
    if attention == "linformer" and length is None:
        raise ValueError("linformer needs length= (its projection along the sequence is (length, M))")
    gen = torch.Generator().manual_seed(seed)
    # nn.Linear and the peers draw from torch's global generator: seeded here, inside a fork
    # of it, so that the caller's random state is left as it was
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = [
            spec.build(cfg, causal=causal, num_features=num_features, length=length, generator=gen)
            for _ in range(cfg.layers)
        ]
        return Skeleton(cfg, layers, causal=causal)
