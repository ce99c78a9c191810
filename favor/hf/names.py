"""The attention-implementation names favor registers with transformers (registry.py);
a module of its own so that the cache can name them without importing the registry."""

__all__ = ["NAME", "PROBE", "OBSERVE"]

#: the attn_implementation name
NAME = "favor"
#: softmax attention that also reports each call's queries and keys (calibration)
PROBE = "favor_probe"
#: FAVOR attention that also hands each call's inputs and output to an observer (distillation)
OBSERVE = "favor_observe"
