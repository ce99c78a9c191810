"""FavorCache: constant-size generation for performerized Hugging Face decoders.

transformers' default cache (``DynamicCache``) keeps every key and value, so each new token
of a performerized decoder would re-run FAVOR over the whole context. A ``FavorCache`` keeps
per layer only what causal FAVOR needs from the past:

* the recurrent state (kv, z, log scale) per (batch, query head), in float32 (float64 for
  float64 models), as ``favor.State``;
* with exact local terms (``exact_window`` W >= 0, ``exact_sinks`` S, ``exact_block`` C): a
  ``favor.ExactState`` instead (favor.ops.local: FAVOR's far state, a ring of the last
  C + W keys and values per query head, the first S, each flagged real or padding);
* with sinks but no window (W = -1): the first S keys and values (window/sinks below).

Its size depends on batch, layers, heads, M, W and S only, never on the context length
(``nbytes``). The prompt runs through the chunked causal path, each new token through the
recurrent step (favor.attention's step path); both equal the teacher-forced forward pass.

After ``favor.hf.performerize`` or ``favor.hf.from_pretrained`` a plain ``model.generate``
builds one (``use_favor_cache``); for a hand-written loop pass ``cache=FavorCache(model)``
to the model's forward. How it reaches the attention function: transformers hands the
attention function whatever the cache's ``update`` returned, never the cache, so
``FavorLayer.update`` returns the new keys and values only and leaves itself in a
thread-local slot, which favor's attention function claims by the identity of the key
tensor (decode.py does the arithmetic).

What it refuses, with an error naming the operation: ``crop`` to a past length (and so
assisted decoding, which rewinds), ``activate_past_recording``, and being driven by an
attention implementation other than favor's (its ``update`` returns the new tokens only:
softmax attention over them would be silently wrong).
"""

from __future__ import annotations

import threading

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..ops.local.recurrent import ExactState
from ..ops.state import State
from .names import NAME, OBSERVE

__all__ = ["FavorCache", "FavorLayer", "claim", "FAVOR_IMPLEMENTATIONS"]

#: attn_implementation names whose attention function consumes a FavorCache
FAVOR_IMPLEMENTATIONS = (NAME, OBSERVE)

_slot = threading.local()


def _state_tensors(state) -> list[torch.Tensor]:
    if isinstance(state, ExactState):
        return [*state.far, *state[1:]]
    return list(state)


def claim(key: torch.Tensor) -> FavorLayer | None:
    """The FavorLayer whose ``update`` returned ``key`` just before (and forget it), or None."""
    entry = getattr(_slot, "entry", None)
    if entry is None or entry[1] is not key:
        return None
    _slot.entry = None
    return entry[0]


def _refuse(operation: str, why: str) -> ValueError:
    return ValueError(f"FavorCache cannot {operation}: {why}")


_NO_REWIND = (
    "it keeps FAVOR's running sums (and at most the last exact_window tokens), not the past keys, "
    "so it cannot go back to an earlier length; regenerate from the prompt instead"
)


class FavorLayer(CacheLayerMixin):
    """One decoder layer's constant-size cache (module docstring). The tensors are filled by
    favor's attention function on its first call (decode.py); until then only the length
    is known."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, **kwargs) -> None:
        super().__init__()
        self.cumulative_length = 0
        self.start = 0  # position of the first token of the pending update
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        # plain FAVOR: State (B, H, M', Dv), (B, H, M'), (B, H); exact terms: an ExactState,
        # or while the fused step runs (decode._exact_fused) a LeanState in ``lean`` and the
        # way back to an ExactState in ``lean_exit`` (``state`` converts on first use)
        self._state: State | ExactState | None = None
        self.lean = None
        self.lean_exit = None
        # (module, adapter) of the last fused step: decode._fused_token's short path
        self.fast = None
        # exact local terms: raw keys/values (B, Hkv, n, D) and "real token" flags (B, n)
        self.window: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.sinks: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        # exact terms (decode.py): their ExactTerms; whether any call had key padding (then
        # the state's slots may hold padding and every token takes the general step); the
        # length at which the state was made from a whole sequence (recurrent.lean_eligible)
        self.terms = None
        self.padded = False
        self.built = 0
        # GQA (decode._exact_lean): (H, Hkv, the key/value head of each query head)
        self.head_index: tuple[int, int, torch.Tensor] | None = None

    @property
    def state(self) -> State | ExactState | None:
        if self.lean is not None:  # the fused step's layout back to exact_step's
            self._state, self.lean, self.lean_exit = self.lean_exit(self.lean), None, None
        return self._state

    @state.setter
    def state(self, value: State | ExactState | None) -> None:
        self._state, self.lean, self.lean_exit = value, None, None

    @property
    def has_state(self) -> bool:
        """Whether a state is held (in either layout), without converting it."""
        return self.lean is not None or self._state is not None

    def __repr__(self) -> str:
        return f"FavorLayer(length={self.cumulative_length}, bytes={self.nbytes})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Record the new tokens' keys and values for favor's attention function and return
        them unchanged (the attention function combines them with the state)."""
        if self.pending is not None:
            raise RuntimeError(
                "FavorCache: the previous keys given to this layer never reached favor's attention function, so "
                "its state is missing them; a FavorCache works only with attn_implementation='favor'"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.start = self.cumulative_length
        self.cumulative_length += key_states.shape[-2]
        self.pending = (key_states, value_states)
        _slot.entry = (self, key_states)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # the attention function sees the new tokens only: the mask covers their columns
        # (absolute positions cumulative_length .. + query_length - 1)
        return query_length, self.cumulative_length

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def tensors(self) -> list[torch.Tensor]:
        if self.lean is not None:
            out = self.lean.tensors()
        else:
            out = [] if self._state is None else _state_tensors(self._state)
        for part in (self.window, self.sinks):
            if part is not None:
                out.extend(part)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held: the state and the exact-term buffers (independent of the length)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def _map(self, fn) -> None:
        if isinstance(self.state, ExactState):
            far = State(*(fn(t) for t in self.state.far))
            # every field has the batch first except the token count, shared by the batch
            rest = (fn(t) if t.ndim else t for t in self.state[1:])
            self.state = ExactState(far, *rest)
        elif self.state is not None:
            self.state = State(*(fn(t) for t in self.state))
        if self.window is not None:
            self.window = tuple(fn(t) for t in self.window)
        if self.sinks is not None:
            self.sinks = tuple(fn(t) for t in self.sinks)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i becomes row beam_idx[i]."""
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0 or self.cumulative_length == 0:
            return  # nothing to undo (transformers calls crop(0) to trim caches)
        raise _refuse(f"crop({tokens_to_remove}) (as assisted or speculative decoding does)", _NO_REWIND)

    def activate_past_recording(self) -> None:
        raise _refuse("record past states for a later rollback (assisted decoding)", _NO_REWIND)

    def reset(self) -> None:
        self.cumulative_length = self.start = 0
        self.pending = self.state = self.window = self.sinks = self.terms = self.fast = None
        self.padded = False
        self.built = 0

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized:
            self._map(lambda t: t.to(self.device, non_blocking=True))


class FavorCache(Cache):
    """The constant-size cache of a performerized decoder (module docstring).

    ``FavorCache(model)``: ``model`` is the performerized model (its config says which
    attention implementation runs; anything but favor's raises at the first ``update``).
    Pass it as ``cache=`` to the model's forward, or let ``model.generate`` build it."""

    def __init__(self, model: torch.nn.Module | None = None) -> None:
        super().__init__(layer_class_to_replicate=FavorLayer)
        self._config = None
        self._last: FavorLayer | None = None
        self._last_idx = -1
        if model is not None:
            config = getattr(model, "config", None)
            if config is None:
                raise TypeError(f"model must be a transformers model (with .config), got {type(model).__name__}")
            self._config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if not isinstance(layer_idx, int):
            raise ValueError(f"FavorCache needs the attention module's layer_idx (an int), got {layer_idx!r}")
        # the first update of a forward (the layer index does not rise) asks the config; the
        # later layers of the same forward cannot have switched (and reading the config costs
        # a few microseconds per layer and token)
        last = self._last
        if self._config is not None and (last is None or layer_idx <= self._last_idx):
            implementation = getattr(self._config, "_attn_implementation", None)
            if implementation not in FAVOR_IMPLEMENTATIONS:
                raise RuntimeError(
                    f"FavorCache used with attn_implementation={implementation!r}: it holds FAVOR's recurrent state, "
                    "not the past keys, so only favor's attention function can use it; switch back with "
                    f"model.set_attn_implementation({NAME!r}) or generate with a DynamicCache"
                )
        # only the layer updated last can still be pending (every update checks it, and
        # favor's attention function clears it): one check, not one per layer per layer
        if last is not None and last.pending is not None:
            i = next((j for j, x in enumerate(self.layers) if x is last), "?")
            raise RuntimeError(
                f"FavorCache: layer {i}'s keys never reached favor's attention function (its attention is not "
                "favor's), so its state would miss them; a FavorCache works only with attn_implementation='favor'"
            )
        while len(self.layers) <= layer_idx:
            self.layers.append(FavorLayer())
        self._last, self._last_idx = self.layers[layer_idx], layer_idx
        return self._last.update(key_states, value_states, *args, **kwargs)

    @property
    def nbytes(self) -> int:
        """Bytes held by all layers: constant once the prompt has run (module docstring)."""
        return sum(layer.nbytes for layer in self.layers)

    def activate_past_recording(self) -> None:
        raise _refuse("record past states for a later rollback (assisted decoding)", _NO_REWIND)
