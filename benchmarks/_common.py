"""Shared set-up for the scripts: passive OpenMP waiting before torch starts (see
favor.commands.bench._passive_openmp), the machine line, and JSON/PNG output paths."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
from pathlib import Path  # noqa: E402

OUT = Path("runs/bench")


def header(extra: str = "") -> dict:
    from favor.bench import machine_info

    info = machine_info()
    print(
        f"machine: {info['cpu']}, {info['cores']} cores, {info['threads']} torch threads, torch {info['torch']}, "
        f"load {info['load_avg']}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
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
