"""Saving and loading performerized models: safetensors only, exact round trip.

The transformers weights go through ``model.save_pretrained`` (safetensors); the FAVOR
buffers (projections, rho, reparametrisation) go to ``favor.safetensors`` beside them and
``favor.json`` records the PerformerConfig, the model class and the attention modules.

Loading trusts nothing in the directory: only safetensors files are read (never a pickle,
so a tampered file cannot run code), favor.json must name a transformers model class and
a valid PerformerConfig, and every weight and buffer must be present with the shape the
model expects; anything else is a ValueError naming the file and what was expected.
"""

from __future__ import annotations

import json
from pathlib import Path

import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .adapter import ATTRIBUTE
from .generation import use_favor_cache
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


#: options from_pretrained sets itself: safetensors only, and the loading report it checks
_FORCED = ("use_safetensors", "output_loading_info", "weights_only")


def _read_favor_json(path: Path) -> dict:
    """favor.json, checked: {"model_class": str, "performer": {..., "modules": [str, ...]}}."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON (edited or truncated?): {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model_class"), str):
        raise ValueError(f"{path} should be a JSON object with a string 'model_class', got {str(meta)[:100]!r}")
    performer = meta.get("performer")
    modules = performer.get("modules") if isinstance(performer, dict) else None
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
        raise ValueError(f"{path}: 'performer' should be an object whose 'modules' is a non-empty list of names")
    return meta


def _model_class(name: str, path: Path):
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)) or name.startswith("Auto"):
        raise ValueError(f"{path}: model_class {name!r} is not a transformers model class (e.g. 'BertModel')")
    return cls


def _load_model(cls, directory: Path, kwargs: dict) -> nn.Module:
    """``cls.from_pretrained`` from safetensors only; missing, unexpected or mis-shaped
    weights are an error (transformers would initialise them at random and carry on)."""
    for name in _FORCED:
        if name in kwargs:
            raise TypeError(f"from_pretrained sets {name!r} itself (safetensors only, checked); do not pass it")
    try:
        model, info = cls.from_pretrained(
            directory, attn_implementation="sdpa", use_safetensors=True, output_loading_info=True, **kwargs
        )
    except (OSError, RuntimeError, ValueError) as e:  # SafetensorError is an Exception: caught below
        found = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt*"))
        hint = f" (favor never loads pickle files; found {found})" if found else ""
        if "mismatch" in str(e):
            hint += f" (the sizes in {directory / 'config.json'} do not match the weights)"
        raise ValueError(
            f"cannot load the transformers weights (model.safetensors) in {directory}{hint}: {e}"
        ) from None
    except Exception as e:
        if type(e).__name__ != "SafetensorError":
            raise
        raise ValueError(f"{directory / 'model.safetensors'} is not a valid safetensors file: {e}") from None
    bad = {k: info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    bad = {k: sorted(map(str, v))[:5] for k, v in bad.items() if v}
    if bad:
        raise ValueError(f"{directory / 'model.safetensors'} does not match {directory / 'config.json'}: {bad}")
    return model


def from_pretrained(directory: str | Path, *, model_class=None, **kwargs) -> nn.Module:
    """Load what ``save_pretrained`` wrote: the performerized model, ready to run.

    ``model_class`` defaults to the saved class from ``transformers`` (e.g. BertModel);
    ``kwargs`` go to its ``from_pretrained`` (``torch_dtype``, ``device_map``...). Only
    safetensors files are read; a directory that does not match what save_pretrained
    writes raises ValueError naming the file."""
    register()
    directory = Path(directory)
    cfg_path = directory / FAVOR_CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: {directory} was not written by favor.hf.save_pretrained")
    meta = _read_favor_json(cfg_path)
    cls = model_class or _model_class(meta["model_class"], cfg_path)
    performer = meta["performer"]
    # fields added later (exact_window, exact_sinks, exact_block) take their defaults in older saves
    try:
        config = PerformerConfig(**{k: performer[k] for k in _FIELDS if k in performer})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: bad performer config: {e}") from None
    weights = directory / FAVOR_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: the FAVOR buffers are missing")
    try:
        favor_state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise ValueError(
            f"{weights} is not a valid safetensors file (a pickle? favor never loads those): {e}"
        ) from None
    model = _load_model(cls, directory, kwargs)
    layers = []
    for name in performer["modules"]:
        shift = favor_state.get(f"{name}.{ATTRIBUTE}.key_shift")
        if shift is None or shift.ndim != 2:
            raise ValueError(
                f"{weights} has no (heads, head dim) key_shift for attention module {name!r} of {cfg_path}"
            )
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"{cfg_path} names attention module {name!r}, which {cls.__name__} does not have"
            ) from None
        layers.append((module, shift.shape[0], shift.shape[1]))
    adapters = attach_adapters(model, config, layers)
    cross = set(performer.get("cross_attention", ()))  # saved since the cross-attention rule
    for name, adapter in zip(performer["modules"], adapters, strict=True):
        adapter.cross_attention = name in cross
    own = model.state_dict()
    shapes = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in favor_state.items()
        if k in own and v.shape != own[k].shape
    ]
    # the far gain (exact local terms) came later: older saves keep its 0
    missing = [k for k in own if _is_favor_key(k) and k not in favor_state and not k.endswith(".far_log_gain")]
    unexpected = [k for k in favor_state if k not in own]
    if shapes or missing or unexpected:
        raise ValueError(
            f"{weights} does not match {cfg_path}: shape mismatches {shapes[:5]}, missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    model.load_state_dict(favor_state, strict=False)
    setattr(model.config, CONFIG_KEY, performer)
    model.set_attn_implementation(NAME)
    use_favor_cache(model)
    model.eval()
    return model
