"""The CLI side of ``favor train --sequence-parallel N`` / ``--data-parallel N`` (run under
torchrun).

``favor.commands.train`` resolves the configuration and hands over here; this module
joins the process group, checks it has N processes, shows the progress bar and prints the
summary on rank 0 only. When torchrun restarts a failed job (``--max-restarts``), the
restarted processes resume from the run's LATEST checkpoint (or start afresh if the failed
attempt wrote none), so the job ends where an uninterrupted one would.
"""

from __future__ import annotations

import argparse
import json
import os

__all__ = ["add_parallel_arguments", "add_sequence_parallel_argument", "run_parallel", "run_sequence_parallel"]

#: option name -> split of favor.distributed.train.train_distributed
_SPLIT = {"sequence_parallel": "sequence", "data_parallel": "batch"}


def add_parallel_arguments(parser: argparse.ArgumentParser) -> None:
    """--sequence-parallel N and --data-parallel N (one of them)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--sequence-parallel",
        type=int,
        metavar="N",
        help="split every sequence across N processes (launch with torchrun --nproc-per-node N)",
    )
    group.add_argument(
        "--data-parallel",
        type=int,
        metavar="N",
        help="split every batch's rows across N processes (launch with torchrun --nproc-per-node N)",
    )


add_sequence_parallel_argument = add_parallel_arguments  # the name before --data-parallel existed


def parallel_option(args: argparse.Namespace) -> tuple[str, int] | None:
    """(option name, N) of the parallel option given, if any."""
    for name in _SPLIT:
        n = getattr(args, name, None)
        if n is not None:
            return name, n
    return None


def elastic_restart() -> int:
    """How many times torchrun has restarted this job (0 on the first attempt)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def run_parallel(args: argparse.Namespace, model_cfg, train_cfg) -> int:
    """Train with ``train_distributed``; returns the exit code."""
    from tqdm import tqdm

    from ..training.checkpoint import CheckpointError, has_checkpoint
    from .train import init_from_env, leave_process_group, train_distributed

    name, n = parallel_option(args)
    flag = "--" + name.replace("_", "-")
    if n < 1:
        print(f"favor train: {flag} must be >= 1, got {n}")
        return 2
    resume = bool(getattr(args, "resume", False))
    restarts = elastic_restart()
    if not resume and restarts and has_checkpoint(args.out):
        resume = True  # torchrun restarted the job after a failure: continue from the last checkpoint
    joined = False
    if n > 1 or "WORLD_SIZE" in os.environ:
        try:
            rank, world = init_from_env()
        except RuntimeError as e:
            print(f"favor train: {e}")
            return 2
        joined = True
        if world != n:
            if rank == 0:
                print(f"favor train: {flag} {n} but torchrun started {world} processes")
            leave_process_group(synchronize=False)
            return 2
    else:
        rank = 0
    finished = False
    try:
        bar = tqdm(
            total=train_cfg.steps,
            desc=f"train x{n}",
            unit="step",
            disable=rank != 0 or args.no_progress,
            dynamic_ncols=True,
        )

        def on_step(row):
            if bar.n == 0 and row["step"] > 1:
                bar.update(row["step"] - 1)
            post = {"loss": f"{row['loss']:.3f}", "tok/s": f"{row['tokens_per_s']:.0f}"}
            if "val_bpr" in row:
                post["val_bpr"] = f"{row['val_bpr']:.3f}"
            bar.set_postfix(post)
            bar.update(1)

        try:
            result = train_distributed(
                args.out,
                model_cfg,
                train_cfg,
                split=_SPLIT[name],
                on_step=on_step,
                resume=resume,
                throttle=getattr(args, "throttle", 0.0),
            )
        except (CheckpointError, OSError, ValueError) as e:
            bar.close()
            print(f"favor train: {e}")
            return 2 if isinstance(e, ValueError) else 1
        bar.close()
        finished = True
    finally:
        if joined:
            leave_process_group(synchronize=finished)
    if rank == 0:
        result.pop("model")
        if restarts:
            result["restarts"] = restarts
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}))
        print(f"log: {args.out}/log.jsonl  plot: {args.out}/loss.png  checkpoint: {args.out}/checkpoints/")
    return 0


run_sequence_parallel = run_parallel  # the name before --data-parallel existed
