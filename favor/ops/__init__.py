"""favor.ops: attention as pure functions on tensors, the fast paths and their exact references.

``favor.attention`` is ``favor.ops.api.attention`` and ``favor.step`` is
``favor.ops.recurrent.step``; the paths themselves are submodules (``favor.ops.causal``,
``favor.ops.reference``, ``favor.ops.local`` for exact local terms, ...). The helpers the
paths share are public modules here: ``checks`` (argument validation), ``chunking`` (chunk
slices, scratch buffers, autograd plumbing), ``row_features`` (the fast paths' row-wise
features), ``normalise`` (numerator / normaliser).
"""

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
