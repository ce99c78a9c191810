"""`favor train --data` on text: summary, held-out bits, --minutes, masked LM, exact resume, errors."""

import json
import math
import re

import pytest
import torch

from favor.cli import main
from favor.models import PerformerEncoder
from favor.training import CheckpointError, load_lm, resolve_config, train
from favor.training.loop import evaluate_bits, load_data

PANGRAM = "The quick brown fox jumps over the lazy dog. "
SMALL = {"steps": 8, "seq_len": 32, "batch_size": 4, "eval_every": 4, "eval_windows": 4, "checkpoint_every": 4}
SUMMARY_KEYS = {"steps", "seconds", "tokens_per_s", "val_bits_per_token", "objective", "context", "attention", "data"}


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "pangrams.txt"
    path.write_text(PANGRAM * 300, encoding="utf-8")
    return path


def _log(path):
    return [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]


def test_repetitive_text_is_learned_below_chance(tmp_path, text_file, one_thread, capsys):
    out = tmp_path / "run"
    code = main(
        ["train", "--out", str(out), "--data", str(text_file), "--context", "32", "--steps", "80",
         "--eval-every", "40", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["steps"] == 80 and summary["tokens_per_s"] > 0 and summary["seconds"] > 0
    assert (summary["objective"], summary["context"], summary["attention"]) == ("causal", 32, "favor")
    assert summary["data"] == str(text_file) and summary["unit"] == "byte" and summary["vocab_size"] == 256
    bits = summary["val_bits_per_token"]
    # chance is 8 bits per byte (log2 of the 29 characters used: 4.9); a model that learned
    # the character set and some of the pangram's order is well below both (measured: 2.1 after 80 steps)
    assert math.isfinite(bits) and bits < 4.0
    rows = _log(out)
    assert [r["step"] for r in rows if "val_bpr" in r] == [40, 80]
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "checkpoints" / "LATEST").read_text().strip() == "step_00000080"
    # a text checkpoint generates text: the prompt, then 20 sampled bytes (a byte that is
    # not valid UTF-8 prints as one replacement character)
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(out), "--prompt", "The quick", "--max-new-tokens", "20"]) == 0
    sample = capsys.readouterr().out.rstrip("\n")
    assert sample.startswith("The quick") and len("The quick") < len(sample) <= len("The quick") + 20


def test_minutes_stops_by_wall_time_with_a_checkpoint(tmp_path, text_file, one_thread):
    out = tmp_path / "run"
    code = main(
        ["train", "--out", str(out), "--data", str(text_file), "--context", "32", "--steps", "1000000",
         "--minutes", "0.02", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped_by"] == "time_limit" and summary["time_limit_s"] == pytest.approx(1.2)
    assert 1 <= summary["steps"] < 1_000_000
    assert 1.2 <= summary["seconds"] < 60  # stops after the step that crosses 1.2 s (plus one evaluation)
    assert math.isfinite(summary["val_bits_per_token"])
    assert (out / "checkpoints" / "LATEST").read_text().strip() == f"step_{summary['steps']:08d}"


@pytest.mark.parametrize("objective", ["causal", "masked"])
def test_resume_after_a_time_limit_stop_is_exact(tmp_path, text_file, one_thread, objective):
    m, t = resolve_config(preset="tiny", data=str(text_file), objective=objective, redraw_interval=3, **SMALL)
    train(tmp_path / "a", m, t, write_plot=False)
    first = train(tmp_path / "b", m, t, time_limit=0.0, write_plot=False)  # stops after step 1
    assert first["steps"] == 1 and first["stopped_by"] == "time_limit"
    resumed = train(tmp_path / "b", m, t, resume=True, write_plot=False)
    assert resumed["start_step"] == 1 and resumed["steps"] == 8
    a, b = _log(tmp_path / "a"), _log(tmp_path / "b")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r.get("val_bpr") for r in a if r["step"] > 1] == [r.get("val_bpr") for r in b if r["step"] > 1]


def test_masked_objective_trains_an_encoder(tmp_path, text_file, one_thread, capsys):
    m, t = resolve_config(preset="tiny", data=str(text_file), objective="masked", **{**SMALL, "steps": 30})
    assert m.vocab_size == 257  # the byte vocabulary plus a mask id
    res = train(tmp_path, m, t, write_plot=False)
    assert res["objective"] == "masked" and 0 < res["val_bits_per_token"] < 8
    model, config = load_lm(tmp_path)
    assert isinstance(model, PerformerEncoder) and config["train"]["objective"] == "masked"
    assert main(["generate", "--checkpoint", str(tmp_path)]) == 2
    assert "holds a masked LM" in capsys.readouterr().out


def test_eval_data_scores_another_file(tmp_path, text_file, one_thread):
    other = tmp_path / "other.txt"
    other.write_text("Pack my box with five dozen liquor jugs. " * 20, encoding="utf-8")
    m, t = resolve_config(preset="tiny", data=str(text_file), eval_data=str(other), **SMALL)
    res = train(tmp_path, m, t, write_plot=False)
    assert res["eval_data"] == str(other)
    data = load_data(t)
    assert bytes(data.heldout.tokens.tolist()) == other.read_bytes() and len(data.train) == len(PANGRAM) * 300
    # the reported score is the trained model's on that file's windows
    model, _ = load_lm(tmp_path)
    x, y = data.heldout_windows(32, 4)
    assert evaluate_bits(model, x, y, counted=data.counted) == pytest.approx(res["val_bits_per_token"], rel=1e-6)


def test_model_overrides_go_to_the_model_config(text_file):
    m, t = resolve_config(preset="text", data=str(text_file), model={"attention": "softmax", "kernel": None})
    assert (m.attention, m.kernel, m.vocab_size, t.seq_len) == ("softmax", "positive", 256, 1024)
    # the text preset's M = 64 beside the window (docs/paper.md); --num-features overrides it
    assert m.num_features == 64
    m, _ = resolve_config(preset="text", data=str(text_file), model={"num_features": 32})
    assert m.num_features == 32
    with pytest.raises(ValueError, match="unknown model override 'exact_windw'"):
        resolve_config(preset="tiny", model={"exact_windw": 8})


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{tmp}/nope.txt"], "data file .*nope.txt does not exist"),
        (["--data", "{tmp}/empty.txt"], "data is empty: no text in .*empty.txt"),
        (["--data", "{tmp}/pangrams.txt", "--context", "1"], "--context must be >= 2, got 1"),
        (["--data", "{tmp}/pangrams.txt", "--minutes", "0"], "--minutes must be > 0"),
        (["--data", "{tmp}/pangrams.txt", "--context", "5000"], "held-out data has .* tokens, too few"),
    ],
)
def test_cli_errors_are_clear(tmp_path, text_file, capsys, args, message):
    (tmp_path / "empty.txt").write_text("")
    argv = ["train", "--out", str(tmp_path / "run"), "--no-progress"] + [a.format(tmp=tmp_path) for a in args]
    assert main(argv) == 2
    out = capsys.readouterr().out
    assert out.startswith("favor train: ") and re.search(message, out), out


def test_checkpoint_written_before_the_text_fields_still_resumes(tmp_path, one_thread):
    # a protein run's config.json from before eval_data/tokenizer/objective existed
    m, t = resolve_config(preset="tiny", **SMALL)
    train(tmp_path, m, t, stop_at=4, write_plot=False)
    cfg_path = tmp_path / "checkpoints" / "step_00000004" / "config.json"
    config = json.loads(cfg_path.read_text())
    for key in ("eval_data", "tokenizer", "objective"):
        del config["train"][key]
    cfg_path.write_text(json.dumps(config))
    assert train(tmp_path, m, t, resume=True, write_plot=False)["start_step"] == 4
    other = resolve_config(preset="tiny", objective="masked", **SMALL)
    with pytest.raises(CheckpointError, match=r"differs in \['model.vocab_size', 'train.objective'\]"):
        train(tmp_path, *other, resume=True, write_plot=False)


def test_cli_model_options_are_collected_for_the_model_config():
    from favor.cli import build_parser
    from favor.commands.train import model_overrides

    args = build_parser("train").parse_args(["train", "--out", "x", "--attention", "softmax", "--context", "64"])
    assert model_overrides(args) == {"kernel": None, "attention": "softmax", "num_features": None, "far_gain": None}
    m, t = resolve_config(preset="tiny", model=model_overrides(args), seq_len=args.context)
    assert (m.attention, m.kernel, t.seq_len) == ("softmax", "positive", 64)
    args = build_parser("train").parse_args(["train", "--out", "x", "--preset", "text", "--num-features", "48"])
    assert resolve_config(preset="text", model=model_overrides(args))[0].num_features == 48


def test_a_directory_of_fasta_files_trains_as_proteins(tmp_path, one_thread):
    from favor.data import load_proteins, write_fasta

    records = load_proteins()[:60]
    (tmp_path / "d").mkdir()
    write_fasta(tmp_path / "d" / "a.fa", records[:30])
    write_fasta(tmp_path / "d" / "b.fasta.gz", records[30:])
    argv = ["train", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "d"), "--steps", "4", "--no-progress"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["unit"], summary["vocab_size"], summary["tokenizer"]) == ("residue", 28, "residues")
    assert 0 < summary["val_bits_per_token"] < 6  # log2(20) = 4.3 bits at chance over residues


def test_exact_terms_flags_train_a_hybrid_that_resumes_exactly(tmp_path, text_file, one_thread):
    import favor
    from favor.cli import build_parser
    from favor.commands.train import model_overrides

    args = build_parser("train").parse_args(["train", "--out", "x", "--exact-window", "4", "--exact-sinks", "1"])
    over = model_overrides(args)
    assert over["exact"] == {"window": 4, "sinks": 1, "block": 1}
    with pytest.raises(ValueError, match="need --exact-window"):
        model_overrides(build_parser("train").parse_args(["train", "--out", "x", "--exact-sinks", "1"]))
    m, t = resolve_config(preset="tiny", data=str(text_file), model=over, **SMALL)
    assert m.exact == favor.ExactTerms(4, 1, 1)
    train(tmp_path / "a", m, t, write_plot=False)
    train(tmp_path / "b", m, t, time_limit=0.0, write_plot=False)
    resumed = train(tmp_path / "b", m, t, resume=True, write_plot=False)
    assert resumed["steps"] == 8
    assert [r["loss"] for r in _log(tmp_path / "a")] == [r["loss"] for r in _log(tmp_path / "b")]
    model, _ = load_lm(tmp_path / "a")
    assert model.config.exact == favor.ExactTerms(4, 1, 1)  # the checkpoint keeps the exact terms


def test_far_gain_flag_trains_a_hybrid_whose_gain_learns_and_is_checkpointed(tmp_path, text_file, one_thread):
    from favor.cli import build_parser
    from favor.commands.train import model_overrides

    argv = ["train", "--out", "x", "--exact-window", "4", "--exact-sinks", "1", "--far-gain", "-4"]
    over = model_overrides(build_parser("train").parse_args(argv))
    assert over["far_gain"] == -4.0
    m, t = resolve_config(preset="tiny", data=str(text_file), model=over, **SMALL)
    assert m.far_gain == -4.0
    train(tmp_path / "a", m, t, write_plot=False)
    model, _ = load_lm(tmp_path / "a")
    gains = [p for n, p in model.named_parameters() if n.endswith("far_log_gain")]
    assert gains and all(g.shape == (m.heads,) for g in gains)
    moved = torch.cat([g.detach() for g in gains]) + 4.0
    assert moved.abs().max() > 0  # it trained, from -4
    with pytest.raises(ValueError, match="far_gain"):  # a gain needs exact terms beside FAVOR
        over = model_overrides(build_parser("train").parse_args(["train", "--out", "x", "--far-gain", "-4"]))
        resolve_config(preset="tiny", data=str(text_file), model=over, **SMALL)
