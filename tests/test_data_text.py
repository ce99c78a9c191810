"""Text training data (favor/data/text.py, favor/data/source.py): format detection,
directories, the held-out tail, masking and errors."""

import gzip

import pytest
import torch

from favor.data import ByteTokenizer, data_files, detect_format, load_training_data, mask_tokens, model_vocab
from favor.data.source import IGNORE


def _write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("p.fasta", "MKV\n", "fasta"),  # the extension decides, even without a header
        ("p.fa.gz", ">a\nMKV\n", "fasta"),
        ("p.faa", ">a\nMKV\n", "fasta"),
        ("p.txt", "\n  >a\nMKV\n", "fasta"),  # a leading '>' after blank space
        ("p.txt", "Call me Ishmael.\n", "text"),
        ("p.txt.gz", "Call me > Ishmael.\n", "text"),
        ("notes", "a > b\n", "text"),
    ],
)
def test_detect_format_by_extension_or_leading_angle(tmp_path, name, text, expected):
    assert detect_format(_write(tmp_path / name, text)) == expected


def test_fasta_and_text_give_their_units_and_vocabularies(tmp_path):
    fasta = _write(tmp_path / "p.txt", "".join(f">p{i}\n{'MKVLAG' * 10}\n" for i in range(40)))
    text = _write(tmp_path / "t.txt", "héllo wörld " * 100)
    f, t = load_training_data(fasta), load_training_data(text)
    assert (f.format, f.unit, f.vocab_size) == ("fasta", "residue", 28)
    assert (t.format, t.unit, t.vocab_size) == ("text", "byte", 256)
    assert model_vocab(text, objective="masked") == 257  # bytes have no mask id: one is added
    assert load_training_data(text, objective="masked").mask_id == 256
    # text is read as UTF-8 bytes: 2 bytes per accented letter
    assert len(t.train) + len(t.heldout) == len("héllo wörld ".encode()) * 100


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode("naïve ☃")
    assert ids.tolist() == list("naïve ☃".encode()) and tok.decode(ids) == "naïve ☃"
    with pytest.raises(ValueError, match="byte ids"):
        tok.decode([300])


def test_directory_reads_sorted_files_and_refuses_a_mix(tmp_path):
    _write(tmp_path / "d" / "b.txt", "BBBB")
    _write(tmp_path / "d" / "a.txt", "AAAA")
    _write(tmp_path / "d" / ".hidden.txt", "HHHH")
    _write(tmp_path / "d" / "sub" / "c.txt.gz", "CCCC")
    assert [p.name for p in data_files(tmp_path / "d")] == ["a.txt", "b.txt", "c.txt.gz"]
    d = load_training_data(tmp_path / "d", val_fraction=0.25)
    joined = bytes(d.train.tokens.tolist() + d.heldout.tokens.tolist()).decode()
    assert joined == "AAAA\nBBBB\nCCCC"
    _write(tmp_path / "d" / "z.fasta", ">a\nMKV\n")
    with pytest.raises(ValueError, match="mixes FASTA and text"):
        load_training_data(tmp_path / "d")


def test_heldout_tail_never_reaches_training_windows(tmp_path):
    # the last 5 % is a letter the rest never uses: a training window that reached into the
    # tail would contain it
    head, tail = "abcdefgh" * 1900, "Z" * 800
    d = load_training_data(_write(tmp_path / "t.txt", head + tail))
    assert len(d.heldout) == round(0.05 * (len(head) + len(tail)))
    assert set(d.heldout.tokens.tolist()) == {ord("Z")}
    seen = set()
    for step in range(200):
        x, y = d.batch(8, 64, torch.Generator().manual_seed(step))
        seen |= set(x.unique().tolist()) | set(y.unique().tolist())
    assert ord("Z") not in seen and seen == set(map(ord, "abcdefgh"))
    # the tail end of the training stream is still reachable: the split is not wider than it says
    assert d.train.tokens[-1] == ord("h") and len(d.train) == len(head) + len(tail) - len(d.heldout)
    hx, hy = d.heldout_windows(64, 4)
    assert hx.shape == (4, 64) and bool((hx == ord("Z")).all())


def test_eval_data_is_the_heldout_set_and_all_of_data_trains(tmp_path):
    data = _write(tmp_path / "train.txt", "abc" * 100)
    other = _write(tmp_path / "eval.txt", "xyz" * 50)
    d = load_training_data(data, eval_data=other)
    assert len(d.train) == 300 and bytes(d.heldout.tokens.tolist()) == b"xyz" * 50
    with pytest.raises(ValueError, match="is fasta but data"):
        load_training_data(data, eval_data=_write(tmp_path / "e.fasta", ">a\nMKV\n"))


def test_mask_tokens_follows_the_recipe():
    tokens = torch.randint(0, 250, (64, 256), generator=torch.Generator().manual_seed(0))
    x, y = mask_tokens(tokens, mask_id=256, vocab_size=256, generator=torch.Generator().manual_seed(1))
    x2, y2 = mask_tokens(tokens, mask_id=256, vocab_size=256, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, x2) and torch.equal(y, y2)  # a function of the generator
    chosen = y != IGNORE
    assert bool(chosen.any(dim=1).all())  # every row predicts something
    assert torch.equal(y[chosen], tokens[chosen]) and torch.equal(x[~chosen], tokens[~chosen])
    # 16,384 positions: the shares are within a few standard errors of 15 % and 80/10/10
    rate = chosen.float().mean().item()
    assert 0.13 < rate < 0.17
    masked = (x[chosen] == 256).float().mean().item()
    kept = (x[chosen] == tokens[chosen]).float().mean().item()
    assert 0.76 < masked < 0.84 and 0.07 < kept < 0.14


def test_masked_batches_are_seeded_and_tiny_rows_predict_something(tmp_path):
    d = load_training_data(_write(tmp_path / "t.txt", "abcd" * 200), objective="masked")
    x, y = d.batch(16, 4, torch.Generator().manual_seed(3))
    x2, y2 = d.batch(16, 4, torch.Generator().manual_seed(3))
    assert torch.equal(x, x2) and torch.equal(y, y2) and x.shape == (16, 4)
    assert bool((y != IGNORE).any(dim=1).all())
    hx, hy = d.heldout_windows(4, 3, seed=0)
    assert torch.equal(hy, d.heldout_windows(4, 3, seed=0)[1])


def test_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_training_data(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match="empty: no text in .*empty.txt"):
        load_training_data(_write(tmp_path / "empty.txt", ""))
    (tmp_path / "void").mkdir()
    with pytest.raises(ValueError, match="void holds no files"):
        load_training_data(tmp_path / "void")
    with pytest.raises(ValueError, match="tokenizer applies to text"):
        load_training_data(_write(tmp_path / "p.fasta", ">a\nMKV\n"), tokenizer=tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer directory"):
        load_training_data(_write(tmp_path / "t.txt", "abc"), tokenizer=tmp_path / "no_tok")
    with pytest.raises(ValueError, match="objective must be one of"):
        load_training_data(tmp_path / "t.txt", objective="denoise")
    short = load_training_data(_write(tmp_path / "short.txt", "abc" * 40))
    with pytest.raises(ValueError, match="held-out data has 6 tokens, too few for one window of context 64"):
        short.heldout_windows(64, 1)


def test_hugging_face_tokenizer_directory(tmp_path):
    transformers = pytest.importorskip("transformers", reason="--tokenizer needs the `hf` extra")
    words = "the quick brown fox jumps over lazy dog .".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    transformers.BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(tmp_path / "tok")
    text = _write(tmp_path / "t.txt", "The quick brown fox jumps over the lazy dog. " * 50)
    d = load_training_data(text, tokenizer=tmp_path / "tok")
    assert (d.unit, d.vocab_size) == ("token", len(vocab))
    assert len(d.train) + len(d.heldout) == 10 * 50  # 10 word tokens a sentence
    assert d.train.tokens[:10].tolist() == [
        vocab.index(w) for w in "the quick brown fox jumps over the lazy dog .".split()
    ]
    masked = load_training_data(text, tokenizer=tmp_path / "tok", objective="masked")
    assert (masked.vocab_size, masked.mask_id) == (len(vocab), vocab.index("[MASK]"))  # its own mask token
