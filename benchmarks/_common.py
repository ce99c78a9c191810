"""Shared set-up for the scripts: the machine line (with the OpenMP wait policy, which
moves favor's many small per-chunk ops by up to 1.5x on a 2-core CPU: the scripts keep
the environment's, i.e. torch's default unless OMP_WAIT_POLICY is set; on a machine
shared with other jobs, OMP_WAIT_POLICY=PASSIVE keeps idle threads from spinning), and
JSON/PNG output paths."""

from __future__ import annotations

import json
import os
from pathlib import Path

OUT = Path("runs/bench")


def add_device(parser) -> None:
    """``--device``: where to measure (cpu, cuda, cuda:1); on a GPU the timings synchronize."""
    parser.add_argument("--device", default="cpu", help="torch device to measure on (cpu, cuda, cuda:1)")


def header(extra: str = "", device: str = "cpu") -> dict:
    from favor.benchmarking.timing import machine_info

    info = machine_info(device)
    if info["gpu"]:
        print(f"device: {info['device']} ({info['gpu']}, CUDA {info['cuda']})")
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, {info['threads']} torch threads, torch {info['torch']}, "
        f"load {info['load_avg']}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset (default)')}"
    )
    if extra:
        print(extra)
    return info


def write_json(name: str, data) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
