"""favor: Performer (FAVOR+) attention for PyTorch.

>>> import torch, favor
>>> fm = favor.FeatureMap("positive", dim=64, num_features=256)
>>> q = k = v = torch.randn(2, 8, 1024, 64)
>>> out = favor.attention(q, k, v, fm, causal=True)
"""

from . import attention  # favor.attention is callable (see favor/attention/__init__.py)
from .attention import State, kernel_attention, kernel_matrix, softmax_attention, step
from .attention.local.recurrent import ExactState
from .attention.local.spec import ExactTerms
from .features import (
    KERNELS,
    FeatureMap,
    default_num_features,
    projections,  # favor.projections: the random projection matrices
)

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
