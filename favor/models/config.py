"""PerformerConfig: everything that fixes a model's shape and numerics, frozen."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..features.feature_map import KERNELS
from ..nn.attention import ATTENTIONS, check_far_gain
from ..ops.local.spec import ExactTerms

__all__ = ["PerformerConfig", "POSITIONS"]

POSITIONS = ("rotary", "learned", "none")


def _positive_int(name: str, val) -> None:
    if isinstance(val, bool) or not isinstance(val, int) or val < 1:
        raise ValueError(f"{name} must be a positive int, got {val!r}")


@dataclass(frozen=True)
class PerformerConfig:
    """A Performer's architecture. ``attention="softmax"`` gives the exact-attention
    baseline with identical parameters; ``seed`` fixes the initial projection matrices
    (``redraw_features(model, seed, 0)``)."""

    vocab_size: int
    dim: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    attention: str = "favor"
    kernel: str = "positive"
    num_features: int | None = None
    projection: str = "orthogonal"
    position: str = "rotary"
    max_len: int = 2048
    tie_embeddings: bool = True
    chunk_size: int | None = None
    seed: int = 0
    #: exact local terms (window, sinks, block) beside FAVOR: an ExactTerms, its dict or None
    exact: ExactTerms | None = None
    #: with ``exact``: a learnable per-head log weight on the far keys' FAVOR estimate,
    #: initialised to this value (FavorAttention's ``far_gain``); None: no such parameter
    far_gain: float | None = None
    #: a learnable per-token bias on the logits (``logit_bias``, zeros at first; training
    #: can start it at the data's log token frequencies, TrainConfig.output_bias_init).
    #: False, the default, keeps the bias-free tied head and its state dict
    output_bias: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "exact", ExactTerms.coerce(self.exact))
        if self.exact is not None and self.attention != "favor":
            raise ValueError(f"exact terms are part of FAVOR attention; attention={self.attention!r} is exact already")
        check_far_gain(self.far_gain, self.exact)
        for name in ("vocab_size", "dim", "depth", "heads", "max_len"):
            _positive_int(name, getattr(self, name))
        if self.dim % self.heads:
            raise ValueError(f"dim must be divisible by heads, got dim={self.dim}, heads={self.heads}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {sorted(ATTENTIONS)}, got {self.attention!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {sorted(KERNELS)}, got {self.kernel!r}")
        if self.position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {self.position!r}")
        if self.position == "rotary" and (self.dim // self.heads) % 2:
            raise ValueError(f"position='rotary' needs an even head dim, got dim/heads={self.dim // self.heads}")
        if self.num_features is not None:
            _positive_int("num_features", self.num_features)
        if self.chunk_size is not None:
            _positive_int("chunk_size", self.chunk_size)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not isinstance(self.output_bias, bool):
            raise ValueError(f"output_bias must be a bool, got {self.output_bias!r}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PerformerConfig:
        """Inverse of to_dict; unknown or missing keys raise ValueError naming them."""
        if not isinstance(data, dict):
            raise TypeError(f"model config must be a dict, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known: {sorted(names)}")
        return cls(**data)

    def replace(self, **changes) -> PerformerConfig:
        return dataclasses.replace(self, **changes)
