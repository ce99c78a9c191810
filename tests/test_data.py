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
    assert sum(len(s) for _, s in proteins) == 2_876_298
    assert not any(a.isdigit() for a, _ in proteins)  # no entry named by its position
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


def _ber_length(n):
    return bytes([n]) if n < 0x80 else bytes([0x81, n]) if n < 0x100 else bytes([0x82, n >> 8, n & 0xFF])


def _write_blastdb(base, records, *, go_terms=1):
    """A minimal BLAST v4 protein database in the layout metastudent-data ships: headers
    "ACC|GO:...,GO:..." with ``go_terms`` terms (an int, or one per record); 12 terms make a
    title of >= 128 bytes, 24 one of >= 256 (BER lengths 0x81 NN and 0x82 NN NN)."""
    import struct

    from favor.data.blastdb import NCBISTDAA

    terms = [go_terms] * len(records) if isinstance(go_terms, int) else list(go_terms)
    psq, phr, soff, hoff = bytearray(b"\x00"), bytearray(), [], []
    for (acc, seq), k in zip(records, terms, strict=True):
        soff.append(len(psq))
        psq += bytes(NCBISTDAA.index(c) for c in seq) + b"\x00"
        hoff.append(len(phr))
        title = f"{acc}|" + ",".join(f"GO:{j:07d}" for j in range(1, k + 1))
        # Blast-def-line-set { Blast-def-line { [0] title, [1] seqid lcl|BL_ORD_ID } }, as in the package
        phr += b"\x30\x80\x30\x80\xa0\x80\x1a" + _ber_length(len(title)) + title.encode() + b"\x00\x00"
        phr += b"\xa1\x80\x30\x80\xaa\x80\x30\x80\xa0\x80\x1a\x09BL_ORD_ID\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
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


def test_blastdb_reads_accessions_of_long_headers(tmp_path):
    # Titles of >= 128 bytes carry a two- or three-byte BER length; reading the length as one
    # byte lost those accessions (5 % of the package's entries) and named them by position.
    from favor.data.blastdb import parse_header, read_blastdb

    recs = [("P00001", "MKV"), ("Q00002", "ACD"), ("A0A001-2", "WY"), ("O00004", "GG")]
    terms = [1, 12, 24, 11]
    base = tmp_path / "db" / "goasp.fasta"
    _write_blastdb(base, recs, go_terms=terms)
    phr = base.with_name("goasp.fasta.phr").read_bytes()
    titles = [f"{a}|" + ",".join(f"GO:{j:07d}" for j in range(1, k + 1)) for (a, _), k in zip(recs, terms, strict=True)]
    assert [len(t) for t in titles] == [17, 138, 272, 127]  # lengths 0x11, 0x81 0x8a, 0x82 0x01 0x10, 0x7f
    got = list(read_blastdb(base))
    assert got == recs
    assert len({a for a, _ in got}) == len(got) and not any(a.isdigit() for a, _ in got)
    first = phr[: phr.index(b"\x30\x80\x30\x80", 1)]
    assert parse_header(first) == ("P00001", "GO:0000001")
    i = phr.index(b"A0A001-2") - 10  # the third header starts at its 0x30 0x80 prefix
    assert parse_header(phr[i:]) == ("A0A001-2", titles[2].split("|", 1)[1])


def test_blastdb_header_without_accession_names_the_entry(tmp_path):
    from favor.data.blastdb import parse_header, read_blastdb

    base = tmp_path / "goasp.fasta"
    _write_blastdb(base, [("P00001", "MKV"), ("bad_acc", "GG")])
    with pytest.raises(ValueError, match=r"goasp.fasta.phr, entry 1: expected a BLAST header"):
        list(read_blastdb(base))
    with pytest.raises(ValueError, match="ACCESSION"):
        parse_header(b"\x30\x80\x30\x80\xa0\x80\x1a\x81")  # length cut off


def test_blastdb_reader_and_data_command(tmp_path, capsys):
    from favor.cli import main
    from favor.data.blastdb import read_blastdb

    root = tmp_path / "root"
    onto = root / "usr/share/metastudent-data/dataset_201401"
    recs = {"MFO": [("P00001", "MKVLA"), ("Q00002", "ACDEFGHIKW")], "BPO": [("P00001", "MKVLA"), ("A00003", "WY")]}
    for name in ("MFO", "BPO", "CCO"):
        _write_blastdb(onto / name / "goasp.fasta", recs.get(name, [("Z00009", "GG")]))
    assert list(read_blastdb(onto / "MFO" / "goasp.fasta")) == recs["MFO"]
    from favor.data.swissprot import metastudent_databases

    assert list(metastudent_databases(root)) == ["MFO", "BPO", "CCO"]
    (onto / "CCO" / "goasp.fasta.pin").unlink()
    with pytest.raises(FileNotFoundError, match="CCO/goasp.fasta.pin does not exist"):
        metastudent_databases(root)
    _write_blastdb(onto / "CCO" / "goasp.fasta", [("Z00009", "GG")])
    out = tmp_path / "out"
    assert main(["data", "swissprot", "--root", str(root), "--out", str(out), "--extract", "2"]) == 0
    got = list(read_fasta(out / "swissprot.fasta.gz"))
    assert got == [("A00003", "WY"), ("P00001", "MKVLA"), ("Q00002", "ACDEFGHIKW"), ("Z00009", "GG")]
    assert len(list(read_fasta(out / "swissprot_2.fasta.gz"))) == 2
    assert main(["data", "swissprot", "--root", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().out


def test_debian_run_command_says_what_is_missing_and_what_failed(tmp_path):
    import sys

    from favor.data.debian import run_command

    with pytest.raises(RuntimeError, match="^no-such-tool-favor not found: fetching X needs it$"):
        run_command(["no-such-tool-favor"], tmp_path, needs="fetching X needs it")
    with pytest.raises(RuntimeError, match=r"failed \(3\): boom"):
        run_command([sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"], tmp_path)
    run_command([sys.executable, "-c", "pass"], tmp_path)  # success: no error
