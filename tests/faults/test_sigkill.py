"""SIGKILL at random moments of ``favor train``, many times in one run, some of the kills
inside checkpoint writes: after every kill, every checkpoint on disk is complete and equal
(bit for bit) to the uninterrupted run's at that step, LATEST names one of them, and the
log agrees with the uninterrupted run's; the resumed run ends bit-for-bit at the
uninterrupted run's parameters, optimiser state and losses.

Kills: ~45 % inside a checkpoint write before a random line of favor/training/checkpoint.py (from
assembling the temp directory to pruning old checkpoints, including between the directory
rename and the LATEST update), ~10 % after a torn write (a safetensors file cut to half its
size), the rest at a random time (start-up, resume, training steps, log writes, writes).

The fast test forks children from a forkserver that has favor imported (a kill costs
milliseconds, not an interpreter start); the slow one starts each child with
``python -m`` and kills more often.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from favor.training.checkpoint import has_checkpoint, load_checkpoint

from ._child import KILLS_FILE, LINES, run_train

REPO = Path(__file__).resolve().parents[2]
TRAIN = {
    "steps": 32,
    "seq_len": 32,
    "batch_size": 4,
    "eval_every": 8,
    "eval_windows": 4,
    "log_every": 1,
    "checkpoint_every": 2,
    "redraw_interval": 3,
}


class _Fork:
    """A child from a forkserver with favor imported."""

    _ctx = None

    def __init__(self, argv, plan, keep_all):
        if _Fork._ctx is None:
            _Fork._ctx = mp.get_context("forkserver")
            _Fork._ctx.set_forkserver_preload(
                ["tests.faults._child", "favor.cli", "favor.commands.train", "favor.training.loop"]
            )
        self.p = _Fork._ctx.Process(target=run_train, args=(argv, plan, keep_all))
        self.p.start()

    def kill(self):
        self.p.kill()

    def wait(self, timeout):
        self.p.join(timeout)
        assert self.p.exitcode is not None, "child did not finish"
        return self.p.exitcode


class _Exec:
    """A child started from scratch: ``python -m tests.faults._child``."""

    def __init__(self, argv, plan, keep_all):
        spec = json.dumps({"plan": plan, "keep_all": keep_all})
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "tests.faults._child", spec, *argv]
        self.p = subprocess.Popen(cmd, cwd=REPO, env=env)

    def kill(self):
        self.p.send_signal(signal.SIGKILL)

    def wait(self, timeout):
        return self.p.wait(timeout)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (bit-for-bit equality, NaN buffers such as an uncalibrated rho included)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _rows(run: Path) -> dict[int, tuple]:
    """step -> (loss, lr, val_bpr) of the log's complete lines (a kill may cut the last one)."""
    rows = {}
    path = run / "log.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                break
            rows[r["step"]] = (r["loss"], r["lr"], r.get("val_bpr"))
    return rows


class _Reference:
    """The uninterrupted run: every checkpoint kept, loaded on demand."""

    def __init__(self, run: Path):
        self.run, self.rows, self._cache = run, _rows(run), {}

    def state(self, step: int):
        if step not in self._cache:
            ck = load_checkpoint(self.run / "checkpoints" / f"step_{step:08d}")
            self._cache[step] = ({**ck.model_state(), **ck.optimizer_tensors()}, ck.trainer["optimizer"])
        return self._cache[step]


def _check_after_kill(run: Path, ref: _Reference) -> int:
    """Every visible checkpoint is complete and equals the reference's; LATEST names one;
    the log's rows equal the reference's. Returns LATEST's step (0 if none)."""
    root = run / "checkpoints"
    latest = 0
    if root.is_dir():
        visible = {p.name for p in root.iterdir() if not p.name.startswith(".")}
        for name in sorted(visible - {"LATEST"}):
            ck = load_checkpoint(root / name)  # complete: JSON parses, format and step present
            assert name == f"step_{ck.step:08d}", name
            got = {**ck.model_state(), **ck.optimizer_tensors()}  # sizes match trainer.json, safetensors parse
            want, want_meta = ref.state(ck.step)
            assert got.keys() == want.keys(), name
            assert all(torch.equal(_bits(got[k]), _bits(want[k])) for k in want), name
            assert ck.trainer["optimizer"] == want_meta, name
        if "LATEST" in visible:
            name = (root / "LATEST").read_text().strip()
            assert name in visible, f"LATEST names {name!r}, not a complete checkpoint ({sorted(visible)})"
            latest = int(name.split("_")[1])
    for step, row in _rows(run).items():
        assert row == ref.rows[step], (step, row, ref.rows[step])
    return latest


def _storm(tmp_path: Path, launcher, kills_wanted: int, seed: int, max_delay: float) -> dict:
    cfg = tmp_path / "run.toml"
    cfg.write_text("[train]\n" + "".join(f"{k} = {v}\n" for k, v in TRAIN.items()))
    base = ["train", "--config", str(cfg), "--threads", "1", "--no-progress"]
    ref_dir = tmp_path / "ref"
    assert launcher(base + ["--out", str(ref_dir)], None, True).wait(300) == 0
    ref = _Reference(ref_dir)
    assert sorted(ref.rows) == list(range(1, TRAIN["steps"] + 1))
    rng = random.Random(seed)
    kinds: Counter = Counter()
    runs, resumes = [], 0
    while sum(kinds.values()) < kills_wanted:  # a run that finishes before the kills do is followed by another
        run = tmp_path / f"run{len(runs)}"
        runs.append(run)
        while True:
            argv = base + ["--out", str(run)]
            if has_checkpoint(run):
                argv.append("--resume")
                resumes += 1
            plan, delay = None, None
            if sum(kinds.values()) < kills_wanted:
                r = rng.random()
                if r < 0.45:
                    plan = ("line", rng.choice([1, 2]), rng.randint(1, LINES))
                elif r < 0.55:
                    plan = ("torn", rng.choice([1, 2]), rng.choice([0, 1]))
                else:
                    delay = rng.uniform(0.0, max_delay)
            child = launcher(argv, plan, False)
            if delay is not None:
                time.sleep(delay)
                child.kill()
            code = child.wait(300)
            if code == 0:
                break
            assert code == -signal.SIGKILL, (
                f"child exited {code}: {(run.parent / f'{run.name}.child.log').read_text()[-2000:]}"
            )
            kinds["time" if plan is None else plan[0]] += 1
            _check_after_kill(run, ref)
        # the finished run: the uninterrupted run's parameters, optimiser state and losses, bit for bit
        assert _check_after_kill(run, ref) == TRAIN["steps"]
        assert _rows(run) == ref.rows
        final = load_checkpoint(run)
        want, _ = ref.state(TRAIN["steps"])
        got = {**final.model_state(), **final.optimizer_tensors()}
        assert all(torch.equal(_bits(got[k]), _bits(want[k])) for k in want)
        # and no leftovers of killed writers remain: the last save cleaned them
        assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    sites = []
    for run in runs:
        path = run.parent / f"{run.name}.{KILLS_FILE}"
        sites += path.read_text().split() if path.is_file() else []
    return {"kills": dict(kinds), "runs": len(runs), "resumes": resumes, "sites": sites}


def test_sigkill_storm_resumes_bit_for_bit(tmp_path):
    t0 = time.perf_counter()
    res = _storm(tmp_path, _Fork, kills_wanted=22, seed=16, max_delay=1.0)
    kills = res["kills"]
    assert sum(kills.values()) >= 22 and kills["line"] + kills["torn"] >= 8, res
    # the kills inside writes landed at many places, before and after the directory rename
    sites = set(res["sites"])
    assert len(sites) >= 6, sites
    print(
        f"{sum(kills.values())} kills {kills}, {res['resumes']} resumes, {len(sites)} sites, "
        f"{time.perf_counter() - t0:.1f} s"
    )


@pytest.mark.slow
def test_sigkill_storm_fresh_processes(tmp_path):
    t0 = time.perf_counter()
    res = _storm(tmp_path, _Exec, kills_wanted=40, seed=17, max_delay=4.0)
    assert sum(res["kills"].values()) >= 40, res
    print(
        f"{sum(res['kills'].values())} kills {res['kills']}, {res['resumes']} resumes, {len(set(res['sites']))} sites, "
        f"{time.perf_counter() - t0:.1f} s"
    )
