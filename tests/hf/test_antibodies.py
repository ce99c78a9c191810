"""Antibody V regions (the shipped Swiss-Prot extract, its rebuild) and masked-residue accuracy."""

import json
from types import SimpleNamespace

import pytest
import torch

from favor.hf.antibodies import (
    build_extract,
    ig_v_regions,
    load_antibodies,
    masked_accuracy,
    masked_batches,
    v_region,
)
from tests.test_data import _write_blastdb  # the minimal BLAST v4 database writer

# mature V regions from the extract (UniProt P01743 heavy, P01594 kappa)
HEAVY = "QVQLVQSGAEVKKPGASVKVSCKASGYTFTSYAMHWVRQAPGQRLEWMGWINAGNGNTKYSQKFQGRVTITRDTSASTAYMELSSLRSEDTAVYYCAR"
KAPPA = "DIQMTQSPSSLSASVGDRVTITCQASQDISDYLNWYQQKPGKAPKLLIYDASNLETGVPSRFSGSGSGTDFTFTISSLQPEDIATYYCQQYDNLP"
SIGNAL = "MDWTWRVFCLLAVAPGAHS"
AMINO = "[PAD] [UNK] [CLS] [SEP] [MASK] A C D E F G H I K L M N P Q R S T V W Y".split()


def _tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab={t: i for i, t in enumerate(AMINO)}, do_lower_case=False)


def test_v_region_recognises_chains_and_cuts_signal_peptides():
    assert v_region(HEAVY) == ("H", HEAVY)
    assert v_region(KAPPA) == ("L", KAPPA)
    assert v_region(SIGNAL + HEAVY) == ("H", HEAVY)  # the leader goes, framework 1 stays whole
    assert v_region("M" * 120) is None  # no framework motifs
    assert v_region(KAPPA[:3] + "B" + KAPPA[4:]) is None  # ambiguous residue: not in AntiBERTy's vocabulary
    assert v_region(HEAVY + "A" * 100) is None  # too long for a V region


def test_ig_v_regions_dedupes_and_names_by_chain():
    got = ig_v_regions([("P1", KAPPA), ("P2", "ACDEF" * 30), ("P3", SIGNAL + HEAVY), ("P4", HEAVY)])
    assert got == sorted([("L|P1", KAPPA), ("H|P3", HEAVY)], key=lambda r: r[1])


def test_shipped_extract_splits():
    train, held, every = load_antibodies("train"), load_antibodies("heldout"), load_antibodies("all")
    assert len(every) == 172 and len(held) == 52 and len(train) == 120
    assert not set(train) & set(held) and sorted(train + held) == sorted(every)
    assert all(v_region(s) is not None and v_region(s)[1] == s for s in every)  # the extract is its own fixed point
    assert load_antibodies("heldout") == held  # seeded
    with pytest.raises(ValueError, match="split must be one of"):
        load_antibodies("test")


def test_build_extract_from_an_unpacked_package(tmp_path):
    from favor.data.fasta import read_fasta

    onto = tmp_path / "root/usr/share/metastudent-data/dataset_201401"
    recs = {
        "MFO": [("P00001", SIGNAL + HEAVY), ("Q00002", "MKV" * 40)],
        "BPO": [("P00001", SIGNAL + HEAVY), ("P00003", KAPPA)],
        "CCO": [("P00004", "GG")],
    }
    for name, r in recs.items():
        _write_blastdb(onto / name / "goasp.fasta", r)
    path, n = build_extract(tmp_path / "out" / "ig.fasta.gz", root=tmp_path / "root")
    assert n == 2
    assert list(read_fasta(path)) == sorted([("H|P00001", HEAVY), ("L|P00003", KAPPA)], key=lambda r: r[1])
    with pytest.raises(FileNotFoundError, match="metastudent-data"):
        build_extract(tmp_path / "x.fasta.gz", root=tmp_path / "nowhere")


def test_masked_batches_mask_fifteen_percent_of_residues_reproducibly():
    tok = _tokenizer()
    seqs = [HEAVY, KAPPA, KAPPA[:40]]
    a = masked_batches(tok, seqs, seed=3, batch_size=2)
    b = masked_batches(tok, seqs, seed=3, batch_size=2)
    c = masked_batches(tok, seqs, seed=4, batch_size=2)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0]["labels"], c[0]["labels"])
    clean = [dict(tok([" ".join(s) for s in seqs[i : i + 2]], padding=True, return_tensors="pt")) for i in (0, 2)]
    for got, ref in zip(a, clean, strict=True):
        sel = got["labels"] != -100
        assert torch.equal(got["labels"][sel], ref["input_ids"][sel])  # labels are the original residues
        assert (got["input_ids"][sel] == tok.mask_token_id).all()
        assert torch.equal(got["input_ids"][~sel], ref["input_ids"][~sel])  # nothing else changed
        residues = (ref["attention_mask"].sum(1) - 2).tolist()  # minus [CLS], [SEP]
        assert sel.sum(1).tolist() == [max(1, round(0.15 * n)) for n in residues]
        assert not sel[:, 0].any()  # [CLS] never masked


def test_masked_accuracy_counts_masked_positions_only():
    tok = _tokenizer()
    batches = masked_batches(tok, [HEAVY, KAPPA], seed=0)
    labels = batches[0]["labels"]

    def oracle(input_ids, attention_mask=None, token_type_ids=None):  # right wherever a label is given
        logits = torch.zeros(*input_ids.shape, len(AMINO))
        logits.scatter_(-1, labels.clamp_min(0)[..., None], 1.0)
        return SimpleNamespace(logits=logits)

    acc, n = masked_accuracy(oracle, batches)
    assert acc == 1.0 and n == int((labels != -100).sum())
    acc0, _ = masked_accuracy(lambda **kw: SimpleNamespace(logits=torch.zeros(*labels.shape, 25)), batches)
    assert acc0 == 0.0  # arg-max of all-zero logits is [PAD], never a residue


def _save_tiny_mlm(path):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(AMINO),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=192,
        initializer_range=0.1,  # see conftest: non-uniform attention
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertForMaskedLM(cfg).eval().save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


def test_performerize_and_distill_commands_report_masked_accuracy(tmp_path, capsys):
    import favor.hf as fh
    from favor.cli import main

    d = _save_tiny_mlm(tmp_path / "mlm")
    out = tmp_path / "perf"
    common = ["--model", str(d), "--num-features", "16", "--samples", "8"]
    assert main(["performerize", *common, "--kernel", "oprf", "--calibration-samples", "4", "--out", str(out)]) == 0
    res = json.loads((out / "performerize.json").read_text())
    assert res["meta"]["masked"]["residues"] > 100
    assert 0.0 <= res["meta"]["masked"]["softmax_accuracy"] <= 1.0
    assert [0.0 <= r["masked_accuracy"] <= 1.0 for r in res["rows"]] == [True]
    assert "mask acc" in capsys.readouterr().out
    dist = tmp_path / "dist"
    args = ["distill", *common, "--out", str(dist), "--steps", "2", "--eval-every", "1", "--maskings", "1"]
    assert main(args) == 0
    res = json.loads((dist / "distill.json").read_text())
    assert len(res["curve"]["eval_masked_accuracy"]) == 3 and res["masked_residues"] > 100
    assert res["zero_shot_masked_accuracy"] == res["curve"]["eval_masked_accuracy"][0]
    model = fh.from_pretrained(dist)
    assert type(model).__name__ == "BertForMaskedLM" and model.config._attn_implementation == fh.NAME
    assert "masked-residue accuracy" in capsys.readouterr().out
