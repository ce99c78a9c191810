"""Embedded protein corpus, tokenizer, split and token stream."""

import gzip

import pytest
import torch

from favor.data import ProteinTokenizer, TokenStream, load_proteins, read_fasta, split, write_fasta
from favor.data.swissprot import extract


@pytest.fixture(scope="module")
def proteins():
    return load_proteins()


def test_embedded_extract_is_the_documented_one(proteins):
    # numbers from favor/data/NOTICE
    assert len(proteins) == 8000
    assert sum(len(s) for _, s in proteins) == 3_060_485
    assert max(len(s) for _, s in proteins) <= 4096
    accs = [a for a, _ in proteins]
    assert accs == sorted(accs) and len(set(accs)) == len(accs)
    assert all(set(s) <= set("ACDEFGHIKLMNPQRSTVWYXBZUO") for _, s in proteins[:200])


def test_tokenizer_round_trip_and_unknowns():
    tok = ProteinTokenizer()
    assert tok.vocab_size == 28
    ids = tok.encode("MKVLA", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.decode(ids) == "MKVLA"
    assert tok.decode(tok.encode("mkJ*")) == "MKXX"
    assert tok.is_residue(ids).tolist() == [False, True, True, True, True, True, False]
    with pytest.raises(ValueError, match="token ids must lie"):
        tok.decode([99])


def test_split_is_fixed_by_seed_and_disjoint(proteins):
    tr, va = split(proteins, val_fraction=0.05, seed=0)
    tr2, va2 = split(proteins, val_fraction=0.05, seed=0)
    assert va == va2 and len(va) == 400 and len(tr) == 7600
    assert not {a for a, _ in tr} & {a for a, _ in va}
    assert split(proteins, seed=1)[1] != va


def test_token_stream_batches_are_seeded_windows():
    recs = [("a", "MKV"), ("b", "ACDEFGH"), ("c", "WY")]
    s = TokenStream(recs)
    tok = ProteinTokenizer()
    assert tok.decode(s.tokens) == "MKVACDEFGHWY" and len(s) == 3 + 7 + 2 + 6
    x, y = s.batch(4, 5, torch.Generator().manual_seed(0))
    x2, _ = s.batch(4, 5, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 5) and torch.equal(x, x2)
    assert torch.equal(x[:, 1:], y[:, :-1])
    wx, wy = s.windows(5)
    assert torch.equal(wx[0], s.tokens[:5]) and torch.equal(wy[0], s.tokens[1:6])
    with pytest.raises(ValueError, match="need at least"):
        s.batch(1, 100, torch.Generator())


def test_fasta_round_trip_gz_is_byte_stable(tmp_path):
    recs = [("P1", "M" * 130), ("P2", "ACD")]
    a, b = tmp_path / "a.fasta.gz", tmp_path / "b.fasta.gz"
    write_fasta(a, recs)
    write_fasta(b, recs)
    assert a.read_bytes() == b.read_bytes()
    assert list(read_fasta(a)) == recs
    assert gzip.decompress(a.read_bytes()).decode().count("\n") == 1 + 3 + 2


def test_extract_is_deterministic_and_filters_length():
    seqs = {f"P{i:03d}": "M" * (i + 1) for i in range(100)}
    a = extract(seqs, num_proteins=10, seed=0, max_length=50)
    assert a == extract(seqs, num_proteins=10, seed=0, max_length=50)
    assert all(len(s) <= 50 for _, s in a) and [x for x, _ in a] == sorted(x for x, _ in a)
    with pytest.raises(ValueError, match="only 50 proteins"):
        extract(seqs, num_proteins=60, max_length=50)


def test_load_proteins_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.fasta"):
        load_proteins(tmp_path / "nope.fasta")


def _write_blastdb(base, records):
    """A minimal BLAST v4 protein database in the layout metastudent-data ships."""
    import struct

    from favor.data.blastdb import NCBISTDAA

    psq, phr, soff, hoff = bytearray(b"\x00"), bytearray(), [], []
    for acc, seq in records:
        soff.append(len(psq))
        psq += bytes(NCBISTDAA.index(c) for c in seq) + b"\x00"
        hoff.append(len(phr))
        phr += b"\x30\x80\x1a" + bytes([len(acc) + 3]) + acc.encode() + b"|GO:0000001\x00\x00"
    soff.append(len(psq))
    hoff.append(len(phr))
    title, date = b"test", b"Jan 1, 2014"
    n = len(records)
    pin = struct.pack(">ii", 4, 1) + struct.pack(">i", len(title)) + title + struct.pack(">i", len(date)) + date
    pin += struct.pack(">i", n) + struct.pack("<q", sum(len(s) for _, s in records))
    pin += struct.pack(">i", max(len(s) for _, s in records))
    pin += struct.pack(f">{n + 1}i", *hoff) + struct.pack(f">{n + 1}i", *soff)
    base.parent.mkdir(parents=True, exist_ok=True)
    (base.parent / (base.name + ".pin")).write_bytes(pin)
    (base.parent / (base.name + ".psq")).write_bytes(bytes(psq))
    (base.parent / (base.name + ".phr")).write_bytes(bytes(phr))


def test_blastdb_reader_and_data_command(tmp_path, capsys):
    from favor.cli import main
    from favor.data.blastdb import read_blastdb

    root = tmp_path / "root"
    onto = root / "usr/share/metastudent-data/dataset_201401"
    recs = {"MFO": [("P00001", "MKVLA"), ("Q00002", "ACDEFGHIKW")], "BPO": [("P00001", "MKVLA"), ("A00003", "WY")]}
    for name in ("MFO", "BPO", "CCO"):
        _write_blastdb(onto / name / "goasp.fasta", recs.get(name, [("Z00009", "GG")]))
    assert list(read_blastdb(onto / "MFO" / "goasp.fasta")) == recs["MFO"]
    out = tmp_path / "out"
    assert main(["data", "swissprot", "--root", str(root), "--out", str(out), "--extract", "2"]) == 0
    got = list(read_fasta(out / "swissprot.fasta.gz"))
    assert got == [("A00003", "WY"), ("P00001", "MKVLA"), ("Q00002", "ACDEFGHIKW"), ("Z00009", "GG")]
    assert len(list(read_fasta(out / "swissprot_2.fasta.gz"))) == 2
    assert main(["data", "swissprot", "--root", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().out
