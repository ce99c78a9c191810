"""A small mixed English corpus for causal LMs: several domains, one held out.

Domains (favor/data/NOTICE gives the sources and licences; ``build_extracts`` rebuilds them):

- ``bible``: King James Bible, Genesis, Proverbs and Matthew (favor.data.kjv's "train"
  split, shipped there; its Psalms, Luke and Acts are never used here);
- ``austen``: Jane Austen, the opening chapters of *Pride and Prejudice* (``austen.txt.gz``);
- ``dictionary``: GCIDE entries (the 1913 Webster and its additions), an evenly spaced
  sample of the whole alphabet (``gcide.txt.gz``);
- ``python-docs``: the Python 3.11 tutorial and five HOWTOs as reST source, prose with code
  (``python_docs.txt.gz``).

``TRAIN_DOMAINS`` (bible, austen, dictionary) is the training mix; ``HELDOUT_DOMAIN``
(python-docs) is held out: no text of it is in the training mix, and it is a different
register (technical prose and code), so held-out perplexity measures transfer, not memory.

``passages(tokenizer, "train" | "heldout", length=N)`` cuts each domain's text, tokenized
as one stream, into consecutive N-token passages (token ids, no special tokens): a passage
is contiguous text of one domain; training passages take the domains in turn.

``lines(domain)`` gives a domain's text as short passages of text instead (a sentence
encoder's training lines; favor distill packs consecutive lines of one domain into longer
passages): KJV's three-verse lines, and for the others consecutive paragraphs joined until
each line holds at least ``LINE_CHARS`` characters (about KJV's lines: 342 characters).
"""

from __future__ import annotations

import gzip
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import torch

from .austen import read_austen
from .kjv import load_text

__all__ = [
    "DOMAINS",
    "TRAIN_DOMAINS",
    "HELDOUT_DOMAIN",
    "LINE_CHARS",
    "domain_text",
    "text_passages",
    "lines",
    "passages",
    "build_extracts",
]

#: domain -> shipped file in favor.data (bible: favor.data.kjv's "train" split)
DOMAINS = {
    "bible": None,
    "austen": "austen.txt.gz",
    "dictionary": "gcide.txt.gz",
    "python-docs": "python_docs.txt.gz",
}
TRAIN_DOMAINS = ("bible", "austen", "dictionary")
HELDOUT_DOMAIN = "python-docs"


def domain_text(domain: str) -> str:
    """The shipped text of one domain of ``DOMAINS``."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {sorted(DOMAINS)}, got {domain!r}")
    if DOMAINS[domain] is None:
        return "\n".join(load_text("train")) + "\n"
    data = resources.files("favor.data").joinpath(DOMAINS[domain]).read_bytes()
    return gzip.decompress(data).decode("utf-8")


#: a line of ``lines``: consecutive paragraphs joined until it holds this many characters
LINE_CHARS = 300


def lines(domain: str) -> list[str]:
    """One domain's text as lines (short passages) in order: the KJV's lines as favor.hf.corpus
    ships them (three verses each); otherwise paragraphs (blocks between blank lines; Austen's
    paragraphs, GCIDE's entries, the docs' paragraphs and code blocks), their line breaks made
    spaces, consecutive ones joined with a space until a line holds ``LINE_CHARS`` characters
    (a last shorter line is kept)."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {sorted(DOMAINS)}, got {domain!r}")
    if DOMAINS[domain] is None:
        return load_text("train")
    out, parts, chars = [], [], 0
    for block in domain_text(domain).split("\n\n"):
        para = " ".join(ln.strip() for ln in block.splitlines() if ln.strip())
        if not para:
            continue
        chars += len(para) + bool(parts)  # the joined line's length
        parts.append(para)
        if chars >= LINE_CHARS:
            out.append(" ".join(parts))
            parts, chars = [], 0
    if parts:
        out.append(" ".join(parts))
    return out


def text_passages(
    tokenizer, texts: list[str], *, length: int, count: int | None = None, name: str = "the text"
) -> torch.Tensor:
    """(P, length) token ids: each text cut into consecutive ``length``-token passages (its last
    partial passage dropped), one passage of each text in turn while every text has one left,
    then the rest of the longer ones; at most ``count``. Fewer than one passage is a ValueError
    naming ``name``."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 2:
        raise ValueError(f"length must be an int >= 2, got {length!r}")
    cut = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        n = len(ids) // length
        cut.append(torch.tensor(ids[: n * length], dtype=torch.long).reshape(n, length))
    order = [c[i] for i in range(max((len(c) for c in cut), default=0)) for c in cut if i < len(c)]
    if not order:
        raise ValueError(f"{name} is shorter than one passage of {length} tokens")
    return torch.stack(order[:count] if count is not None else order)


def passages(
    tokenizer,
    split: str = "heldout",
    *,
    length: int,
    count: int | None = None,
    domains: tuple[str, ...] | None = None,
) -> torch.Tensor:
    """(P, length) token ids: consecutive ``length``-token passages of the domains' texts
    (``text_passages``).

    ``split`` "train": ``TRAIN_DOMAINS`` (bible, austen, dictionary), one passage of each in
    turn while every domain has one left, then the rest of the longer ones; "heldout":
    ``HELDOUT_DOMAIN`` (python-docs), never in the training mix. ``domains`` overrides the
    split's domains. At most ``count`` passages (all the text gives when None); a domain's
    last partial passage is dropped. Fewer than one passage is a ValueError."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    names = domains if domains is not None else (TRAIN_DOMAINS if split == "train" else (HELDOUT_DOMAIN,))
    texts = [domain_text(d) for d in names]
    return text_passages(tokenizer, texts, length=length, count=count, name=f"the {split} text ({', '.join(names)})")


# -- rebuilding the shipped extracts (Debian packages; needs apt-get and dpkg) ----------------

#: python-docs: these reST sources of Debian's python3.11-doc, in this order
PYTHON_DOCS = (
    "tutorial/appetite",
    "tutorial/interpreter",
    "tutorial/introduction",
    "tutorial/controlflow",
    "tutorial/datastructures",
    "tutorial/modules",
    "tutorial/inputoutput",
    "tutorial/errors",
    "tutorial/classes",
    "tutorial/stdlib",
    "tutorial/stdlib2",
    "tutorial/venv",
    "tutorial/whatnow",
    "tutorial/interactive",
    "tutorial/floatingpoint",
    "tutorial/appendix",
    "howto/sorting",
    "howto/unicode",
    "howto/functional",
    "howto/regex",
    "howto/descriptor",
)
#: austen: the first characters of Pride and Prejudice, cut at the chapter that starts after
AUSTEN_CHARS = 300_000
#: dictionary: evenly spaced entries (every k-th, k chosen from the total) of about GCIDE_CHARS characters
GCIDE_CHARS = 250_000


def _unpack(package: str, root: Path) -> Path:
    dest = root / package
    if not dest.is_dir():
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            subprocess.run(["apt-get", "download", package], cwd=tmp, check=True, capture_output=True)
            deb = next(Path(tmp).glob(f"{package}_*.deb"))
            subprocess.run(["dpkg", "-x", str(deb), str(dest)], check=True, capture_output=True)
    return dest


def _gcide_entries(text: str) -> list[str]:
    """Dictionary entries: blocks that start at column 0 after a blank line (headword lines)."""
    entries, block = [], []
    for line in text.splitlines():
        if not line.strip():
            if block:
                entries.append("\n".join(block))
                block = []
            continue
        if block or not line[0].isspace():
            block.append(line.rstrip())
    if block:
        entries.append("\n".join(block))
    return [e for e in entries if "\\" in e.split("\n", 1)[0]]  # headword lines carry \pro*nun*ci*a"tion\


def build_extracts(out: str | Path, *, root: str | Path) -> dict[str, int]:
    """Write ``austen.txt.gz``, ``gcide.txt.gz`` and ``python_docs.txt.gz`` to ``out`` from
    Debian's r-cran-janeaustenr, dict-gcide and python3.11-doc (downloaded into ``root`` once);
    returns characters per file."""
    out, root = Path(out), Path(root)
    out.mkdir(parents=True, exist_ok=True)
    texts = {}
    rdb = _unpack("r-cran-janeaustenr", root) / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
    novel = read_austen(rdb)["prideprejudice"]
    stop = novel.find("\nChapter ", AUSTEN_CHARS)
    texts["austen.txt.gz"] = novel[: stop if stop > 0 else AUSTEN_CHARS].strip() + "\n"
    dz = _unpack("dict-gcide", root) / "usr/share/dictd/gcide.dict.dz"
    entries = _gcide_entries(gzip.decompress(dz.read_bytes()).decode("utf-8", errors="replace"))
    step = sum(len(e) + 2 for e in entries) // GCIDE_CHARS + 1
    texts["gcide.txt.gz"] = "\n\n".join(entries[::step]) + "\n"
    src = _unpack("python3.11-doc", root) / "usr/share/doc/python3.11/html/_sources"
    texts["python_docs.txt.gz"] = "\n\n".join((src / f"{n}.rst.txt").read_text("utf-8").strip() for n in PYTHON_DOCS)
    for name, text in texts.items():
        (out / name).write_bytes(gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0))
    return {name: len(text) for name, text in texts.items()}
