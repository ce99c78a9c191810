"""favor: Performer (FAVOR+) attention for PyTorch.

>>> import torch, favor
>>> fm = favor.FeatureMap("positive", dim=64, num_features=256)
>>> q = k = v = torch.randn(2, 8, 1024, 64)
>>> out = favor.attention(q, k, v, fm, causal=True)
"""

from .features import (
    KERNELS,
    FeatureMap,
    default_num_features,
    projections,  # favor.projections: the random projection matrices
)
from .ops import State, attention, kernel_attention, kernel_matrix, softmax_attention, step
from .ops.local.recurrent import ExactState
from .ops.local.spec import ExactTerms

__version__ = "0.1.0"

__all__ = [
    "attention",
    "step",
    "State",
    "ExactTerms",
    "ExactState",
    "softmax_attention",
    "kernel_attention",
    "kernel_matrix",
    "FeatureMap",
    "KERNELS",
    "default_num_features",
    "projections",
    "__version__",
]
