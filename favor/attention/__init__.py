"""Attention as pure functions on tensors: the fast paths and their exact references.

The package itself is callable: ``favor.attention(q, k, v, feature_map, ...)`` is
``favor.attention.api.attention``, and submodules stay importable
(``favor.attention.causal``, ``favor.attention.reference``, ...).
"""

import sys
import types

from .api import attention
from .bidirectional import bidirectional
from .causal import causal_chunked
from .recurrent import step
from .reference import kernel_attention, kernel_matrix, softmax_attention
from .state import State

__all__ = [
    "attention",
    "bidirectional",
    "causal_chunked",
    "step",
    "State",
    "softmax_attention",
    "kernel_attention",
    "kernel_matrix",
]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return attention(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
