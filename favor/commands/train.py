"""favor train: train a Performer LM on text or proteins, with checkpoints and exact resume.

This module only parses and calls ``favor.training.train`` (one process) or
``favor.distributed.train.train_distributed`` (``--sequence-parallel N`` /
``--data-parallel N`` under torchrun): data reading lives in ``favor.data``, the loop in
``favor.training.loop``. Under torchrun this joins the process group, checks it has N
processes, shows the progress bar and prints the summary on rank 0 only. When torchrun
restarts a failed job (``--max-restarts``), the restarted processes resume from the run's
LATEST checkpoint (or start afresh if the failed attempt wrote none), so the job ends where
an uninterrupted one would.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch
from tqdm import tqdm

from ..distributed.train import init_from_env, leave_process_group, train_distributed
from ..features.feature_map import KERNELS
from ..nn.attention import ATTENTIONS
from ..training.checkpoint import CheckpointError, has_checkpoint
from ..training.loop import PRESETS, resolve_config, train

#: option dest -> PerformerConfig field: each option given overrides the preset's model
#: config (resolve_config's ``model`` dict); a new model option is one add_argument and one entry
MODEL_OPTIONS = {"kernel": "kernel", "attention": "attention", "num_features": "num_features", "far_gain": "far_gain"}
#: option dest -> TrainConfig field, overriding the preset's training config the same way
TRAIN_OPTIONS = {
    "steps": "steps",
    "seed": "seed",
    "checkpoint_every": "checkpoint_every",
    "eval_every": "eval_every",
    "data": "data",
    "eval_data": "eval_data",
    "tokenizer": "tokenizer",
    "objective": "objective",
    "context": "seq_len",
    "batch_size": "batch_size",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="run directory (log.jsonl, loss.png, checkpoints/)")
    parser.add_argument("--config", help="TOML file with [model] and [train] tables, applied over the preset")
    parser.add_argument(
        "--preset", default="tiny", choices=sorted(PRESETS), help="starting configuration (default tiny)"
    )
    parser.add_argument("--steps", type=int, help="total optimiser steps (the learning-rate schedule's length)")
    parser.add_argument("--seed", type=int, help="seed for data order, initial weights and projections")
    parser.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue from DIR's latest checkpoint")
    parser.add_argument("--kernel", choices=sorted(KERNELS), help="feature map kernel")
    parser.add_argument("--attention", choices=sorted(ATTENTIONS), help="favor, or exact softmax for a baseline")
    parser.add_argument(
        "--num-features", type=int, help="random features M per head (default: the preset's, else automatic)"
    )
    parser.add_argument(
        "--exact-window",
        type=int,
        metavar="W",
        help="exact local terms (favor.ExactTerms): each query's last W + 1 keys get their exact softmax weight",
    )
    parser.add_argument("--exact-sinks", type=int, metavar="S", help="with --exact-window: the first S tokens too")
    parser.add_argument(
        "--exact-block", type=int, metavar="C", help="with --exact-window: queries share exact sets in blocks of C"
    )
    parser.add_argument(
        "--far-gain",
        type=float,
        metavar="G",
        help="with exact terms: a learnable per-head log weight on FAVOR's far keys, started at G "
        "(books' hybrid leaves the unigram plateau on both seeds from -4; docs/paper.md)",
    )
    parser.add_argument(
        "--data",
        metavar="PATH",
        help="plain text (UTF-8 bytes), FASTA (.fasta/.fa/.faa[.gz] or a leading '>') or a directory of them; "
        "default: the embedded Swiss-Prot extract",
    )
    parser.add_argument(
        "--eval-data", metavar="PATH", help="held-out data (default: the last 5%% of --data text, never trained on)"
    )
    parser.add_argument("--eval-every", type=int, metavar="N", help="steps between held-out evaluations")
    parser.add_argument("--tokenizer", metavar="DIR", help="a local Hugging Face tokenizer directory for text")
    parser.add_argument(
        "--objective", choices=("causal", "masked"), help="causal LM (PerformerLM) or masked LM (PerformerEncoder)"
    )
    parser.add_argument("--context", type=int, metavar="N", help="tokens per training window (>= 2)")
    parser.add_argument("--batch-size", type=int, metavar="N", help="windows per step")
    parser.add_argument(
        "--minutes",
        type=float,
        metavar="M",
        help="wall-clock budget: stop after the step that spends it, with an evaluation and a checkpoint",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_parallel_arguments(parser)
    # tests kill a run mid-way; a per-step sleep makes "mid-way" reliable
    parser.add_argument("--throttle", type=float, default=0.0, help=argparse.SUPPRESS)


def model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """PerformerConfig fields the options set (None keeps the preset's value): one entry per
    MODEL_OPTIONS item; options that combine into one field (several flags, one spec) are
    built here too."""
    out = {field: getattr(args, dest) for dest, field in MODEL_OPTIONS.items()}
    window, sinks, block = (getattr(args, n, None) for n in ("exact_window", "exact_sinks", "exact_block"))
    if window is not None:
        out["exact"] = {"window": window, "sinks": sinks or 0, "block": block or 1}
    elif sinks is not None or block is not None:
        raise ValueError("--exact-sinks / --exact-block need --exact-window W (W >= 0)")
    return out


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.context is not None and args.context < 2:
        print(f"favor train: --context must be >= 2, got {args.context}")
        return 2
    if args.minutes is not None and not args.minutes > 0:
        print(f"favor train: --minutes must be > 0, got {args.minutes}")
        return 2
    try:
        model_cfg, train_cfg = resolve_config(
            preset=args.preset,
            config_file=args.config,
            model=model_overrides(args),
            **{field: getattr(args, dest) for dest, field in TRAIN_OPTIONS.items()},
        )
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"favor train: {e}")
        return 2
    parallel = parallel_option(args)
    if parallel is not None and (parallel[1] != 1 or "WORLD_SIZE" in os.environ):  # 1 without torchrun: plain
        if args.minutes is not None:
            print("favor train: --minutes is for one process; give --steps to a distributed run")
            return 2
        return run_parallel(args, model_cfg, train_cfg)
    bar, on_step = _progress(train_cfg.steps, "train", disable=args.no_progress)
    try:
        result = train(
            args.out,
            model_cfg,
            train_cfg,
            resume=args.resume,
            on_step=on_step,
            throttle=args.throttle,
            time_limit=None if args.minutes is None else 60.0 * args.minutes,
        )
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        bar.close()
        print(f"favor train: {e}")
        return 2
    except OSError as e:  # a full disk or an I/O error (CheckpointWriteError says what LATEST still names)
        bar.close()
        print(f"favor train: {e}")
        return 1
    bar.close()
    result.pop("model")
    _print_summary(result)
    print(
        f"log: {args.out}/log.jsonl  plot: {args.out}/loss.png  summary: {args.out}/summary.json  "
        f"checkpoint: {args.out}/checkpoints/"
    )
    return 0


def _progress(total: int, desc: str, *, disable: bool):
    """A progress bar and the ``on_step(row)`` that advances it (from the resumed step on),
    showing the loss, tokens/s and the last held-out bits."""
    bar = tqdm(total=total, desc=desc, unit="step", disable=disable, dynamic_ncols=True)
    val = {"bpr": None}

    def on_step(row):
        if bar.n == 0 and row["step"] > 1:
            bar.update(row["step"] - 1)
        if "val_bpr" in row:
            val["bpr"] = row["val_bpr"]
        post = {"loss": f"{row['loss']:.3f}", "tok/s": f"{row['tokens_per_s']:.0f}"}
        if val["bpr"] is not None:
            post["val_bits"] = f"{val['bpr']:.3f}"
        bar.set_postfix(post)
        bar.update(1)

    return bar, on_step


def _print_summary(result: dict[str, Any]) -> None:
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}))


#: parallel option name -> split of favor.distributed.train.train_distributed
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
        bar, on_step = _progress(train_cfg.steps, f"train x{n}", disable=rank != 0 or args.no_progress)

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
        _print_summary(result)
        print(f"log: {args.out}/log.jsonl  plot: {args.out}/loss.png  checkpoint: {args.out}/checkpoints/")
    return 0
