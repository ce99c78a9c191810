"""favor train --sequence-parallel N: refused without torchrun; under torchrun (slow) it
trains, writes a checkpoint favor generate reads, and its losses follow single-process
training on the same batches (float32: the sums of the two paths differ in order, so
the losses agree to ~1e-5, not bit for bit)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from favor.cli import main


def test_refused_without_torchrun(tmp_path, monkeypatch, capsys):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    code = main(["train", "--out", str(tmp_path / "run"), "--steps", "1", "--sequence-parallel", "2", "--no-progress"])
    assert code == 2
    assert "torchrun" in capsys.readouterr().out


def test_rejects_nonpositive_count(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path / "run"), "--steps", "1", "--sequence-parallel", "0", "--no-progress"])
    assert code == 2
    assert "--sequence-parallel" in capsys.readouterr().out


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not installed beside this python")
    common = ["train", "--preset", "tiny", "--steps", "4", "--no-progress", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sp_dir, single_dir = tmp_path / "sp", tmp_path / "single"
    subprocess.run(
        [
            torchrun,
            "--nproc-per-node",
            "2",
            "-m",
            "favor.cli",
            *common,
            "--out",
            str(sp_dir),
            "--sequence-parallel",
            "2",
        ],
        check=True,
        env=env,
        timeout=300,
    )
    assert main([*common, "--out", str(single_dir)]) == 0
    sp = [json.loads(line) for line in (sp_dir / "log.jsonl").read_text().splitlines()]
    single = [json.loads(line) for line in (single_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in sp] == [r["step"] for r in single] == [1, 2, 3, 4]
    for a, b in zip(sp, single, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-4, (a, b)
    assert (sp_dir / "checkpoints" / "LATEST").is_file()
    assert (
        main(["generate", "--checkpoint", str(sp_dir), "--prompt", "MKV", "--max-new-tokens", "5", "--seed", "0"]) == 0
    )
