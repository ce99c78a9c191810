"""Saving and loading performerized models: safetensors only, exact round trip.

The transformers weights go through ``model.save_pretrained`` (safetensors); the FAVOR
buffers (projections, rho, reparametrisation) go to ``favor.safetensors`` beside them and
``favor.json`` records the PerformerConfig, the model class and the attention modules.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from .attention import ATTRIBUTE
from .performerize import CONFIG_KEY, PerformerConfig, attach_adapters
from .registry import NAME, register

__all__ = ["save_pretrained", "from_pretrained", "FAVOR_WEIGHTS", "FAVOR_CONFIG"]

FAVOR_WEIGHTS = "favor.safetensors"
FAVOR_CONFIG = "favor.json"
_FIELDS = tuple(PerformerConfig.__dataclass_fields__)


def _is_favor_key(key: str) -> bool:
    return key.startswith(f"{ATTRIBUTE}.") or f".{ATTRIBUTE}." in key


def save_pretrained(model: nn.Module, directory: str | Path) -> Path:
    """Write a performerized ``model`` to ``directory`` (created); returns the path."""
    from safetensors.torch import save_file

    meta = getattr(model.config, CONFIG_KEY, None)
    if not meta:
        raise ValueError("model is not performerized (no config.favor_performer); call favor.hf.performerize first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    favor_state = {k: v.detach().contiguous().cpu() for k, v in state.items() if _is_favor_key(k)}
    if not favor_state:
        raise ValueError("model has no FAVOR buffers to save")
    model.save_pretrained(directory, state_dict={k: v for k, v in state.items() if not _is_favor_key(k)})
    save_file(favor_state, str(directory / FAVOR_WEIGHTS), metadata={"format": "pt"})
    (directory / FAVOR_CONFIG).write_text(
        json.dumps({"model_class": type(model).__name__, "performer": meta}, indent=2, sort_keys=True) + "\n"
    )
    return directory


def from_pretrained(directory: str | Path, *, model_class=None, **kwargs) -> nn.Module:
    """Load what ``save_pretrained`` wrote: the performerized model, ready to run.

    ``model_class`` defaults to the saved class from ``transformers`` (e.g. BertModel);
    ``kwargs`` go to its ``from_pretrained`` (``torch_dtype``, ``device_map``...)."""
    import transformers
    from safetensors.torch import load_file

    register()
    directory = Path(directory)
    cfg_path = directory / FAVOR_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: {directory} was not written by favor.hf.save_pretrained")
    meta = json.loads(cfg_path.read_text())
    cls = model_class or getattr(transformers, meta["model_class"], None)
    if cls is None:
        raise ValueError(f"transformers has no class {meta['model_class']!r}; pass model_class=")
    model = cls.from_pretrained(directory, attn_implementation="sdpa", **kwargs)
    performer = meta["performer"]
    # fields added later (exact_window, exact_sinks) take their defaults in older saves
    config = PerformerConfig(**{k: performer[k] for k in _FIELDS if k in performer})
    favor_state = load_file(str(directory / FAVOR_WEIGHTS))
    layers = []
    for name in performer["modules"]:
        shift = favor_state.get(f"{name}.{ATTRIBUTE}.key_shift")
        if shift is None:
            raise ValueError(f"{FAVOR_WEIGHTS} has no buffers for attention module {name!r}")
        layers.append((model.get_submodule(name), shift.shape[0], shift.shape[1]))
    adapters = attach_adapters(model, config, layers)
    cross = set(performer.get("cross_attention", ()))  # saved since the cross-attention rule
    for name, adapter in zip(performer["modules"], adapters, strict=True):
        adapter.cross_attention = name in cross
    missing, unexpected = model.load_state_dict(favor_state, strict=False)
    # the far gain (exact local terms) came later: older saves keep its 0
    missing = [k for k in missing if _is_favor_key(k) and not k.endswith(".far_log_gain")]
    if missing or unexpected:
        raise ValueError(f"{FAVOR_WEIGHTS} does not match the model: missing {missing}, unexpected {unexpected}")
    setattr(model.config, CONFIG_KEY, performer)
    model.set_attn_implementation(NAME)
    model.eval()
    return model
