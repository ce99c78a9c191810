"""Worker for the sequence-parallel training test (spawned, see _spawn.py)."""

from __future__ import annotations

import os

import torch

from favor.distributed.train import train_sequence_parallel
from favor.training import resolve_config, train


def train_worker(rank: int, world: int, out_dir: str, overrides: dict) -> dict:
    # float64 models: the comparison with single-process training is then limited by
    # round-off of order 1e-16, not float32's 1e-7 amplified by Adam
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model_cfg, train_cfg = resolve_config(preset="tiny", **overrides)
        model_cfg = model_cfg.replace(dim=16, heads=2, num_features=8)
        rows = []
        sp = train_sequence_parallel(
            os.path.join(out_dir, "sp"), model_cfg, train_cfg, on_step=rows.append, write_plot=False
        )
        result = {"rows": rows, "loss": sp["loss"]}
        if rank == 0:
            single = train(os.path.join(out_dir, "single"), model_cfg, train_cfg, write_plot=False)
            ref = single["model"].state_dict()
            got = sp["model"].state_dict()
            result["vs_single"] = max(float((got[k] - ref[k]).abs().max()) for k in ref)
            result["single_loss"] = single["loss"]
            result["checkpoint"] = sorted(os.listdir(os.path.join(out_dir, "sp", "checkpoints")))
            with open(os.path.join(out_dir, "sp", "log.jsonl")) as f:
                result["log_lines"] = len(f.read().splitlines())
        return result
    finally:
        torch.set_default_dtype(previous)
