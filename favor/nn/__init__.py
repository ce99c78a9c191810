"""Modules over the functional core: FavorAttention and the feature redraw policy."""

from .attention import ATTENTIONS, AttentionState, FavorAttention
from .redraw import FeatureRedrawer, feature_maps, mix_seed, redraw_features
from .rotary import apply_rotary

__all__ = [
    "FavorAttention",
    "AttentionState",
    "ATTENTIONS",
    "redraw_features",
    "FeatureRedrawer",
    "feature_maps",
    "mix_seed",
    "apply_rotary",
]
