"""Training loop, CLI, and exact resume (including after SIGKILL)."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from favor.cli import main
from favor.training import resolve_config, train
from favor.training.checkpoint import CheckpointError

# redraws every 3 steps, so resume tests also cover the redraw schedule
SMALL = {
    "steps": 8,
    "seq_len": 32,
    "batch_size": 4,
    "eval_every": 4,
    "eval_windows": 4,
    "checkpoint_every": 4,
    "redraw_interval": 3,
}


def _log(path):
    return [json.loads(line) for line in (path / "log.jsonl").read_text().splitlines()]


@pytest.fixture
def one_thread():
    # results are deterministic for a fixed thread count; pin it for in-process comparisons
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_tiny_run_writes_log_plot_and_checkpoint(tmp_path, one_thread):
    m, t = resolve_config(preset="tiny", **SMALL)
    res = train(tmp_path, m, t)
    rows = _log(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all("loss" in r and r["loss"] > 0 for r in rows)
    assert "val_bpr" in rows[3] and "val_bpr" in rows[7]
    assert 0 < res["val_bpr"] < 6  # log2(28) = 4.8 bits at chance; far above means broken
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert (tmp_path / "checkpoints" / "LATEST").read_text().strip() == "step_00000008"


def test_resume_in_process_is_exact(tmp_path, one_thread):
    m, t = resolve_config(preset="tiny", **SMALL)
    a = train(tmp_path / "a", m, t, write_plot=False)
    train(tmp_path / "b", m, t, stop_at=4, write_plot=False)
    b = train(tmp_path / "b", m, t, resume=True, write_plot=False)
    assert b["start_step"] == 4
    assert [r["loss"] for r in _log(tmp_path / "a")] == [r["loss"] for r in _log(tmp_path / "b")]
    assert a["loss"] == b["loss"]


def test_resume_with_other_config_or_no_checkpoint_fails_clearly(tmp_path, one_thread):
    m, t = resolve_config(preset="tiny", **SMALL)
    with pytest.raises(CheckpointError, match="LATEST is missing"):
        train(tmp_path, m, t, resume=True)
    train(tmp_path, m, t, stop_at=4, write_plot=False)
    m2, _ = resolve_config(preset="tiny", kernel="relu", **SMALL)
    with pytest.raises(CheckpointError, match=r"config\.json does not match.*model\.kernel"):
        train(tmp_path, m2, t, resume=True)


def test_unigram_output_bias_starts_at_the_token_frequencies(tmp_path, one_thread):
    from favor.training.loop import load_data, token_log_frequencies

    m, t = resolve_config(preset="tiny", output_bias=True, output_bias_init="unigram", **{**SMALL, "steps": 1})
    # a learning rate too small to move it: the bias the model starts with
    res = train(tmp_path / "u", m, dataclasses.replace(t, lr=1e-12), write_plot=False)
    logp = token_log_frequencies(load_data(t).train.tokens, m.vocab_size)
    torch.testing.assert_close(res["model"].logit_bias.detach(), logp.float(), rtol=0, atol=1e-6)
    assert torch.allclose(logp.exp().sum(), torch.tensor(1.0, dtype=torch.float64))
    # with zero embeddings the model predicts exactly the frequencies; with small random ones
    # (std 0.02) its first loss is close to the unigram cross-entropy, far below chance
    x, _ = load_data(t).train.batch(4, 32, torch.Generator().manual_seed(0))
    unigram_bits = float(-logp[x].mean()) / 0.6931471805599453
    first = _log(tmp_path / "u")[0]["loss"] / 0.6931471805599453
    assert abs(first - unigram_bits) < 0.5 < 4.8 - first  # log2(28) = 4.8 bits at chance
    # the default: zeros, the same run as before the option
    m0, t0 = resolve_config(preset="tiny", output_bias=True, **SMALL)
    assert t0.output_bias_init == "zeros"
    with pytest.raises(ValueError, match="needs a model with a logit bias"):
        train(tmp_path / "n", m0.replace(output_bias=False), t, write_plot=False)
    with pytest.raises(ValueError, match="output_bias_init must be one of"):
        resolve_config(preset="tiny", output_bias_init="uniform")


def test_a_checkpoint_from_before_the_output_bias_resumes(tmp_path, one_thread):
    m, t = resolve_config(preset="tiny", **SMALL)
    a = train(tmp_path / "a", m, t, write_plot=False)
    train(tmp_path / "b", m, t, stop_at=4, write_plot=False)
    cfg_path = tmp_path / "b" / "checkpoints" / "step_00000004" / "config.json"
    saved = json.loads(cfg_path.read_text())
    del saved["model"]["output_bias"], saved["train"]["output_bias_init"]  # written before the options
    cfg_path.write_text(json.dumps(saved))
    b = train(tmp_path / "b", m, t, resume=True, write_plot=False)
    assert b["start_step"] == 4 and a["loss"] == b["loss"]


def test_config_file_and_bad_keys(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[model]\ndim = 24\nheads = 3\n\n[train]\nsteps = 5\n")
    m, t = resolve_config(preset="tiny", config_file=cfg, seed=4)
    assert (m.dim, m.heads, t.steps, t.seed, m.seed) == (24, 3, 5, 4, 4)
    cfg.write_text("[train]\nstepz = 5\n")
    with pytest.raises(ValueError, match="stepz"):
        resolve_config(preset="tiny", config_file=cfg)


def _cli(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "favor.cli", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_sigkill_then_resume_ends_at_the_same_loss(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text("[train]\n" + "".join(f"{k} = {v}\n" for k, v in {**SMALL, "steps": 12}.items()))
    common = ["--config", str(cfg), "--threads", "1", "--no-progress"]
    straight = _cli("train", "--out", str(tmp_path / "a"), *common)
    killed = _cli("train", "--out", str(tmp_path / "b"), *common, "--throttle", "0.15")
    latest = tmp_path / "b" / "checkpoints" / "LATEST"
    deadline = time.time() + 120
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() == "step_00000004"):
        assert killed.poll() is None, killed.communicate()
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    steps_before = [r["step"] for r in _log(tmp_path / "b")]
    assert max(steps_before) < 12  # really killed mid-way
    resumed = _cli("train", "--out", str(tmp_path / "b"), *common, "--resume")
    for p in (straight, resumed):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    a, b = _log(tmp_path / "a"), _log(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 13))
    assert a[-1]["loss"] == b[-1]["loss"] and a[-1]["val_bpr"] == b[-1]["val_bpr"]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    # and the result generates
    assert main(["generate", "--checkpoint", str(tmp_path / "b"), "--prompt", "MK", "--max-new-tokens", "20"]) == 0
    seq = capsys.readouterr().out.strip().splitlines()[-1]
    assert seq.startswith("MK") and 2 <= len(seq) <= 22 and seq.isalpha()


def test_generate_cli_reports_missing_checkpoint(tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tmp_path / "none"), "--prompt", "M"]) == 2
    out = capsys.readouterr().out
    assert "none" in out and "does not exist" in out


def test_decode_timing_helper_runs_both_cache_kinds(one_thread):
    from favor.models import PerformerConfig, PerformerLM
    from favor.training.demo import decode_ms_per_token

    cfg = PerformerConfig(vocab_size=28, dim=16, depth=1, heads=2)
    ctx = torch.randint(0, 28, (1, 64), generator=torch.Generator().manual_seed(0))
    assert decode_ms_per_token(PerformerLM(cfg), ctx, tokens=3) > 0
    soft = PerformerLM(cfg.replace(attention="softmax"))
    assert decode_ms_per_token(soft, ctx, tokens=3, synthetic_cache=True) > 0


@pytest.mark.slow
def test_lm_demo_reports_everything(tmp_path):
    from favor.training import lm_demo

    r = lm_demo(tmp_path, seconds=20, context=1024, seed=0)
    assert {"1024", "16384"} <= set(r["decode_ms_per_token"])
    assert set(r["runs"]) == {"hybrid", "softmax"}
    for run in r["runs"].values():
        assert run["steps"] >= 4 and run["val_bpr"] < 6 and run["peak_mib"] > 0 and run["tokens_per_s"] > 0
    assert isinstance(r["sample"], str) and r["context"] == 1024
    assert (tmp_path / "lm_loss.png").exists() and (tmp_path / "lm_demo.json").exists()
