"""Writing a paper figure's outputs: JSON, a markdown table and the header every run prints."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch


def environment() -> dict[str, Any]:
    """Machine, threads and versions, recorded beside every result."""
    return {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table; floats keep 4 significant digits."""

    def cell(x: Any) -> str:
        return f"{x:.4g}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, name: str, payload: dict[str, Any], table: str) -> dict[str, Path]:
    """``out/NAME.json`` (payload plus environment) and ``out/NAME.md`` (the table)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md"}
    paths["json"].write_text(json.dumps({"environment": environment(), **payload}, indent=2))
    paths["md"].write_text(table)
    return paths
