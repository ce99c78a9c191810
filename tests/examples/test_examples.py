"""The scripts in examples/ run, on tiny configurations, and do what their docstrings say."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_every_example_is_tested():
    here = Path(__file__).read_text()
    for script in (ROOT / "examples").glob("*.py"):
        assert f'"{script.stem}"' in here, f"examples/{script.name} has no test"


def test_train_text_lm_resumes_exactly(tmp_path, capsys):
    ex = _load("train_text_lm")
    text = tmp_path / "corpus.txt"
    text.write_text("In the beginning was the word, and the word was with favor. " * 40)
    tiny = ["--text", str(text), "--batch-size", "2", "--seq-len", "32", "--dim", "16", "--depth", "1",
            "--heads", "2", "--eval-every", "2", "--checkpoint-every", "2", "--sample-bytes", "8"]  # fmt: skip
    whole = ex.main([*tiny, "--out", str(tmp_path / "a"), "--steps", "4"])
    ex.main([*tiny, "--out", str(tmp_path / "b"), "--steps", "2"])
    resumed = ex.main([*tiny, "--out", str(tmp_path / "b"), "--steps", "4", "--resume"])
    # batches are seeded by step and the optimiser state is restored: bit-for-bit the same run
    assert resumed["history"][-1] == whole["history"][-1]
    assert resumed["sample"] == whole["sample"] and resumed["sample"].startswith("The ")
    assert (tmp_path / "a" / "sample.txt").exists() and "bits/byte" in capsys.readouterr().out


def test_performerize_and_distill_saves_a_model_that_reloads(tmp_path):
    pytest.importorskip("transformers", reason="needs the hf extra")
    import favor.hf
    from favor.data.kjv import load_text
    from favor.hf.fidelity import embeddings, tokenize_batches

    ex = _load("performerize_and_distill")
    out = tmp_path / "performer"
    res = ex.main(["--model", "tiny", "--out", str(out), "--steps", "2", "--num-features", "16",
                   "--train-passages", "8", "--heldout-passages", "4", "--max-length", "16", "--batch-size", "4"])  # fmt: skip
    assert len(res["losses"]) == 2 and all(torch.isfinite(torch.tensor(res["losses"])))
    # the tiny model's logits are large enough that FAVOR is visibly approximate, not exact
    assert 0.5 < res["cosine_before"] < 0.9999 and 0.5 < res["cosine_after"] <= 1.0
    reloaded = favor.hf.from_pretrained(out)
    batches = tokenize_batches(ex.ByteTokenizer(128), load_text("heldout")[:4], max_length=16)
    a = embeddings(res["student"], batches, attn=favor.hf.NAME)
    b = embeddings(reloaded, batches, attn=favor.hf.NAME)
    assert torch.allclose(a, b, atol=1e-5)


def test_long_document_classification_ignores_batch_partners(tmp_path):
    ex = _load("long_document_classification")
    res = ex.main(["--length", "96", "--documents", "12", "--steps", "2", "--dim", "16", "--heads", "2",
                   "--num-features", "16", "--batch-size", "4"])  # fmt: skip
    assert 0.0 <= res["accuracy"] <= 1.0 and res["num_classes"] == 4
    model = res["model"].eval()
    short, long = ex.synthetic(1, 40, 4, seed=1)[0], ex.synthetic(1, 96, 4, seed=2)[0]
    with torch.no_grad():
        alone = model(*ex.collate([short], 96)[:2])
        batched = model(*ex.collate([short, long], 96)[:2])[:1]
    # padded keys count in neither numerator nor normaliser: float32 round-off only
    assert torch.allclose(alone, batched, atol=1e-5), (alone - batched).abs().max()


def test_sequence_parallel_train_under_torchrun_equals_one_process(tmp_path):
    ex = _load("sequence_parallel_train")
    tiny = ["--seq-len", "48", "--steps", "2", "--dim", "16", "--heads", "2", "--depth", "1", "--dtype", "float64"]
    single = ex.main(tiny)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        # --standalone: torchrun binds a free port itself (a port probed here could be taken
        # by another test's job before torchrun binds it)
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "examples" / "sequence_parallel_train.py"), *tiny],  # fmt: skip
        capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path,
    )  # fmt: skip
    if r.returncode != 0:
        # Known race in torch's gloo backend (favor.distributed.train.leave_process_group's
        # docstring has the backtrace): a gloo worker frees a finished collective during
        # interpreter finalisation and aborts the finished rank ("terminate called without an
        # active exception"). leave_process_group narrows the window but cannot close it, so
        # only that exact failure is tolerated (with a warning); any other exit fails the test.
        shutdown_abort = "terminate called without an active exception" in r.stderr and "SIGABRT" in r.stderr
        assert shutdown_abort and r.stdout.count("(2 processes)") == 2, r.stdout + r.stderr
        warnings.warn("torchrun example: a rank aborted at exit after finishing (known shutdown issue)", stacklevel=1)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("step")]
    assert len(lines) == 2 and all("(2 processes)" in ln for ln in lines)
    got = [float(ln.split()[3]) for ln in lines]
    # float64 end to end; the printed losses have 10 decimals
    assert got == pytest.approx(single, abs=1e-9)
