"""Training Performer language models: the loop, checkpoints, and the demo's comparison.

- ``loop``: ``train`` (deterministic, resumable, logged; text or proteins, causal or
  masked), ``TrainConfig``, ``PRESETS``, ``resolve_config``, ``evaluate_bits``,
  ``evaluate_bpr``, ``load_lm``, ``plot_log``.
- ``checkpoint``: safetensors + JSON checkpoints written atomically (no pickle).
- ``demo``: ``run_demo``, the whole ``favor demo`` (approximation, speed, language models),
  and ``lm_demo``, FAVOR vs softmax LMs trained side by side (its parts c and d).

The dependency runs one way: demo -> loop -> checkpoint.
"""

from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, load_model_state, save_checkpoint
from .demo import lm_demo
from .loop import PRESETS, TrainConfig, evaluate_bits, evaluate_bpr, load_lm, plot_log, resolve_config, train

__all__ = [
    "train",
    "TrainConfig",
    "PRESETS",
    "resolve_config",
    "evaluate_bpr",
    "evaluate_bits",
    "load_lm",
    "plot_log",
    "lm_demo",
    "save_checkpoint",
    "load_checkpoint",
    "load_model_state",
    "Checkpoint",
    "CheckpointError",
]
