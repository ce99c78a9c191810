"""Wiring a FavorCache into ``model.generate``: transformers builds a DynamicCache in
``_prepare_cache_for_generation`` when none is given, and offers no public hook to build
another kind, so ``use_favor_cache`` wraps that method on the model instance (performerize
and from_pretrained call it). The wrapper gives a decoder-only model running favor's
attention a ``FavorCache`` instead and refuses the generation modes that rewind the cache.
A cache the user passes (``cache=``) is used as given."""

from __future__ import annotations

import types

from torch import nn

from .cache import FAVOR_IMPLEMENTATIONS, FavorCache

__all__ = ["use_favor_cache", "favor_generates"]

_METHOD = "_prepare_cache_for_generation"


def favor_generates(model: nn.Module) -> bool:
    """Whether ``model.generate`` would run favor's attention with a FavorCache."""
    config = getattr(model, "config", None)
    return (
        config is not None
        and getattr(config, "_attn_implementation", None) in FAVOR_IMPLEMENTATIONS
        and not getattr(config, "is_encoder_decoder", False)
    )


def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, *args, **kwargs):
    original = getattr(type(self), _METHOD)
    if (
        not favor_generates(self)
        or model_kwargs.get("cache") is not None
        or generation_config.use_cache is False
        or not self._supports_default_dynamic_cache()
    ):
        return original(self, generation_config, model_kwargs, generation_mode, *args, **kwargs)
    mode = getattr(generation_mode, "value", generation_mode)
    if mode == "assisted_generation" or getattr(generation_config, "is_assistant", False):
        raise ValueError(
            "assisted (speculative) decoding rewinds the cache after rejected draft tokens; a performerized model's "
            "FavorCache keeps FAVOR's running sums and cannot go back (FavorCache.crop)"
        )
    if generation_config.cache_implementation not in (None, "dynamic"):
        raise ValueError(
            f"cache_implementation={generation_config.cache_implementation!r}: a performerized model generates with "
            "its constant-size FavorCache (favor.hf.FavorCache); leave cache_implementation unset"
        )
    model_kwargs["cache"] = FavorCache(self)
    return None


def use_favor_cache(model: nn.Module) -> nn.Module:
    """Make ``model.generate`` use a FavorCache whenever the model runs favor's attention
    (idempotent; returns the model). Models without ``generate`` are left alone."""
    if hasattr(type(model), _METHOD):
        setattr(model, _METHOD, types.MethodType(_prepare_cache_for_generation, model))
    return model
