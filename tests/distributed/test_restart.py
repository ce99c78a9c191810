"""torchrun --max-restarts: one rank SIGKILLed mid-run, the job restarts from the last
checkpoint and ends at the same parameters (bit for bit) as an uninterrupted job.

Two gloo processes on localhost, data parallel (rank 0, the checkpoint writer, is killed)
and sequence parallel (rank 1 is killed). The reference is an uninterrupted torchrun job of
the same configuration, run at the same time: both sum the same float32 numbers in the
same order, so bit-exact equality is the right test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))
pytestmark = pytest.mark.skipif(
    TORCHRUN is None or not Path("/proc/self/task").is_dir(), reason="needs torchrun and Linux /proc"
)
TRAIN = {
    "steps": 10,
    "seq_len": 32,
    "batch_size": 4,
    "eval_every": 5,
    "eval_windows": 4,
    "log_every": 1,
    "checkpoint_every": 2,
    "redraw_interval": 3,
}


def _torchrun(out: Path, cfg: Path, flag: str, *, restarts: int = 0, throttle: float = 0.0) -> subprocess.Popen:
    cmd = [TORCHRUN, "--standalone", "--nproc-per-node", "2", "--max-restarts", str(restarts), "-m", "favor.cli"]
    cmd += ["train", "--config", str(cfg), "--out", str(out), "--threads", "1", "--no-progress", flag, "2"]
    cmd += ["--throttle", str(throttle)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _workers(agent_pid: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes (its children with RANK in their environment)."""
    found = {}
    try:
        children = [
            pid for task in Path(f"/proc/{agent_pid}/task").iterdir() for pid in (task / "children").read_text().split()
        ]
    except OSError:  # torchrun has exited
        return found
    for pid in children:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                found[int(item[5:])] = int(pid)
    return found


def _latest_step(out: Path) -> int:
    try:
        return int((out / "checkpoints" / "LATEST").read_text().strip().split("_")[1])
    except (OSError, IndexError, ValueError):
        return 0


def _final_tensors(out: Path) -> dict[str, torch.Tensor]:
    step = out / "checkpoints" / f"step_{TRAIN['steps']:08d}"
    return {**load_file(step / "model.safetensors"), **load_file(step / "optimizer.safetensors")}


def _rows(out: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"], r.get("val_bpr")) for r in rows]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes: equality of these is bit-for-bit equality, NaN buffers included
    (FAVOR++'s rho is NaN until calibrated)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


#: (flag, rank killed): data parallel loses rank 0, the checkpoint writer; sequence parallel rank 1
CASES = {"data": ("--data-parallel", 0), "sequence": ("--sequence-parallel", 1)}


def test_killed_rank_restarts_from_checkpoint_and_ends_identical(tmp_path):
    """Both modes at once (four torchrun jobs side by side: the test is mostly process start-up)."""
    cfg = tmp_path / "run.toml"
    cfg.write_text("[train]\n" + "".join(f"{k} = {v}\n" for k, v in TRAIN.items()))
    procs = {}
    for mode, (flag, _) in CASES.items():
        procs[f"{mode}-ref"] = _torchrun(tmp_path / f"{mode}-ref", cfg, flag)
        # the throttle (s/step) makes "mid-run" reliable: the kill lands between checkpoints 4 and 10
        procs[f"{mode}-job"] = _torchrun(tmp_path / f"{mode}-job", cfg, flag, restarts=2, throttle=0.3)
    killed_at, outs = {}, {}
    try:
        deadline = time.time() + 240
        pending = dict(CASES)
        while pending:
            for mode, (_, victim) in list(pending.items()):
                job, out = procs[f"{mode}-job"], tmp_path / f"{mode}-job"
                assert job.poll() is None, job.communicate()
                if _latest_step(out) >= 4:
                    pids = _workers(job.pid)
                    assert sorted(pids) == [0, 1], pids
                    os.kill(pids[victim], signal.SIGKILL)
                    killed_at[mode] = _latest_step(out)
                    assert killed_at[mode] < TRAIN["steps"]  # really mid-run
                    del pending[mode]
            assert time.time() < deadline, f"no checkpoint 4 from {sorted(pending)}"
            time.sleep(0.02)
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, f"{name}: {out[-2000:]}\n{err[-3000:]}"
            outs[name] = out
    finally:  # a failed test leaves no processes behind: torchrun's workers first, then torchrun
        for proc in procs.values():
            if proc.poll() is None:
                for pid in _workers(proc.pid).values():
                    os.kill(pid, signal.SIGKILL)
                proc.kill()
                proc.communicate()
    for mode in CASES:
        summary = json.loads([line for line in outs[f"{mode}-job"].splitlines() if line.startswith("{")][-1])
        # torchrun restarted the job once, and it resumed from a checkpoint at or after the kill's
        assert summary["restarts"] == 1 and summary["start_step"] >= killed_at[mode] >= 4, (mode, summary)
        a, b = _final_tensors(tmp_path / f"{mode}-ref"), _final_tensors(tmp_path / f"{mode}-job")
        assert a.keys() == b.keys() and any(k.startswith("rng.torch.rank") for k in a)
        diff = [k for k in a if not torch.equal(_bits(a[k]), _bits(b[k]))]
        assert not diff, f"{mode}: {len(diff)} tensors differ, e.g. {diff[:3]}"
        rows = _rows(tmp_path / f"{mode}-job")
        assert rows == _rows(tmp_path / f"{mode}-ref")
        assert [r[0] for r in rows] == list(range(1, TRAIN["steps"] + 1))
