"""favor generate (and load_lm) on a tampered or mismatched checkpoint directory: a clear
error naming the file, exit status 2, and no code executed (a pickle in place of a
safetensors file never runs: its payload would create a marker file)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from favor.cli import main
from favor.models import PerformerConfig, PerformerLM
from favor.training.checkpoint import save_checkpoint

from ._pickles import check_payload_runs, raw_pickle, torch_save

CFG = PerformerConfig(vocab_size=28, dim=16, depth=1, heads=2)


def _edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _resize_in_trainer(step: Path, name: str) -> None:
    """Make trainer.json's recorded size match the tampered file (the attacker's best try)."""
    _edit_json(step / "trainer.json", lambda d: d["files"].__setitem__(name, (step / name).stat().st_size))


def _model_pickle(step: Path, marker: Path, kind) -> None:
    (step / "model.safetensors").write_bytes(kind(marker))
    _resize_in_trainer(step, "model.safetensors")


def _wrong_shape(step: Path, marker: Path) -> None:
    tensors = load_file(step / "model.safetensors")
    key = next(k for k in tensors if k.endswith("weight") and tensors[k].ndim == 2)
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, step / "model.safetensors", metadata={"format": "favor-checkpoint-1"})
    _resize_in_trainer(step, "model.safetensors")


#: name -> (tamper(step_dir, marker), regex the message must match)
CASES = {
    "config_dim_edited": (
        lambda s, m: _edit_json(s / "config.json", lambda d: d["model"].__setitem__("dim", 32)),
        r"model\.safetensors does not fit the model.*shape mismatches",
    ),
    "config_unknown_key": (
        lambda s, m: _edit_json(s / "config.json", lambda d: d["model"].__setitem__("evil", 1)),
        r"config\.json: bad model config: unknown model config keys \['evil'\]",
    ),
    "config_model_not_a_dict": (
        lambda s, m: _edit_json(s / "config.json", lambda d: d.__setitem__("model", "BertModel")),
        r"config\.json: bad model config: model config must be a dict",
    ),
    "config_not_json": (lambda s, m: (s / "config.json").write_text("{'model':"), r"config\.json is not valid JSON"),
    "trainer_format_edited": (
        lambda s, m: _edit_json(s / "trainer.json", lambda d: d.__setitem__("format", "pickle")),
        r"trainer\.json has format 'pickle', expected 'favor-checkpoint-1'",
    ),
    "model_is_a_pickle": (
        lambda s, m: (s / "model.safetensors").write_bytes(raw_pickle(m)),
        r"model\.safetensors is truncated or altered",
    ),
    "model_is_a_pickle_sizes_fixed": (
        lambda s, m: _model_pickle(s, m, raw_pickle),
        r"model\.safetensors cannot be read as safetensors",
    ),
    "model_is_torch_save_sizes_fixed": (
        lambda s, m: _model_pickle(s, m, torch_save),
        r"model\.safetensors cannot be read as safetensors",
    ),
    "bin_instead_of_safetensors": (
        lambda s, m: ((s / "pytorch_model.bin").write_bytes(torch_save(m)), (s / "model.safetensors").unlink()),
        r"model\.safetensors is missing",
    ),
    "wrong_shape_sizes_fixed": (_wrong_shape, r"model\.safetensors does not fit the model.*shape mismatches"),
    "latest_escapes_the_run": (
        lambda s, m: (s.parent / "LATEST").write_text("../../elsewhere\n"),
        r"LATEST names '\.\./\.\./elsewhere', expected a checkpoint name like step_00000001",
    ),
}


@pytest.fixture
def checkpoint(tmp_path):
    model = PerformerLM(CFG)
    step = save_checkpoint(tmp_path / "run", step=1, model=model, config={"model": CFG.to_dict(), "train": {}})
    return tmp_path / "run", step


def test_untampered_checkpoint_generates(checkpoint, capsys):
    run, _ = checkpoint
    assert main(["generate", "--checkpoint", str(run), "--prompt", "MK", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip().startswith("MK")


@pytest.mark.parametrize("case", sorted(CASES))
def test_tampered_checkpoint_is_refused_without_running_code(checkpoint, tmp_path, capsys, case):
    check_payload_runs(tmp_path)
    run, step = checkpoint
    marker = tmp_path / "pickle-ran"
    tamper, pattern = CASES[case]
    tamper(step, marker)
    assert main(["generate", "--checkpoint", str(run), "--prompt", "MK", "--max-new-tokens", "3"]) == 2
    out = capsys.readouterr().out
    assert out.startswith("favor generate: "), out
    assert re.search(pattern, out, flags=re.S), out
    assert not marker.exists(), "a pickle was executed"
