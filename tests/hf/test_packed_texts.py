"""packed_texts: long held-out passages from a split of short ones, cut to exactly a length."""

import string

import pytest

from favor.hf.fidelity import packed_documents, packed_texts, tokenize_batches


@pytest.fixture(scope="module")
def tok():
    from transformers import BertTokenizer

    chars = list(string.ascii_lowercase) + [f"##{c}" for c in string.ascii_lowercase]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars
    return BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)


def test_every_passage_fills_the_length_and_no_line_repeats(tok):
    lines = [("ab " * n).strip() for n in (3, 5, 2, 7, 1, 4, 6, 2, 1, 1)]  # 2n tokens each (char-level)
    packed = packed_texts(tok, lines, length=12)
    # consecutive lines joined until >= 10 real tokens (+ [CLS], [SEP]); the short tail is dropped
    parts = [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert packed == [" ".join(lines[a:b]) for a, b in parts]
    batch = tokenize_batches(tok, packed, max_length=12)[0]
    assert batch["input_ids"].shape == (4, 12) and bool(batch["attention_mask"].all())
    assert packed_texts(tok, lines, length=12, count=2) == packed[:2]


def test_bad_arguments_name_themselves(tok):
    with pytest.raises(ValueError, match="length"):
        packed_texts(tok, ["ab"], length=2)
    with pytest.raises(ValueError, match="count"):
        packed_texts(tok, ["ab"], length=8, count=0)


def test_packed_documents_never_join_two_documents(tok):
    a = [("ab " * n).strip() for n in (3, 5, 2, 7)]  # passages (0, 2), (2, 4) at length 12
    b = [("cd " * n).strip() for n in (6, 6, 6)]  # one line each
    got = packed_documents(tok, [a, b], length=12)
    # one passage of each document in turn, then the rest; the join of a's tail and b's head is never made
    assert got == [" ".join(a[0:2]), b[0], " ".join(a[2:4]), b[1], b[2]]
    assert packed_documents(tok, [a, b], length=12, count=3) == got[:3]
    assert packed_documents(tok, [a], length=12) == packed_texts(tok, a, length=12)
