"""favor.hf: Performer attention inside Hugging Face transformers models (extra ``favor[hf]``).

    >>> import favor.hf
    >>> model = favor.hf.performerize(model, calibration=batches)
    >>> favor.hf.save_pretrained(model, "out/")
    >>> model = favor.hf.from_pretrained("out/")

By default (``from favor.hf.performerize import DEFAULTS``, the command-line tools' too; the
attribute ``favor.hf.performerize`` is the function) the features are dense-exponential
("derf"), and ``exact_window=8, exact_sinks=1, exact_block=32`` computes each query's block
of 32 positions widened by 8, and the first token, exactly and FAVOR the rest
(favor.ops.local), still linear in length (a model with causal layers: the window and sinks
only).
``plain=True`` is the paper's estimator, FAVOR alone (``kernel="positive"``: FAVOR+).

A model whose attention FAVOR cannot reproduce (a position bias, soft-capping, attention
sinks, a sliding window, ...) raises ``UnsupportedAttentionError`` naming the feature
(favor.hf.refusals); cross-attention runs plain FAVOR (favor.ops.cross).

``model.generate`` of a performerized decoder keeps a constant-size ``FavorCache`` (FAVOR's
recurrent state per layer, plus the exact terms' last tokens): O(1) work and memory per token.

Importing this package registers ``attn_implementation="favor"`` with transformers.
"""

from ..features.headwise import HeadwiseFeatureMap
from .adapter import FavorAdapter, balancing_map
from .cache import FavorCache, FavorLayer
from .generation import use_favor_cache
from .interface import favor_attention_forward
from .io import from_pretrained, save_pretrained
from .masks import MaskPlan, plan_from_mask
from .performerize import PerformerConfig, performerize
from .refusals import UnsupportedAttentionError
from .registry import NAME, register

register()

__all__ = [
    "NAME",
    "register",
    "performerize",
    "PerformerConfig",
    "save_pretrained",
    "from_pretrained",
    "favor_attention_forward",
    "FavorAdapter",
    "HeadwiseFeatureMap",
    "balancing_map",
    "FavorCache",
    "FavorLayer",
    "use_favor_cache",
    "MaskPlan",
    "plan_from_mask",
    "UnsupportedAttentionError",
]
