"""A full disk or an I/O error while a checkpoint is written (simulated: the writer's file
writes, fsyncs and renames raise ENOSPC / EIO at one point each, after writing part of the
file where there is one): a clear CheckpointWriteError naming the checkpoint and what
LATEST still names; the previous checkpoint byte-for-byte intact and still LATEST; nothing
left behind; and the run, resumed once the fault is gone, ends bit-for-bit at the
uninterrupted run's parameters and losses."""

from __future__ import annotations

import errno
import os

import pytest
import torch

import favor.training.checkpoint as ckpt_mod
import favor.training.loop as train_mod
from favor.cli import main
from favor.training.checkpoint import CheckpointWriteError, load_checkpoint
from favor.training.loop import resolve_config, train
from tests.test_train import SMALL

#: stage -> (errno, what fails)
STAGES = {
    "model": (errno.ENOSPC, "model.safetensors half written"),
    "optimizer": (errno.ENOSPC, "optimizer.safetensors half written"),
    "trainer": (errno.ENOSPC, "trainer.json half written"),
    "fsync": (errno.EIO, "the first fsync"),
    "rename": (errno.EIO, "renaming the temp directory into place"),
    "latest": (errno.ENOSPC, "the LATEST temp file half written"),
}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _snapshot(run):
    root = run / "checkpoints"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


class _Faulty:
    """Arms one fault for the checkpoint write of ``step``; favor.training.checkpoint's own
    names (save_file, _write_text, os) are replaced, nothing else in the process."""

    def __init__(self, monkeypatch, stage: str, step: int):
        self.stage, self.step, self.armed, self.fired = stage, step, False, False
        code = STAGES[stage][0]
        real_save_file, real_write_text, real_os = ckpt_mod.save_file, ckpt_mod._write_text, os
        real_save = train_mod.save_checkpoint
        fault = self

        def fail(filename=None):
            self.fired = True
            raise OSError(code, os.strerror(code), filename)

        def save_file(tensors, filename, metadata=None):
            real_save_file(tensors, filename, metadata=metadata)
            if self.armed and filename.endswith(f"{stage}.safetensors"):
                os.truncate(filename, os.path.getsize(filename) // 2)
                fail(filename)

        def write_text(path, text):
            target = {"trainer": "trainer.json", "latest": ".LATEST.tmp"}.get(stage)
            if self.armed and target and path.name.startswith(target):
                path.write_text(text[: len(text) // 2])
                fail(str(path))
            real_write_text(path, text)

        class _OS:
            def __getattr__(self, name):
                return getattr(real_os, name)

            @staticmethod
            def fsync(fd):
                if fault.armed and stage == "fsync":
                    fail()
                return real_os.fsync(fd)

            @staticmethod
            def replace(src, dst):
                if fault.armed and stage == "rename" and os.path.basename(str(src)).startswith(".step_"):
                    fail(str(src))
                return real_os.replace(src, dst)

        def save_checkpoint(*args, **kwargs):
            self.armed = kwargs["step"] == self.step
            try:
                return real_save(*args, **kwargs)
            finally:
                self.armed = False

        monkeypatch.setattr(ckpt_mod, "save_file", save_file)
        monkeypatch.setattr(ckpt_mod, "_write_text", write_text)
        monkeypatch.setattr(ckpt_mod, "os", _OS())
        monkeypatch.setattr(train_mod, "save_checkpoint", save_checkpoint)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.set_num_threads(1)
    m, t = resolve_config(preset="tiny", **SMALL)
    run = tmp_path_factory.mktemp("ref")
    train(run, m, t, write_plot=False)
    ck = load_checkpoint(run)
    return (m, t), {**ck.model_state(), **ck.optimizer_tensors()}, (run / "log.jsonl").read_text()


def _losses(log_text):
    import json

    return [(r["step"], r["loss"], r.get("val_bpr")) for r in map(json.loads, log_text.splitlines())]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_write_fault_keeps_previous_checkpoint_and_run_resumes(tmp_path, monkeypatch, reference, stage):
    (m, t), want, ref_log = reference
    run = tmp_path / "run"
    train(run, m, t, stop_at=4, write_plot=False)
    before = _snapshot(run)
    assert before["LATEST"] == b"step_00000004\n"
    with monkeypatch.context() as mp:
        fault = _Faulty(mp, stage, step=8)
        with pytest.raises(CheckpointWriteError) as info:
            train(run, m, t, resume=True, write_plot=False)
        assert fault.fired
    err = info.value
    assert err.errno == STAGES[stage][0]
    msg = str(err)
    assert "step_00000008" in msg and "LATEST still names step_00000004, which is intact" in msg, msg
    if err.errno == errno.ENOSPC:
        assert "disk is full" in msg, msg
    # the previous checkpoint untouched and still LATEST; no new, temp or half-deleted entries
    assert _snapshot(run) == before
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["LATEST", "step_00000004"]
    # fault gone: the run resumes from step 4 and ends where the uninterrupted run did
    res = train(run, m, t, resume=True, write_plot=False)
    assert res["start_step"] == 4
    ck = load_checkpoint(run)
    got = {**ck.model_state(), **ck.optimizer_tensors()}
    assert got.keys() == want.keys() and all(torch.equal(_bits(got[k]), _bits(want[k])) for k in want)
    assert _losses((run / "log.jsonl").read_text()) == _losses(ref_log)


def test_cli_reports_a_full_disk_clearly(tmp_path, monkeypatch, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text("[train]\n" + "".join(f"{k} = {v}\n" for k, v in SMALL.items()))
    common = ["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--threads", "1", "--no-progress"]
    _Faulty(monkeypatch, "model", step=8)
    assert main(common) == 1
    out = capsys.readouterr().out
    assert "favor train: [Errno 28] could not write checkpoint" in out and "step_00000008" in out, out
    assert "LATEST still names step_00000004" in out and "the disk is full" in out, out
    assert (tmp_path / "run" / "checkpoints" / "LATEST").read_text() == "step_00000004\n"


def test_fault_while_replacing_the_latest_step_never_leaves_latest_dangling(tmp_path, monkeypatch):
    # a fresh run over an older run's checkpoint of the same step: LATEST is removed before
    # the old directory is, so a failure in between leaves no LATEST, never a dangling one
    from favor.models import PerformerConfig, PerformerLM
    from favor.training.checkpoint import save_checkpoint

    model = PerformerLM(PerformerConfig(vocab_size=28, dim=16, depth=1, heads=2))
    save_checkpoint(tmp_path, step=4, model=model, config={"run": 1})
    real_replace = os.replace

    class _OS:
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def replace(src, dst):
            if os.path.basename(str(src)).startswith(".step_00000004.tmp-"):
                raise OSError(errno.EIO, os.strerror(errno.EIO), str(src))
            return real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod, "os", _OS())
    with pytest.raises(CheckpointWriteError, match=r"LATEST \(which named step_00000004, being replaced\) was removed"):
        save_checkpoint(tmp_path, step=4, model=model, config={"run": 2})
    assert list((tmp_path / "checkpoints").iterdir()) == []
