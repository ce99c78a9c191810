"""The process test_sigkill kills: ``favor train`` (favor.cli.main) in a child process,
optionally killing itself (SIGKILL) at a chosen point inside a checkpoint write.

Kill plans (no hook in the library: the child wraps favor.training.loop's save_checkpoint):
- ("line", save, n): during the ``save``-th checkpoint write of this process, die before
  the n-th line of favor/training/checkpoint.py it executes (counted with sys.settrace, except the
  in-memory loops in SKIP); if the write
  runs fewer lines, die right after it returns (after LATEST is replaced).
- ("torn", save, file): during the ``save``-th write, let safetensors write its ``file``-th
  file (0 model, 1 optimizer), cut that file to half its size, and die: a torn file.
Where the kill landed ("function:line") is appended to ``KILLS_FILE`` beside the run dir.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

KILLS_FILE = "kills.txt"
#: lines not counted as kill points: loops that only build dicts in memory (~400 of a
#: save's ~540 lines); what remains (~130) are the steps that touch the disk
SKIP = {"optimizer_to_tensors", "<dictcomp>", "<genexpr>", "<listcomp>"}
#: kill points per checkpoint write, about (so that a uniform draw in 1..LINES lands inside)
LINES = 130


def _die(record: Path, where: str) -> None:
    with open(record, "a", encoding="utf-8") as f:
        f.write(where + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(plan: tuple, record: Path) -> None:
    import favor.training.checkpoint as ckpt_mod
    import favor.training.loop as train_mod

    kind, save_no, n = plan
    original_save = train_mod.save_checkpoint
    source = ckpt_mod.__file__
    calls = {"save": 0, "file": 0}

    def traced_save(*args, **kwargs):
        calls["save"] += 1
        if calls["save"] != save_no:
            return original_save(*args, **kwargs)
        if kind == "torn":
            original_file = ckpt_mod.save_file

            def torn(tensors, filename, metadata=None):
                original_file(tensors, filename, metadata=metadata)
                if calls["file"] == n:
                    size = os.path.getsize(filename)
                    os.truncate(filename, size // 2)
                    _die(record, f"torn:{Path(filename).name}")
                calls["file"] += 1

            ckpt_mod.save_file = torn
            return original_save(*args, **kwargs)
        count = [0]

        def local(frame, event, arg):
            if event == "line" and frame.f_code.co_name not in SKIP:
                count[0] += 1
                if count[0] >= n:
                    _die(record, f"{frame.f_code.co_name}:{frame.f_lineno}")
            return local

        def tracer(frame, event, arg):
            return local if frame.f_code.co_filename == source else None

        sys.settrace(tracer)
        try:
            result = original_save(*args, **kwargs)
        finally:
            sys.settrace(None)
        _die(record, "after-save")
        return result

    train_mod.save_checkpoint = traced_save


def keep_every_checkpoint() -> None:
    """The reference run keeps all its checkpoints, to compare each resumed one with."""
    import favor.training.loop as train_mod

    original_save = train_mod.save_checkpoint
    train_mod.save_checkpoint = lambda *a, **k: original_save(*a, **{**k, "keep": 10**6})


def run_train(argv: list[str], plan: tuple | None = None, keep_all: bool = False) -> None:
    """``favor train ARGV`` in this (child) process; exits with its status. Its output is
    appended to RUN.child.log beside the run directory RUN."""
    out = Path(argv[argv.index("--out") + 1])
    out.parent.mkdir(parents=True, exist_ok=True)
    log = os.open(out.parent / f"{out.name}.child.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    # tqdm's default lock is a multiprocessing semaphore, which a SIGKILLed process leaks
    # (the resource tracker then warns at exit); a thread lock does here
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    if keep_all:
        keep_every_checkpoint()
    if plan is not None:
        _arm(plan, out.parent / f"{out.name}.{KILLS_FILE}")
    from favor.cli import main

    code = main(argv)
    sys.stdout.flush()
    os._exit(code)


def warm() -> None:
    """Import and cache what every child needs (the forkserver calls this once)."""
    import favor.cli  # noqa: F401
    import favor.commands.train  # noqa: F401
    from favor.data import load_proteins

    load_proteins(None)  # cached: forked children skip decompressing the corpus


if __name__ == "__main__":  # python -m tests.faults._child PLAN_JSON ARGV... (the subprocess variant)
    import json

    spec = json.loads(sys.argv[1])
    run_train(sys.argv[2:], tuple(spec["plan"]) if spec.get("plan") else None, spec.get("keep_all", False))
