"""The CLI end to end on a tiny random BERT saved with a character-level tokenizer (offline)."""

import json
import string

import pytest
import torch

import favor.hf as fh
from favor.cli import main
from favor.data.english import HELDOUT_DOMAIN, TRAIN_DOMAINS, lines
from favor.hf.models import CORPORA, builtin_documents, builtin_texts


def _save_tiny(tiny_bert, path):
    from transformers import BertTokenizer

    chars = list(string.ascii_lowercase) + [f"##{c}" for c in string.ascii_lowercase]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + list(",.;:")
    tok = BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)
    model = tiny_bert()
    model.float()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_performerize_command_writes_json_and_png(tiny_bert, tmp_path, capsys):
    d = _save_tiny(tiny_bert, tmp_path / "tiny")
    out = tmp_path / "out"
    rc = main(
        [
            "performerize",
            "--model",
            str(d),
            "--kernel",
            "oprf",
            "--num-features",
            "16",
            "--num-features",
            "256",
            "--samples",
            "4",
            "--calibration-samples",
            "4",
            "--max-length",
            "32",
            "--eval-length",  # two held-out lengths, as 128 and 512 for a real model
            "16",
            "--eval-length",
            "48",
            "--plain",  # the paper's estimator: more features must help (below)
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads((out / "performerize.json").read_text())
    rows = result["rows"]
    assert [(r["kernel"], r["num_features"], r["length"]) for r in rows] == [
        ("oprf", 16, 16),
        ("oprf", 16, 48),
        ("oprf", 256, 16),
        ("oprf", 256, 48),
    ]
    assert all(0.0 < r["cosine_mean"] <= 1.0 + 1e-6 and len(r["layer_errors"]) == 2 for r in rows)
    assert all(r["passages"] == 4 for r in rows)  # packed from the held-out split: every length has them
    assert (result["meta"]["exact_window"], result["meta"]["exact_block"], result["meta"]["key_shift"]) == (
        -1,
        1,
        "pair",
    )
    # more features, closer to softmax (Monte Carlo error ~ M^-1/2), at both lengths
    for short, long in ((0, 2), (1, 3)):
        assert sum(rows[long]["layer_errors"]) < sum(rows[short]["layer_errors"])
    assert (out / "performerize.png").stat().st_size > 0
    assert "cos mean" in capsys.readouterr().out


def test_performerize_command_defaults_to_exact_local_terms(tiny_bert, tmp_path):
    d = _save_tiny(tiny_bert, tmp_path / "tiny")
    out = tmp_path / "out"
    args = ["performerize", "--model", str(d), "--kernel", "derf", "--num-features", "16", "--samples", "2"]
    args += ["--calibration-samples", "2", "--max-length", "16", "--out", str(out)]
    assert main(args) == 0
    meta = json.loads((out / "performerize.json").read_text())["meta"]
    assert (meta["exact_window"], meta["exact_sinks"], meta["exact_block"], meta["key_shift"]) == (8, 1, 32, "sequence")
    # the default lengths, 128 and 512, are capped at the tiny model's 64 positions
    assert meta["held_out"]["lengths"] == [64]


def test_distill_command_saves_a_loadable_model(tiny_bert, tmp_path, capsys):
    d = _save_tiny(tiny_bert, tmp_path / "tiny")
    out = tmp_path / "distilled"
    rc = main(
        [
            "distill",
            "--model",
            str(d),
            "--out",
            str(out),
            "--steps",
            "3",
            "--samples",
            "4",
            "--num-features",
            "16",
            "--eval-every",
            "1",
            "--batch-size",
            "4",
            "--max-length",
            "16",
            "--eval-length",
            "16",
            "--eval-length",
            "32",
            "--long-length",  # packed 32-token training passages besides the 16-token ones
            "32",
            "--fit-steps",
            "1",
            "--fit-batches",
            "1",
            "--exact-window",  # the training path through the exact local terms
            "2",
            "--exact-sinks",
            "1",
        ]
    )
    assert rc == 0
    res = json.loads((out / "distill.json").read_text())
    assert res["steps"] == 3 and res["curve"]["eval_lengths"] == [16, 32]
    assert all(len(res["curve"]["eval_cosine"][n]) == 4 for n in ("16", "32"))
    assert set(res["final_cosine"]) == {"16", "32"} and res["held_out_passages"] == {"16": 4, "32": 4}
    assert res["long_length"] == 32 and res["long_lengths"] == [32] and res["training_batches"] > 0
    assert (res["fit_steps"], res["fit_batches"], res["fit_on"]) == (1, 1, "mixed")
    assert (res["exact_window"], res["exact_sinks"]) == (2, 1)
    # by default it trains on the mixed English corpus and is held out on a domain not in it
    # (the Python docs), with KJV's held-out books measured before and after as well
    assert (res["corpus"], res["text"], res["held_out"]) == ("english", "english", "python-docs")
    assert set(res["other_held_out"]) == {"heldout"}
    kjv = res["other_held_out"]["heldout"]
    assert set(kjv["zero_shot_cosine"]) == set(kjv["final_cosine"]) == set(kjv["final_cosine_min"]) == {"16", "32"}
    assert all(0.0 < c <= 1.0 + 1e-6 for c in kjv["final_cosine"].values())
    assert (out / "distill.png").stat().st_size > 0
    model = fh.from_pretrained(out)
    assert model.config._attn_implementation == fh.NAME
    assert all(m.exact_window == 2 for m in model.modules() if isinstance(m, fh.FavorAdapter))
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).last_hidden_state).all()
    # a performerized model is not a valid starting point for another swap or distillation
    for cmd in (
        ["distill", "--model", str(out), "--out", str(tmp_path / "again")],
        ["performerize", "--model", str(out)],
    ):
        capsys.readouterr()
        assert main(cmd) == 2
        assert "already performerized" in capsys.readouterr().out


def test_the_default_training_text_is_the_mix_and_the_held_out_text_another_domain():
    text, held = CORPORA["english"]
    assert held[0] == HELDOUT_DOMAIN == "python-docs" and HELDOUT_DOMAIN not in TRAIN_DOMAINS
    docs = builtin_documents(text, "encoder")
    assert docs == [lines(d) for d in TRAIN_DOMAINS] and len(TRAIN_DOMAINS) == 3  # KJV, Austen, GCIDE
    train = builtin_texts(text, "encoder")
    assert train[:3] == [d[0] for d in docs] and len(train) == sum(map(len, docs))  # the domains in turn
    assert not set(train) & set(builtin_texts(held[0], "encoder"))
    # --corpus kjv: the KJV splits, as before the mixed corpus
    assert CORPORA["kjv"][0] == "train" and CORPORA["kjv"][1][0] == "heldout"
    assert builtin_texts("train", "encoder") == lines("bible")


def test_texts_joined_with_a_plus_are_one_mix_of_their_documents(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("first note\nsecond note\n")
    docs = builtin_documents(f"english+python-docs+{notes}", "encoder")
    assert docs == [*(lines(d) for d in TRAIN_DOMAINS), lines("python-docs"), ["first note", "second note"]]
    mix = builtin_texts(f"austen+{notes}", "encoder")
    assert mix[:4] == [lines("austen")[0], "first note", lines("austen")[1], "second note"]
    plus = tmp_path / "a+b.txt"  # a file whose name holds the separator is still that file
    plus.write_text("only line\n")
    assert builtin_texts(str(plus), "encoder") == ["only line"]
    with pytest.raises(ValueError, match="joins names or files"):
        builtin_documents("english+", "encoder")


def test_distill_command_takes_the_kjv_corpus_and_files(tiny_bert, tmp_path):
    d = _save_tiny(tiny_bert, tmp_path / "tiny")
    heldout = tmp_path / "held.txt"
    heldout.write_text("the quick brown fox jumps over the lazy dog\n" * 40)
    common = ["distill", "--model", str(d), "--steps", "2", "--samples", "2", "--num-features", "8"]
    common += ["--batch-size", "4", "--max-length", "16", "--eval-length", "16", "--long-length", "0"]
    common += ["--fit-steps", "0"]
    out = tmp_path / "kjv"
    assert main([*common, "--corpus", "kjv", "--out", str(out)]) == 0
    res = json.loads((out / "distill.json").read_text())
    assert (res["corpus"], res["text"], res["held_out"]) == ("kjv", "train", "heldout")
    assert set(res["other_held_out"]) == {"python-docs"}
    assert res["fit_batches"] == 2  # one batch of each passage length, at least 2 (here short passages only)
    out = tmp_path / "file"  # the flags of before: --text train, one --heldout (here a file)
    assert main([*common, "--text", "train", "--heldout", str(heldout), "--out", str(out)]) == 0
    res = json.loads((out / "distill.json").read_text())
    assert (res["text"], res["held_out"], res["other_held_out"]) == ("train", str(heldout), {})


def test_model_texts_formats_proteins_only():
    from favor.hf.models import model_texts

    assert model_texts(["MK V", "AC"], "masked-lm") == ["M K V", "A C"]
    assert model_texts(["In the beginning"], "encoder") == ["In the beginning"]
