"""favor.data.english: the shipped mixed English corpus and its train / held-out passages."""

import gzip
from importlib import resources

import pytest
import torch

from favor.data.english import (
    DOMAINS,
    HELDOUT_DOMAIN,
    LINE_CHARS,
    TRAIN_DOMAINS,
    domain_text,
    lines,
    passages,
    text_passages,
)
from favor.data.kjv import load_text


class Bytes:
    """A stand-in tokenizer: one token per UTF-8 byte (decode is exact)."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(text.encode("utf-8"))}

    @staticmethod
    def decode(ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_shipped_extracts_are_the_documented_ones():
    # characters as favor/data/NOTICE states them; a few hundred KB gzipped in all
    sizes = {"austen": 308_383, "dictionary": 254_593, "python-docs": 460_605}
    for domain, chars in sizes.items():
        assert len(domain_text(domain)) == chars, domain
    gz = sum(len(resources.files("favor.data").joinpath(DOMAINS[d]).read_bytes()) for d in sizes)
    assert 200_000 < gz < 500_000
    assert domain_text("austen").startswith("PRIDE AND PREJUDICE")
    assert domain_text("bible").startswith("In the beginning God created")
    assert "Zope \\Zope\\, n. [G.] (Zool.)" in domain_text("dictionary")  # the sample reaches Z
    assert ">>> " in domain_text("python-docs")
    notice = resources.files("favor.data").joinpath("NOTICE").read_text()
    for name in ("austen.txt.gz", "gcide.txt.gz", "python_docs.txt.gz", "GNU General Public License", "PSF"):
        assert name in notice
    assert gzip.decompress(resources.files("favor.data").joinpath("austen.txt.gz").read_bytes())


def test_the_held_out_domain_is_not_in_the_training_mix():
    assert HELDOUT_DOMAIN not in TRAIN_DOMAINS and set(TRAIN_DOMAINS) | {HELDOUT_DOMAIN} == set(DOMAINS)
    train = "".join(domain_text(d) for d in TRAIN_DOMAINS)
    lines = [ln for ln in domain_text(HELDOUT_DOMAIN).splitlines() if len(ln) > 60]
    assert len(lines) > 1000
    assert not any(ln in train for ln in lines[::10])


def test_passages_are_contiguous_text_of_one_domain_taken_in_turn():
    tok = Bytes()
    got = passages(tok, "train", length=1000, count=7)
    assert got.shape == (7, 1000) and got.dtype == torch.long
    texts = {d: domain_text(d).encode("utf-8") for d in TRAIN_DOMAINS}
    for i, row in enumerate(got):
        domain = TRAIN_DOMAINS[i % 3]
        k = i // 3
        assert bytes(row.tolist()) == texts[domain][k * 1000 : (k + 1) * 1000], (i, domain)
    held = passages(tok, "heldout", length=4096)
    assert held.shape == (len(domain_text(HELDOUT_DOMAIN).encode()) // 4096, 4096)
    assert bytes(held[1].tolist()) == domain_text(HELDOUT_DOMAIN).encode()[4096:8192]
    # the shorter domains run out first; the rest keep their order
    everything = passages(tok, "train", length=100_000)
    assert len(everything) == sum(len(t) // 100_000 for t in texts.values())
    only = passages(tok, "train", length=500, count=2, domains=("austen",))
    assert bytes(only.flatten().tolist()) == texts["austen"][:1000]


def test_passages_refuse_bad_requests():
    tok = Bytes()
    with pytest.raises(ValueError, match="split must be 'train' or 'heldout'"):
        passages(tok, "test", length=10)
    with pytest.raises(ValueError, match="length must be an int >= 2"):
        passages(tok, "train", length=1)
    with pytest.raises(ValueError, match=r"shorter than one passage of 10000000 tokens"):
        passages(tok, "heldout", length=10_000_000)
    with pytest.raises(ValueError, match="domain must be one of"):
        passages(tok, "train", length=10, domains=("news",))


def test_lines_are_a_domains_paragraphs_in_order():
    assert lines("bible") == load_text("train")  # the KJV's shipped three-verse lines
    for domain in ("austen", "dictionary", "python-docs"):
        got = lines(domain)
        # every line but the last holds LINE_CHARS characters; nothing is lost or reordered
        assert all(len(ln) >= LINE_CHARS for ln in got[:-1]) and len(got) > 400, domain
        assert " ".join(got).split() == domain_text(domain).split(), domain
    with pytest.raises(ValueError, match="domain must be one of"):
        lines("news")


def test_a_text_file_that_is_not_utf8_is_refused_by_name(tmp_path):
    # news text in Latin-1 (a pound sign) used to fail deep inside with a bare UnicodeDecodeError
    f = tmp_path / "news.txt"
    f.write_bytes("Prices rose to \u00a3300 today.\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"news.txt.*not UTF-8 \(byte 0xa3 at offset 15\).*iconv"):
        load_text(f)
    f.write_text("Prices rose to \u00a3300 today.\n", encoding="utf-8")
    assert load_text(f) == ["Prices rose to \u00a3300 today."]


def test_text_passages_cut_each_text_and_take_them_in_turn():
    tok = Bytes()
    got = text_passages(tok, ["a" * 25, "b" * 10, "c" * 3], length=5)
    assert [bytes(r.tolist()).decode() for r in got] == ["aaaaa", "bbbbb", "aaaaa", "bbbbb"] + ["aaaaa"] * 3
    assert len(text_passages(tok, ["a" * 25, "b" * 10], length=5, count=3)) == 3
    with pytest.raises(ValueError, match="news.txt is shorter than one passage of 4 tokens"):
        text_passages(tok, ["abc"], length=4, name="news.txt")


def test_causal_texts_keep_layout_and_mix_with_plus(tmp_path):
    from favor.hf.models import causal_texts

    assert causal_texts("python-docs") == [domain_text("python-docs")]  # line breaks and code kept
    assert causal_texts("english") == [domain_text(d) for d in TRAIN_DOMAINS]
    news = tmp_path / "news.txt"
    news.write_text("First article.\n\nSecond article.\n", encoding="utf-8")
    assert causal_texts(news) == ["First article.\nSecond article.\n"]
    assert causal_texts(f"austen+{news}") == [domain_text("austen"), "First article.\nSecond article.\n"]
    with pytest.raises(FileNotFoundError, match="text must be 'english'.*got 'nosuch.txt'"):
        causal_texts("nosuch.txt")
    with pytest.raises(ValueError, match="joins names or files with '\\+'"):
        causal_texts("austen+")
