"""What favor.hf can run: the attention features FAVOR implements, and clear refusals for the rest.

FAVOR estimates softmax(scaling * q.k) under a causal and/or key-padding mask, and nothing
else. transformers hands model-specific extras to the attention function as keyword
arguments, and some of them change the attention weights (a position bias added to the
logits, soft-capping, attention sinks, a sliding window). Ignoring one would be a silent wrong
answer, so every keyword is either on an explicit allow-list (it does not change the weights:
``PASSING``), or changes them and is refused unless it is neutral (``REFUSED``: None, or a
bias that is all zero). An unknown keyword is refused too: favor.hf cannot tell whether it
matters. ``check_config`` finds the same features in a model's config, so ``performerize``
refuses before running anything; the checks at each call cover models loaded with
``attn_implementation="favor"`` and features the config does not show.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from transformers import PretrainedConfig

__all__ = [
    "UnsupportedAttentionError",
    "PASSING",
    "REFUSED",
    "check_keywords",
    "check_config",
    "config_features",
    "CROSS_ATTENTION_ARGUMENTS",
    "watching_cross_attention",
]

#: what FAVOR computes, said once in every refusal
_FAVOR_DOES = "FAVOR estimates softmax(scaling * q.k) under a causal and/or key-padding mask, nothing else"


class UnsupportedAttentionError(ValueError):
    """The model's attention uses a feature FAVOR does not implement (the message names it)."""


#: keywords that reach the attention function and leave the attention weights alone, with why
PASSING: dict[str, str] = {
    # used before the call (rotary embeddings, the mask); packed sequences detected from them
    # make a block-diagonal mask, which favor.hf.masks refuses
    "position_ids": "positions are already applied (rotary embeddings) and read into the mask",
    "use_cache": "the cache is updated before the call; the keys it returns are what FAVOR sees",
    "cache_position": "positions of the new tokens, already used to build the mask",
    "past_key_values": "the cache object, already used by the layer",
    # BERT-family layers pass it on; a cross-attention layer's keys are already projected from it
    "encoder_hidden_states": "the encoder states the keys were projected from",
    "output_attentions": "asks for the weights to be returned; FAVOR never forms them (None, as sdpa)",
    "output_hidden_states": "a model-level output flag",
    "output_router_logits": "a mixture-of-experts output flag",
    "return_dict": "a model-level output flag",
    "num_items_in_batch": "loss normalisation",
    "max_length_q": "flash-attention's buffer size; packed sequences come with cu_seq_lens_q, refused",
    "max_length_k": "flash-attention's buffer size; packed sequences come with cu_seq_lens_k, refused",
    "deterministic": "flash-attention's kernel determinism flag",
}


def _none(value: Any) -> bool:
    return value is None


def _zero_bias(value: Any) -> bool:
    # T5's cross-attention layers pass an all-zero bias: it changes nothing
    return value is None or (isinstance(value, torch.Tensor) and not bool(value.detach().ne(0).any()))


#: keywords that change the weights: name -> (the feature, in words; when it is neutral)
REFUSED: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "position_bias": ("a relative position bias added to the logits (T5-style position_bias)", _zero_bias),
    "softcap": ("logit soft-capping (softcap: logits -> c * tanh(logits / c))", _none),
    "s_aux": ("learned attention sinks (s_aux: an extra logit per head in the softmax normaliser)", _none),
    "sinks": ("learned attention sinks (sinks: an extra logit per head in the softmax normaliser)", _none),
    "sliding_window": ("sliding-window attention (sliding_window: each query sees only its last W keys)", _none),
    "cu_seq_lens_q": ("packed sequences (cu_seq_lens_q: sequence boundaries inside one row)", _none),
    "cu_seq_lens_k": ("packed sequences (cu_seq_lens_k: sequence boundaries inside one row)", _none),
    "seq_idx": ("packed sequences (seq_idx: sequence boundaries inside one row)", _none),
    "indices": ("sparse attention (indices: the keys each query attends to)", _none),
    "block_indices": ("block-sparse attention (block_indices: the key blocks each query attends to)", _none),
}

#: forward arguments of an attention module that carry another sequence's states: a module
#: called with one of them set is cross-attention (BART/T5/Whisper ``key_value_states``,
#: BERT/GPT-2 ``encoder_hidden_states``)
CROSS_ATTENTION_ARGUMENTS = ("key_value_states", "encoder_hidden_states")


def _show(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return repr(value)


def check_keywords(module: torch.nn.Module, kwargs: Mapping[str, Any], *, model: str | None = None) -> None:
    """Raise UnsupportedAttentionError if ``kwargs`` (what ``module`` handed the attention
    function besides q, k, v, mask, dropout, scaling and is_causal) would change the weights."""
    for name, value in kwargs.items():
        if name in PASSING:
            continue
        who = f"{model} ({type(module).__name__})" if model else type(module).__name__
        if name in REFUSED:
            feature, neutral = REFUSED[name]
            if neutral(value):
                continue
            raise UnsupportedAttentionError(
                f"{who} uses {feature}, got {name}={_show(value)}: this changes the attention weights and "
                f"FAVOR does not implement it ({_FAVOR_DOES}). Run this model with its own softmax attention."
            )
        raise UnsupportedAttentionError(
            f"{who} passes the keyword {name}={_show(value)} to its attention function, which favor.hf does "
            f"not know; it may change the attention weights, so favor.hf refuses rather than ignore it "
            f"({_FAVOR_DOES}). Known keywords: {sorted(PASSING) + sorted(REFUSED)}."
        )


def _configs(config) -> list[tuple[str, Any]]:
    """The config and its sub-configs (text_config, encoder, decoder, ...), with a prefix each."""
    found, stack, seen = [], [("config", config)], set()
    while stack:
        prefix, cfg = stack.pop()
        if id(cfg) in seen:
            continue
        seen.add(id(cfg))
        found.append((prefix, cfg))
        for key, value in vars(cfg).items():
            if isinstance(value, PretrainedConfig):
                stack.append((f"{prefix}.{key}", value))
    return found


def config_features(config) -> list[str]:
    """The attention features of ``config`` (a transformers PretrainedConfig, with its
    sub-configs) that FAVOR does not implement, one phrase each ([] when none)."""
    features = []
    for prefix, cfg in _configs(config):
        get = cfg.__dict__.get
        types = get("layer_types")
        windowed = sorted({t for t in types or () if t in ("sliding_attention", "chunked_attention")})
        if windowed:
            sizes = [
                f"{prefix}.{n}={get(n)}"
                for n in ("sliding_window", "attention_chunk_size", "local_attention")
                if get(n) is not None
            ]
            features.append(
                f"sliding-window / chunked attention ({'; '.join([f'{prefix}.layer_types has {windowed}'] + sizes)})"
            )
        elif types is None and isinstance(get("sliding_window"), int) and not isinstance(get("sliding_window"), bool):
            # no per-layer types: the window applies to every layer (Mistral, Phi-3, Starcoder2)
            features.append(
                f"sliding-window attention ({prefix}.sliding_window={get('sliding_window')}; if full causal "
                "attention is what you want, the same model up to that length, load it with sliding_window=None)"
            )
        if get("attn_logit_softcapping") is not None:
            features.append(f"logit soft-capping ({prefix}.attn_logit_softcapping={get('attn_logit_softcapping')})")
        if get("relative_attention_num_buckets") is not None:
            features.append(
                "a relative position bias added to the logits "
                f"({prefix}.relative_attention_num_buckets={get('relative_attention_num_buckets')}, T5-style)"
            )
        attn_config = get("attn_config")
        # a sub-config attn_config (MPT) is visited on its own; a plain dict is read here
        if get("alibi") is True or (isinstance(attn_config, Mapping) and attn_config.get("alibi") is True):
            features.append(f"ALiBi position biases ({prefix}.alibi)")
    return features


def check_config(model: torch.nn.Module) -> None:
    """Raise UnsupportedAttentionError naming every attention feature of ``model``'s config
    that FAVOR does not implement (nothing for a model without ``config``)."""
    config = getattr(model, "config", None)
    if config is None:
        return
    features = config_features(config)
    if features:
        raise UnsupportedAttentionError(
            f"{type(model).__name__} cannot be performerized: its attention uses "
            + "; ".join(features)
            + f". This changes the attention weights and FAVOR does not implement it ({_FAVOR_DOES}). Run "
            "this model with its own softmax attention."
        )


def _cross_argument_names(module: torch.nn.Module) -> tuple[inspect.Signature, tuple[str, ...]] | None:
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return None
    names = tuple(n for n in CROSS_ATTENTION_ARGUMENTS if n in signature.parameters)
    return (signature, names) if names else None


@contextlib.contextmanager
def watching_cross_attention(model: torch.nn.Module) -> Iterator[Callable[[torch.nn.Module], bool]]:
    """While active, ``is_cross(module)`` says whether ``module``'s running call is cross-attention:
    it was called with one of ``CROSS_ATTENTION_ARGUMENTS`` set (positionally or by name), or it
    says so itself (``module.is_cross_attention``, GPT-2 / BERT). Forward pre-hooks, removed on exit."""
    flags: dict[int, bool] = {}
    handles = []
    for module in model.modules():
        found = _cross_argument_names(module)
        if found is None:
            continue
        signature, names = found

        def hook(mod, args, kwargs, signature=signature, names=names):
            try:
                bound = signature.bind_partial(*args, **kwargs).arguments
            except TypeError:
                bound = kwargs
            flags[id(mod)] = any(bound.get(n) is not None for n in names)

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def is_cross(module: torch.nn.Module) -> bool:
        return bool(getattr(module, "is_cross_attention", False)) or flags.get(id(module), False)

    try:
        yield is_cross
    finally:
        for handle in handles:
            handle.remove()
