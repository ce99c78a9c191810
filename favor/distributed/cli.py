"""The CLI side of ``favor train --sequence-parallel N`` (run under torchrun).

``favor.commands.train`` resolves the configuration and hands over here; this module
joins the process group, checks it has N processes, shows the progress bar and prints the
summary on rank 0 only.
"""

from __future__ import annotations

import argparse
import json
import os

__all__ = ["add_sequence_parallel_argument", "run_sequence_parallel"]


def add_sequence_parallel_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sequence-parallel",
        type=int,
        metavar="N",
        help="split every sequence across N processes (launch with torchrun --nproc-per-node N)",
    )


def run_sequence_parallel(args: argparse.Namespace, model_cfg, train_cfg) -> int:
    """Train with ``train_sequence_parallel``; returns the exit code."""
    import torch.distributed as dist
    from tqdm import tqdm

    from .train import init_from_env, train_sequence_parallel

    n = args.sequence_parallel
    if n < 1:
        print(f"favor train: --sequence-parallel must be >= 1, got {n}")
        return 2
    if getattr(args, "resume", False):
        print("favor train: --resume is not supported with --sequence-parallel")
        return 2
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
                print(f"favor train: --sequence-parallel {n} but torchrun started {world} processes")
            dist.destroy_process_group()
            return 2
    else:
        rank = 0
    try:
        bar = tqdm(
            total=train_cfg.steps,
            desc=f"train x{n}",
            unit="step",
            disable=rank != 0 or args.no_progress,
            dynamic_ncols=True,
        )

        def on_step(row):
            post = {"loss": f"{row['loss']:.3f}", "tok/s": f"{row['tokens_per_s']:.0f}"}
            if "val_bpr" in row:
                post["val_bpr"] = f"{row['val_bpr']:.3f}"
            bar.set_postfix(post)
            bar.update(1)

        result = train_sequence_parallel(args.out, model_cfg, train_cfg, on_step=on_step)
        bar.close()
    finally:
        if joined:
            dist.destroy_process_group()
    if rank == 0:
        result.pop("model")
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}))
        print(f"log: {args.out}/log.jsonl  plot: {args.out}/loss.png  checkpoint: {args.out}/checkpoints/")
    return 0
